"""Tokenize stage: ids against the tokenizer itself, resumption, refusals, bad input."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

from pipeline.errors import XprobeError
from pipeline.store import Store
from stages.tokenize import TokenizeConfig, run


def _cfg(source, tokenizer_dir, **kw) -> TokenizeConfig:
    base = dict(
        corpus="c",
        source=(str(source),),
        tokenizer=str(tokenizer_dir),
        ctx=32,
        chunk_seqs=8,
        progress=False,
    )
    base.update(kw)
    return TokenizeConfig(**base)


def _arrays(store: Store, corpus: str = "c") -> dict[str, np.ndarray]:
    return {k: store.array(f"tokens/{corpus}/{k}")[:] for k in ("ids", "mask", "doc")}


def test_packed_ids_match_tokenizer(tmp_path, corpus_jsonl, tokenizer_dir, documents):
    store = Store(tmp_path / "s")
    run(_cfg(corpus_jsonl, tokenizer_dir), store)
    got = _arrays(store)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    eos = bos = tok.eos_token_id
    stream, docs = [], []
    for k, d in enumerate(documents):
        toks = tok(d, add_special_tokens=False)["input_ids"] + [eos]
        stream += toks
        docs += [k] * len(toks)
    body = 31
    n_seq = -(-len(stream) // body)
    pad = n_seq * body - len(stream)
    stream_arr = np.array(stream + [eos] * pad).reshape(n_seq, body)
    expected_ids = np.concatenate([np.full((n_seq, 1), bos), stream_arr], axis=1)
    expected_mask = np.concatenate(
        [
            np.zeros((n_seq, 1), bool),
            np.array([True] * len(stream) + [False] * pad).reshape(n_seq, body),
        ],
        axis=1,
    )
    docs_arr = np.array(docs + [-1] * pad).reshape(n_seq, body)
    expected_doc = np.concatenate([docs_arr[:, :1], docs_arr], axis=1)
    np.testing.assert_array_equal(got["ids"], expected_ids)
    np.testing.assert_array_equal(got["mask"], expected_mask)
    np.testing.assert_array_equal(got["doc"], expected_doc)
    info = store.info("tokens/c")
    assert info["complete"] and info["n_seq"] == n_seq and info["n_counted"] == len(stream)
    assert got["ids"].dtype == np.int32


def test_document_mode_one_document_per_sequence(tmp_path, corpus_jsonl, tokenizer_dir, documents):
    store = Store(tmp_path / "s")
    run(_cfg(corpus_jsonl, tokenizer_dir, packing="document", ctx=64), store)
    got = _arrays(store)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    row = 0
    for k, d in enumerate(documents[:50]):
        toks = tok(d, add_special_tokens=False)["input_ids"]
        for start in range(0, len(toks), 63):
            window = toks[start : start + 63]
            assert got["ids"][row, 0] == tok.bos_token_id and not got["mask"][row, 0]
            np.testing.assert_array_equal(got["ids"][row, 1 : 1 + len(window)], window)
            assert (
                got["mask"][row, 1 : 1 + len(window)].all()
                and not got["mask"][row, 1 + len(window) :].any()
            )
            assert (got["doc"][row, : 1 + len(window)] == k).all()
            row += 1


def test_deterministic_and_rerun_does_nothing(tmp_path, corpus_jsonl, tokenizer_dir):
    a, b = Store(tmp_path / "a"), Store(tmp_path / "b")
    cfg = _cfg(corpus_jsonl, tokenizer_dir)
    first = run(cfg, a)
    run(cfg, b)
    for k, v in _arrays(a).items():
        np.testing.assert_array_equal(v, _arrays(b)[k])
    assert a.info("tokens/c")["corpus_fingerprint"] == b.info("tokens/c")["corpus_fingerprint"]
    chunk_file = tmp_path / "a" / "tokens/c/ids/c/0/0"
    before = chunk_file.stat().st_mtime_ns
    again = run(cfg, a)
    assert (
        first["chunks_written"] > 1 and again["chunks_written"] == 0 and again["already_complete"]
    )
    assert chunk_file.stat().st_mtime_ns == before


def test_config_change_refused_naming_keys_and_force_restarts(
    tmp_path, corpus_jsonl, tokenizer_dir
):
    store = Store(tmp_path / "s")
    run(_cfg(corpus_jsonl, tokenizer_dir), store)
    with pytest.raises(XprobeError, match=r"ctx: stored 32 != requested 48"):
        run(_cfg(corpus_jsonl, tokenizer_dir, ctx=48), store)
    assert store.array("tokens/c/ids").shape[1] == 32  # nothing lost
    run(_cfg(corpus_jsonl, tokenizer_dir, ctx=48), store, force=True)
    assert store.array("tokens/c/ids").shape[1] == 48
    # a runtime-only field (progress bar, batch size) is not a config change
    assert run(_cfg(corpus_jsonl, tokenizer_dir, ctx=48, batch_docs=7), store)["already_complete"]


KILL_SCRIPT = """
import sys
from pipeline.store import Store
from stages.tokenize import TokenizeConfig, run
run(TokenizeConfig(corpus="c", source=(sys.argv[2],), tokenizer=sys.argv[3], ctx=64, chunk_seqs=1,
                   batch_docs=8, progress=False), Store(sys.argv[1]))
"""


@pytest.mark.slow  # kills and resumes
def test_sigkill_then_resume_is_bit_identical(tmp_path, tokenizer_dir):
    from tests.helpers import make_documents, wait_for_markers

    corpus = tmp_path / "big.jsonl"
    corpus.write_text("".join(json.dumps({"text": d}) + "\n" for d in make_documents(400, seed=5)))
    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, str(killed), str(corpus), str(tokenizer_dir)],
        cwd=Path(__file__).parents[1],
    )
    done_dir = killed / "tokens/c/_done"
    wait_for_markers(done_dir, 20)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    store = Store(killed)
    n_before = len(store.done_chunks("tokens/c"))
    assert n_before >= 20 and not store.info("tokens/c").get("complete"), (
        "the kill must land partway"
    )
    resumed = run(
        TokenizeConfig(
            corpus="c",
            source=(str(corpus),),
            tokenizer=str(tokenizer_dir),
            ctx=64,
            chunk_seqs=1,
            progress=False,
        ),
        store,
    )
    assert 0 < resumed["chunks_written"] < store.info("tokens/c")["n_chunks"]
    ref = Store(tmp_path / "ref")
    run(
        TokenizeConfig(
            corpus="c",
            source=(str(corpus),),
            tokenizer=str(tokenizer_dir),
            ctx=64,
            chunk_seqs=1,
            progress=False,
        ),
        ref,
    )
    for k, v in _arrays(ref).items():
        got = _arrays(store)[k]
        assert got.shape == v.shape and got.tobytes() == v.tobytes(), k
    assert (
        store.info("tokens/c")["corpus_fingerprint"] == ref.info("tokens/c")["corpus_fingerprint"]
    )


def test_unwritten_chunk_is_an_error_not_fill(tmp_path, corpus_jsonl, tokenizer_dir):
    store = Store(tmp_path / "s")
    run(_cfg(corpus_jsonl, tokenizer_dir), store)
    os.remove(tmp_path / "s/tokens/c/_done/1.json")
    store.update_info("tokens/c", complete=False)
    with pytest.raises(XprobeError, match="chunk 1 of tokens/c is not written"):
        store.read_chunk("tokens/c/ids", 1)
    np.testing.assert_array_equal(
        store.read_chunk("tokens/c/ids", 0), store.array("tokens/c/ids")[:8]
    )
    # resuming redoes exactly the missing chunk
    assert run(_cfg(corpus_jsonl, tokenizer_dir), store)["chunks_written"] == 1


def test_formats_text_glob_parquet_and_hf_dataset(tmp_path, tokenizer_dir, documents):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = documents[:40]
    text_dir = tmp_path / "texts"
    text_dir.mkdir()
    for i, d in enumerate(docs):
        (text_dir / f"{i:03d}.txt").write_text(d)
    pq.write_table(pa.table({"body": docs}), tmp_path / "docs.parquet")
    datasets.Dataset.from_dict({"content": docs}).save_to_disk(str(tmp_path / "hf"))
    results = []
    for name, source, extra in [
        ("txt", str(text_dir / "*.txt"), {}),
        ("pq", str(tmp_path / "docs.parquet"), {"field": "body"}),
        ("hf", str(tmp_path / "hf"), {"field": "content"}),
    ]:
        store = Store(tmp_path / f"s_{name}")
        run(_cfg(source, tokenizer_dir, corpus=name, **extra), store)
        results.append(_arrays(store, name)["ids"])
    np.testing.assert_array_equal(results[0], results[1])
    np.testing.assert_array_equal(results[0], results[2])


def test_bad_input_gets_clear_errors(tmp_path, tokenizer_dir, corpus_jsonl):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(XprobeError, match="no documents"):
        run(_cfg(empty, tokenizer_dir), Store(tmp_path / "s1"))
    with pytest.raises(XprobeError, match=r"has no field 'body'"):
        run(_cfg(corpus_jsonl, tokenizer_dir, field="body"), Store(tmp_path / "s2"))
    with pytest.raises(XprobeError, match="matches no file"):
        run(_cfg(tmp_path / "nope*.txt", tokenizer_dir), Store(tmp_path / "s3"))
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"good text \xff\xfe more text")
    with pytest.raises(XprobeError, match="byte 10 is not valid UTF-8"):
        run(_cfg(bad, tokenizer_dir), Store(tmp_path / "s4"))
    store = Store(tmp_path / "s5")
    run(_cfg(bad, tokenizer_dir, encoding_errors="replace"), store)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids = _arrays(store)["ids"][0]
    mask = _arrays(store)["mask"][0]
    assert tok.decode(ids[mask][:-1]) == "good text \ufffd\ufffd more text"


def test_folder_and_compressed_sources_give_the_same_tokens(tmp_path, tokenizer_dir, documents):
    """A folder of .txt files is a source (its files sorted, hidden ones skipped, subfolders
    included); .gz / .bz2 / .xz / .zst text and jsonl read as their uncompressed selves."""
    import bz2
    import gzip
    import lzma

    from numcodecs import Zstd

    docs = documents[:30]
    folder = tmp_path / "texts"
    (folder / "sub").mkdir(parents=True)
    for i, d in enumerate(docs):
        (folder / ("sub" if i >= 20 else "") / f"{i:03d}.txt").write_text(d)
    (folder / ".hidden.txt").write_text("never read")
    jsonl = "".join(json.dumps({"text": d}) + "\n" for d in docs).encode()
    compressors = {"gz": gzip.compress, "bz2": bz2.compress, "xz": lzma.compress}
    compressors["zst"] = lambda b: bytes(Zstd().encode(b))
    for ext, compress in compressors.items():
        (tmp_path / f"docs.jsonl.{ext}").write_bytes(compress(jsonl))
    (tmp_path / "blocks.txt.gz").write_bytes(gzip.compress("\n\n".join(docs).encode()))
    sources = [("folder", str(folder), {}), ("glob", str(folder / "**" / "*.txt"), {})]
    sources += [(ext, str(tmp_path / f"docs.jsonl.{ext}"), {}) for ext in compressors]
    sources += [("txtgz", str(tmp_path / "blocks.txt.gz"), {"text_split": "blank_line"})]
    results = {}
    for name, source, extra in sources:
        store = Store(tmp_path / f"s_{name}")
        run(_cfg(source, tokenizer_dir, corpus=name, **extra), store)
        results[name] = _arrays(store, name)["ids"]
    for name, ids in results.items():
        np.testing.assert_array_equal(ids, results["folder"], err_msg=name)


def test_binary_input_is_named_not_replaced(tmp_path, tokenizer_dir, corpus_jsonl):
    import gzip

    disguised = tmp_path / "docs.jsonl"  # gzip data without the .gz extension
    disguised.write_bytes(gzip.compress(corpus_jsonl.read_bytes()))
    for errors in ("strict", "replace"):
        with pytest.raises(XprobeError, match="looks like gzip data") as e:
            run(_cfg(disguised, tokenizer_dir, encoding_errors=errors), Store(tmp_path / errors))
        assert "encoding_errors" not in str(e.value)
    blob = tmp_path / "weights.txt"
    blob.write_bytes(bytes(range(256)) * 4)
    with pytest.raises(XprobeError, match="NUL bytes") as e:
        run(_cfg(blob, tokenizer_dir, encoding_errors="replace"), Store(tmp_path / "blob"))


def test_max_tokens_counts_tokens_not_padded_positions(tmp_path, tokenizer_dir, documents):
    """One short line per sequence (``packing = "document"``) is mostly padding: ``max_tokens``
    stops at that many counted tokens, not positions."""
    lines = tmp_path / "lines.txt"
    lines.write_text("\n".join(" ".join(d.split()[:3]) for d in documents))
    store = Store(tmp_path / "s")
    cfg = _cfg(lines, tokenizer_dir, text_split="line", packing="document", max_tokens=500)
    run(cfg, store)
    mask = _arrays(store)["mask"]
    assert 500 <= mask.sum() < 500 + mask[-1].sum()  # the last sequence reaches the cap
    assert mask.sum() < 0.5 * mask.size  # mostly padding: a position cap would stop far earlier
    info = store.info("tokens/c")
    assert info["n_counted"] == mask.sum() and info["n_docs"] == len(mask)

"""Store-level guarantees: locks between concurrent runs, checksums, format version."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from pipeline.errors import XprobeError
from pipeline.store import Store
from stages.tokenize import TokenizeConfig, run


def _cfg(corpus_jsonl, tokenizer_dir) -> TokenizeConfig:
    return TokenizeConfig(
        corpus="c",
        source=(str(corpus_jsonl),),
        tokenizer=str(tokenizer_dir),
        ctx=32,
        chunk_seqs=8,
        progress=False,
    )


def test_second_run_on_a_held_unit_is_refused_naming_the_holder(
    tmp_path, corpus_jsonl, tokenizer_dir
):
    store = Store(tmp_path / "s")
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        lock = tmp_path / "s/tokens/c.lock"
        lock.parent.mkdir(parents=True)
        lock.write_text(
            json.dumps(
                {
                    "pid": holder.pid,
                    "host": __import__("socket").gethostname(),
                    "stage": "tokenize",
                    "since": "now",
                }
            )
        )
        with pytest.raises(
            XprobeError, match=rf"being written by another run \(stage 'tokenize', pid {holder.pid}"
        ):
            run(_cfg(corpus_jsonl, tokenizer_dir), store)
        assert not store.has("tokens/c/ids")
    finally:
        holder.kill()
        holder.wait()
    # the holder is dead now: its lock is stale and is taken over
    assert run(_cfg(corpus_jsonl, tokenizer_dir), store)["chunks_written"] > 0
    assert not lock.exists()


def test_corrupted_chunk_is_detected_by_checksum(tmp_path, corpus_jsonl, tokenizer_dir):
    store = Store(tmp_path / "s")
    run(_cfg(corpus_jsonl, tokenizer_dir), store)
    good = store.read_chunk("tokens/c/ids", 2, verify=True)
    reference = Store(tmp_path / "ref")
    run(_cfg(corpus_jsonl, tokenizer_dir), reference)
    # overwrite chunk 2's file with chunk 3's (a valid zstd file holding the wrong data)
    src = tmp_path / "s/tokens/c/ids/c/3/0"
    (tmp_path / "s/tokens/c/ids/c/2/0").write_bytes(src.read_bytes())
    with pytest.raises(XprobeError, match="does not match its checksum"):
        store.read_chunk("tokens/c/ids", 2, verify=True)
    assert good.tobytes() == reference.read_chunk("tokens/c/ids", 2).tobytes()


def test_store_from_a_newer_xprobe_is_refused(tmp_path):
    store = Store(tmp_path / "s")
    store.root.attrs["xprobe_store"] = 99
    with pytest.raises(XprobeError, match="newer xprobe"):
        Store(tmp_path / "s", mode="r")


def test_remote_store_is_read_only(tmp_path):
    with pytest.raises(XprobeError, match="remote"):
        Store("s3://bucket/cache", mode="a")


def test_http_and_zip_stores_read_the_same_data(tmp_path, corpus_jsonl, tokenizer_dir):
    import functools
    import http.server
    import threading

    import numpy as np
    from click.testing import CliRunner

    from pipeline.cli import cli

    local = Store(tmp_path / "s")
    run(_cfg(corpus_jsonl, tokenizer_dir), local)
    expected = local.read_chunk("tokens/c/ids", 3)

    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(tmp_path / "s"))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}"
        remote = Store(url, mode="r")
        np.testing.assert_array_equal(remote.read_chunk("tokens/c/ids", 3), expected)
        assert (
            remote.info("tokens/c")["corpus_fingerprint"]
            == local.info("tokens/c")["corpus_fingerprint"]
        )
        assert remote.read_text("tokens/c/tokenizer.json") == local.read_text(
            "tokens/c/tokenizer.json"
        )
        info = CliRunner().invoke(cli, ["info", url])
        assert info.exit_code == 0 and "tokens/c" in info.output and "corpus=c" in info.output
    finally:
        server.shutdown()

    packed = CliRunner().invoke(cli, ["pack", str(tmp_path / "s"), str(tmp_path / "cache.zip")])
    assert packed.exit_code == 0, packed.output
    zipped = Store(tmp_path / "cache.zip", mode="r")
    np.testing.assert_array_equal(zipped.read_chunk("tokens/c/ids", 3, verify=True), expected)
    assert zipped.done_chunks("tokens/c") == local.done_chunks("tokens/c")
    assert zipped.chunk_record("tokens/c", 3) == local.chunk_record("tokens/c", 3)

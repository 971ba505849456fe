"""Activations stage: bit-exact against output_hidden_states, truncation, dtypes, refusals, resume."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from pipeline.errors import XprobeError
from pipeline.store import Store
from pipeline.store.reader import iter_chunks, load_acts
from stages.activations import ActivationsConfig, ActivationsStage, run
from stages.tokenize import TokenizeConfig
from stages.tokenize import run as tokenize
from tests.helpers import wait_for_markers

CTX, CHUNK_SEQS = 32, 4


def _tokenized(path: Path, corpus_jsonl, tokenizer_dir, max_tokens=1600) -> Store:
    store = Store(path)
    tokenize(
        TokenizeConfig(
            corpus="c",
            source=(str(corpus_jsonl),),
            tokenizer=str(tokenizer_dir),
            ctx=CTX,
            chunk_seqs=CHUNK_SEQS,
            max_tokens=max_tokens,
            progress=False,
        ),
        store,
    )
    return store


def _acts_cfg(model_dir, **kw) -> ActivationsConfig:
    base = dict(
        corpus="c",
        model=str(model_dir),
        name="m",
        layers=(0, 1),
        device="cpu",
        batch_seqs=3,
        progress=False,
    )
    base.update(kw)
    return ActivationsConfig(**base)


def _stored(store: Store, hook: str) -> np.ndarray:
    return store.array(f"acts/c/m/{hook}/x")[:]


@pytest.mark.parametrize("model_fixture", ["gpt2_dir", "llama_dir"])
def test_stored_activations_equal_output_hidden_states(
    tmp_path, corpus_jsonl, tokenizer_dir, model_fixture, request
):
    model_dir = request.getfixturevalue(model_fixture)
    store = _tokenized(tmp_path / "s", corpus_jsonl, tokenizer_dir)
    run(
        _acts_cfg(
            model_dir,
            hooks=(
                "blocks.0.hook_resid_pre",
                "blocks.0.hook_resid_post",
                "blocks.1.hook_resid_pre",
                "blocks.1.hook_resid_post",
            ),
        ),
        store,
    )
    ids = torch.from_numpy(store.array("tokens/c/ids")[:].astype(np.int64))
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    pre0, post0 = [], []
    with torch.inference_mode():
        for chunk in ids.split(CHUNK_SEQS):
            for batch in chunk.split(3):  # the stage's batching: bit-exactness is per batch shape
                hs = model(batch, output_hidden_states=True).hidden_states
                pre0.append(hs[0].reshape(-1, 64))
                post0.append(hs[1].reshape(-1, 64))
    assert np.array_equal(_stored(store, "blocks.0.hook_resid_pre"), torch.cat(pre0).numpy())
    assert np.array_equal(_stored(store, "blocks.0.hook_resid_post"), torch.cat(post0).numpy())
    # resid_pre of layer 1 is the input of block 1, i.e. resid_post of layer 0
    assert np.array_equal(_stored(store, "blocks.1.hook_resid_pre"), torch.cat(post0).numpy())
    info = store.info("acts/c/m/blocks.1.hook_resid_post")
    assert (
        info["complete"]
        and info["d_model"] == 64
        and info["dtype"] == "float32"
        and info["layer"] == 1
    )
    assert info["tokenizer_fingerprint"] == store.info("tokens/c")["tokenizer_fingerprint"]


def test_last_block_resid_post_is_block_output_and_truncation_is_exact(
    tmp_path, corpus_jsonl, tokenizer_dir, gpt2_dir
):
    store = _tokenized(tmp_path / "s", corpus_jsonl, tokenizer_dir, max_tokens=300)
    run(_acts_cfg(gpt2_dir, layers=(1,)), store)
    run(_acts_cfg(gpt2_dir, name="trunc", layers=(0,)), store)
    ids = torch.from_numpy(store.array("tokens/c/ids")[:].astype(np.int64))
    model = AutoModelForCausalLM.from_pretrained(gpt2_dir, dtype=torch.float32).eval()
    outs = []
    handle = model.transformer.h[1].register_forward_hook(
        lambda m, a, o: outs.append(o[0] if isinstance(o, tuple) else o)
    )
    full0, final = [], []
    with torch.inference_mode():
        for chunk in ids.split(CHUNK_SEQS):
            for batch in chunk.split(3):
                hs = model(batch, output_hidden_states=True).hidden_states
                full0.append(hs[1].reshape(-1, 64))
                final.append(hs[-1].reshape(-1, 64))
    handle.remove()
    last = _stored(store, "blocks.1.hook_resid_post")
    assert np.array_equal(last, torch.cat(outs).reshape(-1, 64).numpy())
    # HF's hidden_states[-1] is after the final norm; ours is the residual stream before it
    final = torch.cat(final)
    assert not np.allclose(last, final.numpy())
    with torch.inference_mode():
        assert torch.equal(model.transformer.ln_f(torch.from_numpy(last)), final)
    # a layer-0-only run stops after block 0 and still equals the full forward's hidden state
    assert np.array_equal(
        store.array("acts/c/trunc/blocks.0.hook_resid_post/x")[:], torch.cat(full0).numpy()
    )


def test_bfloat16_round_trip_is_exact(tmp_path, corpus_jsonl, tokenizer_dir, llama_dir):
    store = _tokenized(tmp_path / "s", corpus_jsonl, tokenizer_dir, max_tokens=300)
    run(_acts_cfg(llama_dir, layers=(0,), dtype="bfloat16"), store)
    unit = "acts/c/m/blocks.0.hook_resid_post"
    assert store.info(unit)["dtype"] == "bfloat16" and store.array(f"{unit}/x").dtype == np.uint16
    ids = torch.from_numpy(store.array("tokens/c/ids")[:].astype(np.int64))
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.bfloat16).eval()
    with torch.inference_mode():
        ref = torch.cat(
            [
                model(b, output_hidden_states=True).hidden_states[1].reshape(-1, 64)
                for c in ids.split(CHUNK_SEQS)
                for b in c.split(3)
            ]
        )
    got = torch.cat([load_acts(store, unit, i) for i in range(store.info(unit)["n_chunks"])])
    assert got.dtype == torch.bfloat16
    assert torch.equal(got.view(torch.int16), ref.view(torch.int16))


def test_mismatched_tokenizer_refused_naming_a_token(
    tmp_path, corpus_jsonl, tokenizer_dir, other_tokenizer_dir, gpt2_dir
):
    from transformers import AutoTokenizer

    other_model = tmp_path / "gpt2_other_tok"
    shutil.copytree(gpt2_dir, other_model)
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (other_model / f).unlink(missing_ok=True)
    AutoTokenizer.from_pretrained(other_tokenizer_dir).save_pretrained(other_model)
    store = _tokenized(tmp_path / "s", corpus_jsonl, tokenizer_dir, max_tokens=300)
    with pytest.raises(
        XprobeError,
        match=r"cannot read tokens/c: \d+ of the \d+ ids the corpus uses mean other tokens: id \d+ is '.*' in the corpus tokenizer but .* in",
    ):
        run(_acts_cfg(other_model), store)
    assert not store.has("acts")


def test_missing_layer_and_long_ctx_refused_before_writing(
    tmp_path, corpus_jsonl, tokenizer_dir, gpt2_dir
):
    store = _tokenized(tmp_path / "s", corpus_jsonl, tokenizer_dir, max_tokens=300)
    with pytest.raises(XprobeError, match=r"layer 5 does not exist: .* has layers 0..1"):
        run(_acts_cfg(gpt2_dir, layers=(5,)), store)
    long = Store(tmp_path / "long")
    tokenize(
        TokenizeConfig(
            corpus="c",
            source=(str(corpus_jsonl),),
            tokenizer=str(tokenizer_dir),
            ctx=256,
            max_tokens=600,
            progress=False,
        ),
        long,
    )
    with pytest.raises(XprobeError, match="ctx 256 .* exceeds .* 128 positions"):
        run(_acts_cfg(gpt2_dir), long)
    assert not store.has("acts") and not long.has("acts")


def test_float16_overflow_is_located_not_stored(tmp_path, corpus_jsonl, tokenizer_dir, gpt2_dir):
    big = tmp_path / "gpt2_big"
    model = AutoModelForCausalLM.from_pretrained(gpt2_dir)
    with torch.no_grad():
        model.transformer.wpe.weight[0] += 1e5  # position 0 overflows float16
    model.save_pretrained(big)
    for f in os.listdir(gpt2_dir):
        if f.startswith(("tokenizer", "special", "vocab", "merges")):
            shutil.copy(Path(gpt2_dir) / f, big / f)
    store = _tokenized(tmp_path / "s", corpus_jsonl, tokenizer_dir, max_tokens=300)
    with pytest.raises(
        XprobeError, match="non-finite activation .* chunk 0 .* sequence 0 of the chunk, position 0"
    ):
        run(_acts_cfg(big, layers=(0,), dtype="float16"), store)
    assert store.done_chunks("acts/c/m/blocks.0.hook_resid_post") == set()


KILL_SCRIPT = """
import sys, time
from pipeline.lifecycle import run as run_stage
from pipeline.store import Store
from stages.activations import ActivationsConfig, ActivationsStage

class Slow(ActivationsStage):  # leaves time to kill it between chunks
    def compute(self, store, todo):
        for result in super().compute(store, todo):
            yield result
            time.sleep(0.3)

cfg = ActivationsConfig(corpus="c", model=sys.argv[2], name="m", layers=(0, 1), device="cpu",
                        batch_seqs=3, progress=False)
run_stage(Slow(cfg), Store(sys.argv[1]), progress=False)
"""


@pytest.mark.slow  # kills and resumes
def test_sigkill_then_resume_is_bit_identical(tmp_path, corpus_jsonl, tokenizer_dir, llama_dir):
    killed = _tokenized(tmp_path / "killed", corpus_jsonl, tokenizer_dir, max_tokens=2000)
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, str(tmp_path / "killed"), str(llama_dir)],
        cwd=Path(__file__).parents[1],
    )
    done_dir = tmp_path / "killed/acts/c/m/blocks.1.hook_resid_post/_done"
    wait_for_markers(done_dir, 1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    units = ["acts/c/m/blocks.0.hook_resid_post", "acts/c/m/blocks.1.hook_resid_post"]
    n_chunks = killed.info("tokens/c")["n_chunks"]
    assert 1 <= len(killed.done_chunks(units[1])) < n_chunks, "the kill must land partway"
    assert not killed.info(units[1]).get("complete")
    resumed = run(_acts_cfg(llama_dir), killed)
    assert 0 < resumed["chunks_written"] < n_chunks
    ref = _tokenized(tmp_path / "ref", corpus_jsonl, tokenizer_dir, max_tokens=2000)
    run(_acts_cfg(llama_dir), ref)
    for unit in units:
        assert killed.info(unit)["complete"]
        for i in range(n_chunks):
            got, want = killed.read_chunk(f"{unit}/x", i), ref.read_chunk(f"{unit}/x", i)
            assert np.array_equal(got, want)
            assert np.array_equal(got.view(np.uint32), want.view(np.uint32))  # bits, incl. -0.0
            for name in ("norm_hist", "norm_max"):
                assert np.array_equal(
                    killed.read_chunk(f"{unit}/{name}", i), ref.read_chunk(f"{unit}/{name}", i)
                )
        assert killed.info(unit)["norms"] == ref.info(unit)["norms"]


def test_forward_stops_after_deepest_block(gpt2_dir, llama_dir):
    from stages.activations import find_blocks, forward_capture

    for model_dir in (gpt2_dir, llama_dir):
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        blocks = find_blocks(model, 2)
        calls = []
        handle = blocks[1].register_forward_pre_hook(lambda m, a, calls=calls: calls.append(1))
        ids = torch.arange(2 * CTX).reshape(2, CTX) % 300
        acts = forward_capture(model, blocks, ids, [(0, "post"), (0, "pre")])
        assert calls == []  # block 1 never ran
        acts = forward_capture(model, blocks, ids, [(1, "pre")])
        assert calls == [1]  # reached block 1's input, stopped before computing it
        handle.remove()
        with torch.inference_mode():
            hs = model(ids, output_hidden_states=True).hidden_states
        assert torch.equal(acts[(1, "pre")], hs[1])


def test_reader_yields_stored_chunks_with_mask_and_ids(
    tmp_path, corpus_jsonl, tokenizer_dir, gpt2_dir
):
    store = _tokenized(tmp_path / "s", corpus_jsonl, tokenizer_dir, max_tokens=600)
    run(_acts_cfg(gpt2_dir, layers=(0,)), store)
    unit = "acts/c/m/blocks.0.hook_resid_post"
    chunks = list(iter_chunks(store, "c", "m", "blocks.0.hook_resid_post", prefetch=2))
    assert [c.index for c in chunks] == list(range(store.info(unit)["n_chunks"]))
    acts = torch.cat([c.acts for c in chunks]).numpy()
    assert np.array_equal(acts, store.array(f"{unit}/x")[:])
    assert np.array_equal(
        torch.cat([c.mask for c in chunks]).numpy(), store.array("tokens/c/mask")[:].reshape(-1)
    )
    assert np.array_equal(
        torch.cat([c.ids for c in chunks]).numpy(), store.array("tokens/c/ids")[:].reshape(-1)
    )
    assert [c.index for c in iter_chunks(store, unit, chunks=[2, 0])] == [2, 0]
    (tmp_path / "s" / unit / "_done/1.json").unlink()
    store.update_info(unit, complete=False)
    with pytest.raises(XprobeError, match="chunk 1 of .* is not written"):
        list(iter_chunks(store, unit))


def test_reader_restores_bfloat16(tmp_path, corpus_jsonl, tokenizer_dir, gpt2_dir):
    store = _tokenized(tmp_path / "s", corpus_jsonl, tokenizer_dir, max_tokens=300)
    run(_acts_cfg(gpt2_dir, layers=(0,), hook="resid_pre", dtype="bfloat16"), store)
    unit = "acts/c/m/blocks.0.hook_resid_pre"
    chunks = list(iter_chunks(store, "c", "m", "blocks.0.hook_resid_pre"))
    acts = torch.cat([c.acts for c in chunks])
    assert acts.dtype == torch.bfloat16 and acts.shape == (store.info(unit)["n_tok"], 64)
    assert np.array_equal(
        acts.view(torch.int16).numpy().view(np.uint16), store.array(f"{unit}/x")[:]
    )


def test_sharded_checkpoint_with_device_map_equals_unsharded_load(
    tmp_path, corpus_jsonl, tokenizer_dir, llama_dir
):
    from transformers import AutoTokenizer

    sharded = tmp_path / "sharded"
    AutoModelForCausalLM.from_pretrained(llama_dir).save_pretrained(sharded, max_shard_size="100KB")
    AutoTokenizer.from_pretrained(llama_dir).save_pretrained(sharded)
    assert (sharded / "model.safetensors.index.json").exists()
    assert len(list(sharded.glob("model-*.safetensors"))) >= 3
    assert not (sharded / "model.safetensors").exists()
    store = _tokenized(tmp_path / "s", corpus_jsonl, tokenizer_dir, max_tokens=300)
    run(_acts_cfg(llama_dir, hooks=("blocks.0.hook_resid_post", "blocks.1.hook_resid_post")), store)
    run(
        _acts_cfg(
            sharded,
            name="sharded",
            hooks=("blocks.0.hook_resid_post", "blocks.1.hook_resid_post"),
            device_map="auto",
            max_memory=("cpu=2GiB",),
        ),
        store,
    )
    for hook in ("blocks.0.hook_resid_post", "blocks.1.hook_resid_post"):
        assert np.array_equal(store.array(f"acts/c/sharded/{hook}/x")[:], _stored(store, hook))
    # too little memory for the whole model: accelerate keeps the embedding in memory and the
    # blocks on disk, loading each for its forward (a 70B B on too few GPUs works the same way)
    tight = dict(device_map="auto", max_memory=("cpu=350KB",), offload_folder=str(tmp_path / "off"))
    dispatched = ActivationsStage(_acts_cfg(sharded, **tight)).load_model()
    assert dispatched.hf_device_map["model.embed_tokens"] == "cpu"
    assert dispatched.hf_device_map["model.layers"] == "disk"
    run(_acts_cfg(sharded, name="offloaded", layers=(0, 1), **tight), store)
    for hook in ("blocks.0.hook_resid_post", "blocks.1.hook_resid_post"):
        assert np.array_equal(store.array(f"acts/c/offloaded/{hook}/x")[:], _stored(store, hook))

    # attn_implementation reaches the model (and the identity): eager equals HF's eager forward
    run(_acts_cfg(llama_dir, name="eager", layers=(0,), attn_implementation="eager"), store)
    assert store.info("acts/c/eager/blocks.0.hook_resid_post")["config"]["attn_implementation"] == (
        "eager"
    )
    model = AutoModelForCausalLM.from_pretrained(
        llama_dir, dtype=torch.float32, attn_implementation="eager"
    ).eval()
    assert model.config._attn_implementation == "eager"
    ids = torch.from_numpy(store.array("tokens/c/ids")[:].astype(np.int64))
    with torch.inference_mode():
        ref = torch.cat(
            [
                model(b, output_hidden_states=True).hidden_states[1].reshape(-1, 64)
                for c in ids.split(CHUNK_SEQS)
                for b in c.split(3)
            ]
        )
    assert np.array_equal(store.array("acts/c/eager/blocks.0.hook_resid_post/x")[:], ref.numpy())

    with pytest.raises(XprobeError, match="max_memory entry '70GiB' is not DEVICE=SIZE"):
        run(_acts_cfg(llama_dir, device_map="auto", max_memory=("70GiB",)), store)
    with pytest.raises(XprobeError, match="max_memory needs device_map"):
        run(_acts_cfg(llama_dir, max_memory=("cpu=1GiB",)), store)

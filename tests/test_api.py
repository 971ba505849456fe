"""The Python entry point: ``import pipeline`` runs a config (TOML or dict) and opens results."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

import pipeline


def test_import_is_light_and_exports_are_listed():
    code = "import sys, pipeline; print('torch' in sys.modules, sorted(pipeline.__all__) == sorted(dir(pipeline)))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "True"]
    for name in pipeline.__all__:
        assert getattr(pipeline, name) is not None
    with pytest.raises(AttributeError):
        pipeline.nothing_here  # noqa: B018


def test_run_a_dict_then_read_what_it_wrote(tmp_path, corpus_jsonl, tokenizer_dir, gpt2_dir):
    config = {
        "store": str(tmp_path / "s"),
        "tokenize": {
            "corpus": "c",
            "source": [str(corpus_jsonl)],
            "tokenizer": str(tokenizer_dir),
            "ctx": 32,
            "chunk_seqs": 4,
            "max_tokens": 300,
        },
        "activations": [{"corpus": "c", "model": str(gpt2_dir), "name": "A", "layers": [-1]}],
    }
    summaries = pipeline.run(config, progress=False)
    assert [s["stage"] for s in summaries] == ["tokenize", "activations"]
    again = pipeline.run(config, progress=False)
    assert all(s["already_complete"] for s in again)
    store = pipeline.open_store(tmp_path / "s")
    x = store.array("acts/c/A/blocks.1.hook_resid_post/x")[:]
    chunks = list(pipeline.iter_activations(store, "c", "A", "blocks.1.hook_resid_post"))
    np.testing.assert_array_equal(np.concatenate([c.acts.numpy() for c in chunks]), x)
    mask = store.array("tokens/c/mask")[:].reshape(-1)
    np.testing.assert_array_equal(np.concatenate([c.mask.numpy() for c in chunks]), mask)
    with pytest.raises(pipeline.XprobeError, match="unknown config section"):
        pipeline.run({**config, "tokenise": {}})


def test_run_stage_from_a_config_object(tmp_path, corpus_jsonl, tokenizer_dir):
    cfg = pipeline.TokenizeConfig(
        corpus="c", source=corpus_jsonl, tokenizer=tokenizer_dir, ctx=32, progress=False
    )
    summary = pipeline.run_stage(cfg, tmp_path / "s")
    assert summary["stage"] == "tokenize" and summary["chunks_written"] > 0
    with pytest.raises(pipeline.XprobeError, match="ctx must be"):
        pipeline.TokenizeConfig(corpus="c", source=corpus_jsonl, tokenizer=tokenizer_dir, ctx=0)

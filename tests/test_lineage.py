"""Lineage: a unit whose inputs changed is stale, never "already complete".

A small store (tokens, A's activations, an SAE's features, a fit of A on itself) built with the
real stages from a model folder and an SAE folder copied into the test's directory; then the
SAE's weights, the model's weights or the corpus change under the same paths. ``status`` must
mark every downstream unit stale, ``run`` must refuse naming the unit, the input and the command,
and ``--rebuild-stale`` must recompute exactly the stale units, ending equal to a fresh store.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from pipeline.cli import cli
from pipeline.errors import XprobeError
from pipeline.lineage import files_fingerprint
from pipeline.store import Store
from tests.helpers import pipeline_config, save_standard_sae

HOOK = "blocks.0.hook_resid_post"
UNITS = ["tokens/c", f"acts/c/a/{HOOK}", "feats/c/sae_a", "probes/B"]


@pytest.fixture
def built(tmp_path, corpus_jsonl, tokenizer_dir, gpt2_dir, monkeypatch):
    """A complete store; the model, SAE and corpus are copies this test may overwrite."""
    monkeypatch.setenv("XPROBE_CACHE_DIR", str(tmp_path / "hash-cache"))
    model = tmp_path / "model"
    shutil.copytree(gpt2_dir, model)
    sae = save_standard_sae(tmp_path / "sae", hook=HOOK, seed=0)
    corpus = tmp_path / "docs.jsonl"
    shutil.copy(corpus_jsonl, corpus)
    config = pipeline_config(tmp_path, corpus, tokenizer_dir, model, sae, hook=HOOK)
    result = CliRunner().invoke(cli, ["run", str(config)])
    assert result.exit_code == 0, result.output
    return {
        "config": config,
        "store": tmp_path / "store",
        "model": model,
        "sae": sae,
        "corpus": corpus,
    }


def _run(*args: str):
    return CliRunner().invoke(cli, list(args))


def _stale_units(store: Path) -> dict[str, str]:
    out = _run("status", str(store)).output
    return {
        line.split()[1]: line.split("STALE: ", 1)[1] for line in out.splitlines() if "STALE" in line
    }


def _probes(store: Path) -> dict[str, np.ndarray]:
    s = Store(store, mode="r")
    return {
        k: s.array(f"probes/B/{HOOK}/{k}")[:] for k in ("direction", "r2_held_out", "intercept")
    }


def _fresh_equals(built, tmp_path) -> None:
    """A fresh store from the same (changed) inputs gives the same probes and features."""
    fresh = tmp_path / "fresh"
    config = built["config"]
    result = _run("run", str(config), "--store", str(fresh))
    assert result.exit_code == 0, result.output
    got, want = _probes(built["store"]), _probes(fresh)
    for key in want:
        assert np.array_equal(got[key], want[key]), key
    a, b = Store(built["store"], mode="r"), Store(fresh, mode="r")
    for unit in UNITS:
        assert a.info(unit)["content_fingerprint"] == b.info(unit)["content_fingerprint"], unit


def _recomputed(output: str) -> set[str]:
    """Units a ``run`` output says were written (not already complete)."""
    done = set()
    for line in output.splitlines():
        if ": wrote " in line:
            done.update(u.strip() for u in line.split(" to ", 1)[1].split(","))
    return done


def test_sae_weights_changed_under_the_same_path(built, tmp_path):
    store, config = built["store"], built["config"]
    before = _probes(store)
    save_standard_sae(built["sae"], hook=HOOK, seed=1)  # another SAE, same folder
    stale = _stale_units(store)
    assert set(stale) == {"feats/c/sae_a", "probes/B"}
    assert "the sae" in stale["feats/c/sae_a"] and "changed" in stale["feats/c/sae_a"]
    assert "feats/c/sae_a is stale" in stale["probes/B"]
    refused = _run("run", str(config))
    assert refused.exit_code != 0
    message = str(refused.exception)
    assert "feats/c/sae_a is stale" in message and str(built["sae"]) in message
    assert "--force" in message and "--rebuild-stale" in message
    rebuilt = _run("run", str(config), "--rebuild-stale")
    assert rebuilt.exit_code == 0, rebuilt.output
    assert _recomputed(rebuilt.output) == {"feats/c/sae_a", "probes/B"}
    assert "tokenize: already complete" in rebuilt.output
    assert not _stale_units(store)
    assert not np.array_equal(_probes(store)["direction"], before["direction"])
    _fresh_equals(built, tmp_path)


def test_issue_scenario_features_forced_then_fit_is_stale_not_complete(built):
    """The reported bug: features recomputed with --force after the SAE changed; the fit must not
    be served as "already complete"."""
    store, config = built["store"], built["config"]
    save_standard_sae(built["sae"], hook=HOOK, seed=2)
    forced = _run("features", "--config", str(config), "--force")
    assert forced.exit_code == 0, forced.output
    refused = _run("run", str(config))
    assert refused.exit_code != 0 and "already complete (probes/B)" not in refused.output
    assert str(refused.exception).startswith(
        "probes/B is stale: feats/c/sae_a changed since it was computed"
    )
    assert set(_stale_units(store)) == {"probes/B"}


def test_model_weights_changed_under_the_same_path(built, tmp_path):
    from safetensors.torch import load_file, save_file

    store, config = built["store"], built["config"]
    weights = built["model"] / "model.safetensors"
    tensors = load_file(weights)
    g = torch.Generator().manual_seed(7)
    tensors = {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in tensors.items()}
    save_file(tensors, weights, metadata={"format": "pt"})
    stale = _stale_units(store)
    assert set(stale) == {f"acts/c/a/{HOOK}", "feats/c/sae_a", "probes/B"}
    assert "the model" in stale[f"acts/c/a/{HOOK}"]
    refused = _run("fit", "--config", str(config))  # the fit alone: its input is stale upstream
    assert refused.exit_code != 0
    assert "probes/B is stale: its input" in str(refused.exception)
    assert f"Recompute acts/c/a/{HOOK}" in str(refused.exception)
    rebuilt = _run("run", str(config), "--rebuild-stale")
    assert rebuilt.exit_code == 0, rebuilt.output
    assert _recomputed(rebuilt.output) == {f"acts/c/a/{HOOK}", "feats/c/sae_a", "probes/B"}
    _fresh_equals(built, tmp_path)


def test_upstream_recomputed_with_force_makes_downstream_stale(built, tmp_path):
    store, config = built["store"], built["config"]
    # the same inputs recomputed: the same bytes, so nothing downstream is stale
    again = _run("tokenize", "--config", str(config), "--force")
    assert again.exit_code == 0, again.output
    assert not _stale_units(store)
    assert "already complete" in _run("run", str(config)).output
    # other corpus text under the same path, recomputed with --force: everything downstream
    lines = built["corpus"].read_text().splitlines()
    built["corpus"].write_text("\n".join(lines[::-1]) + "\n")
    assert set(_stale_units(store)) == set(UNITS)  # tokens: its corpus files changed
    forced = _run("tokenize", "--config", str(config), "--force")
    assert forced.exit_code == 0, forced.output
    stale = _stale_units(store)
    assert set(stale) == set(UNITS[1:])
    assert "tokens/c changed" in stale[f"acts/c/a/{HOOK}"]
    rebuilt = _run("run", str(config), "--rebuild-stale")
    assert rebuilt.exit_code == 0, rebuilt.output
    assert _recomputed(rebuilt.output) == set(UNITS[1:])
    _fresh_equals(built, tmp_path)


def test_a_first_attempt_that_wrote_nothing_restarts_with_the_new_config(
    tmp_path, corpus_jsonl, tokenizer_dir
):
    from stages.tokenize import TokenizeConfig, run

    store = Store(tmp_path / "store")

    def cfg(field: str) -> TokenizeConfig:
        return TokenizeConfig(
            corpus="c",
            source=(str(corpus_jsonl),),
            tokenizer=str(tokenizer_dir),
            field=field,
            ctx=32,
            progress=False,
        )

    with pytest.raises(XprobeError):
        run(cfg("body"), store)  # no such field: fails before any chunk
    assert store.has("tokens/c") and not store.done_chunks("tokens/c")
    summary = run(cfg("text"), store)  # the corrected command, no --force needed
    assert summary["chunks_written"] > 0 and store.info("tokens/c")["config"]["field"] == "text"


def test_folder_fingerprint_sees_bytes_not_timestamps(tmp_path, monkeypatch):
    import os

    monkeypatch.setenv("XPROBE_CACHE_DIR", str(tmp_path / "cache"))
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.safetensors").write_bytes(b"\x00" * 4096)
    (folder / "README.md").write_text("notes")
    first = files_fingerprint([folder])
    (folder / "README.md").write_text("other notes")  # docs do not change what is computed
    assert files_fingerprint([folder]) == first
    st = (folder / "model.safetensors").stat()
    data = bytearray(b"\x00" * 4096)
    data[2048] = 1  # one byte, same size, mtime put back: the inode's ctime still moves
    (folder / "model.safetensors").write_bytes(bytes(data))
    os.utime(folder / "model.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns))
    assert files_fingerprint([folder]) != first
    assert files_fingerprint([tmp_path / "gone"]) is None  # unknown, never "changed"


HUB_SCRIPT = """
import sys
from pipeline.cli import main
sys.argv = ["xprobe", *sys.argv[1:]]
main()
"""


@pytest.mark.slow  # waits on hub retries
def test_hub_model_identity_is_its_commit(tmp_path, corpus_jsonl, tokenizer_dir, gpt2_dir):
    """A hub model (offline, from a Hugging Face cache laid out as the hub leaves it): its
    identity is the commit ``refs/main`` resolves to, so a new commit makes its units stale."""
    cache = tmp_path / "hf"
    repo = cache / "models--org--tiny"

    def publish(commit: str, model_dir: Path) -> None:
        snap = repo / "snapshots" / commit
        shutil.copytree(model_dir, snap)
        (repo / "refs").mkdir(parents=True, exist_ok=True)
        (repo / "refs" / "main").write_text(commit)

    publish("a" * 40, gpt2_dir)
    store = tmp_path / "store"
    env = {
        **__import__("os").environ,
        "HF_HUB_OFFLINE": "1",
        "HF_HUB_CACHE": str(cache),
        "XPROBE_CACHE_DIR": str(tmp_path / "hc"),
    }

    def xprobe(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "-c", HUB_SCRIPT, *args], capture_output=True, text=True, env=env
        )

    tok = xprobe(
        "tokenize", "--store", str(store), "--corpus", "c", "--source", str(corpus_jsonl),
        "--tokenizer", str(tokenizer_dir), "--ctx", "32", "--max-tokens", "512", "--no-progress",
    )  # fmt: skip
    assert tok.returncode == 0, tok.stderr
    acts = ["activations", "--store", str(store), "--corpus", "c", "--model", "org/tiny",
            "--hooks", HOOK, "--dtype", "float32", "--device", "cpu", "--no-progress"]  # fmt: skip
    first = xprobe(*acts)
    assert first.returncode == 0, first.stderr
    lineage = Store(store, mode="r").info(f"acts/c/org--tiny/{HOOK}")["lineage"]["model"]
    assert lineage["fingerprint"] == "a" * 40
    assert "already complete" in xprobe(*acts).stdout
    publish("b" * 40, gpt2_dir)  # the hub moved on (same bytes, another commit)
    again = xprobe(*acts)
    assert again.returncode == 2 and "is stale: the model org/tiny changed" in again.stderr
    status = xprobe("status", str(store))
    assert "STALE" in status.stdout
    json.loads(xprobe("info", "--json", str(store)).stdout)  # info still reads the store


def test_dry_run_shows_complete_stale_and_waiting_units_and_changes_nothing(built):
    store, config = built["store"], built["config"]
    save_standard_sae(built["sae"], hook=HOOK, seed=4)
    before = sorted(p for p in store.rglob("*") if p.is_file())
    out = _run("run", str(config), "--dry-run")
    assert out.exit_code == 0, out.output
    rows = {line.split()[1]: line for line in out.output.splitlines() if len(line.split()) > 2}
    assert rows["tokens/c"].endswith("complete") and rows[f"acts/c/a/{HOOK}"].endswith("complete")
    assert "is stale: the sae" in rows["feats/c/sae_a"] and "changed" in rows["feats/c/sae_a"]
    assert "stale" in rows["probes/B"] and "feats/c/sae_a is stale" in rows["probes/B"]
    assert sorted(p for p in store.rglob("*") if p.is_file()) == before
    fresh = _run("run", str(config), "--dry-run", "--store", str(built["store"].parent / "new"))
    assert fresh.output.count("to do") == 4

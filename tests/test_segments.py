"""Segmented runs (``xprobe run --max-disk``, pipeline/segments.py): a disk budget a third of what
the dense activations need, results equal to an unsegmented run, the budget held (sampled during
the run), SIGKILLs at random points, and a fit added afterwards."""

from __future__ import annotations

import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline import lifecycle
from pipeline.cli import cli
from pipeline.errors import XprobeError
from pipeline.segments import parse_size
from pipeline.store import Store
from pipeline.store.verify import verify_store
from tests.helpers import held_out_split, save_standard_sae

pytestmark = pytest.mark.slow  # the slow lane (make test-slow): kills, segments, clusters

ROOT = Path(__file__).parents[1]
HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]


def _config(root: Path, corpus: Path, tokenizer: Path, model: Path, sae: Path, fits: list) -> Path:
    """Tokens (chunks of 4 × 32 tokens), A = B = ``model`` at two hooks, features of ``sae``
    at the first, and the fits ``fits`` (name, hooks; B2 with the affine-map baseline)."""
    text = (
        f'store = "{root / "store"}"\n\n'
        f'[tokenize]\ncorpus = "c"\nsource = ["{corpus}"]\ntokenizer = "{tokenizer}"\n'
        "ctx = 32\nchunk_seqs = 4\nmax_tokens = 2048\nprogress = false\n\n"
        f'[activations]\ncorpus = "c"\nmodel = "{model}"\nname = "a"\nhooks = {HOOKS}\n'
        'dtype = "float32"\ndevice = "cpu"\nprogress = false\n\n'
        f'[features]\ncorpus = "c"\nmodel = "a"\nsae_path = "{sae}"\nname = "sae_a"\n'
        'device = "cpu"\nprogress = false\n\n'
    )
    for name, hooks in fits:
        text += (
            f'[[fit]]\nname = "{name}"\ncorpus = "c"\nfeatures = "sae_a"\nmodel = "a"\n'
            f'hooks = {hooks}\ndevice = "cpu"\nmin_active = 1\nn_bootstrap = 20\n'
            f"affine_map = {'true' if name == 'B2' else 'false'}\nprogress = false\n\n"
        )
    (root / "x.toml").write_text(text.replace("'", '"'))
    return root / "x.toml"


FITS = [("B", HOOKS[:1]), ("B2", HOOKS), ("C", HOOKS[1:])]
"""Three fits: with three, the held-out rematerialisation once looped forever (a fit advanced the
segment again while the others, woken, had yet to read theirs)."""


@pytest.fixture(scope="module")
def unsegmented(tmp_path_factory, corpus_jsonl, tokenizer_dir, gpt2_dir):
    root = tmp_path_factory.mktemp("whole")
    sae = save_standard_sae(root / "sae_a", hook=HOOKS[0], seed=0)
    config = _config(root, corpus_jsonl, tokenizer_dir, gpt2_dir, sae, FITS)
    result = CliRunner().invoke(cli, ["run", str(config)])
    assert result.exit_code == 0, result.output
    store = Store(root / "store", mode="r")
    dense = sum(store.nbytes_stored(f"acts/c/a/{h}/x") for h in HOOKS)
    return root, sae, dense


def _arrays(store: Store, unit: str) -> dict[str, np.ndarray]:
    group = store.group(unit)
    import zarr

    return {
        path: np.asarray(node[...])
        for path, node in group.members(max_depth=None)
        if isinstance(node, zarr.Array)
    }


def _assert_same_results(root: Path, reference: Path, fits: list = FITS) -> None:
    """Features and every fit equal to the unsegmented run's, bit for bit."""
    got, want = Store(root / "store", mode="r"), Store(reference / "store", mode="r")
    for unit in ["feats/c/sae_a", *(f"probes/{name}" for name, _ in fits)]:
        a, b = _arrays(got, unit), _arrays(want, unit)
        assert a.keys() == b.keys(), unit
        for name in a:
            np.testing.assert_array_equal(a[name], b[name], err_msg=f"{unit}/{name}")
        assert got.info(unit)["content_fingerprint"] == want.info(unit)["content_fingerprint"], unit


def _budget(reference: Path, dense: int) -> int:
    """The unsegmented store's size less two thirds of its dense activations (the dense chunks
    get a third of what they need), plus room for the fits' checkpoints, which a finished store
    no longer holds: statistics (float64 XᵀX [d, d], XᵀY [F, d], ...) per hook, for train and
    held-out tokens, twice (a checkpoint is rewritten through a temporary copy)."""
    store = Store(reference / "store", mode="r")
    d, n_feat = 64, int(store.info("feats/c/sae_a")["n_feat"])
    n_hooks = sum(len(hooks) for _, hooks in FITS)
    stats = n_hooks * 2 * 8 * (d * d + n_feat * d + 4 * n_feat + 2 * d)
    stats += n_hooks * 8 * 2 * d * d + len(FITS) * 8 * d * d  # the single-layer model's
    return store.nbytes_stored("") - (2 * dense) // 3 + 2 * stats


def _du(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(dirpath, f))
            except FileNotFoundError:
                pass
    return total


def test_segmented_run_equals_unsegmented_within_budget(
    unsegmented, tmp_path, corpus_jsonl, tokenizer_dir, gpt2_dir, monkeypatch
):
    reference, sae, dense = unsegmented
    config = _config(tmp_path, corpus_jsonl, tokenizer_dir, gpt2_dir, sae, FITS)
    budget = _budget(reference, dense)
    peak, stop = [0], threading.Event()
    written: list[int] = []  # chunks of B's activations written, recomputations included
    real_write = lifecycle.write_chunk

    def counting_write(store, units, result):
        if units[0].startswith("acts/"):
            written.append(result.index)
        real_write(store, units, result)

    monkeypatch.setattr(lifecycle, "write_chunk", counting_write)

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _du(tmp_path / "store"))
            time.sleep(0.01)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    try:
        result = CliRunner().invoke(cli, ["run", str(config), "--max-disk", str(budget)])
    finally:
        stop.set()
        sampler.join()
    assert result.exit_code == 0, result.output
    _assert_same_results(tmp_path, reference)
    # one chunk of both hooks in flight at most beyond the budget (the writer's next chunk)
    store = Store(tmp_path / "store", mode="r")
    n_chunks = int(store.info("tokens/c")["n_chunks"])
    assert peak[0] <= budget, (peak[0], budget)
    # every chunk once, then again only the chunks holding held-out sequences, once for both
    # fits (they score in lockstep)
    info = store.info("tokens/c")
    held = held_out_split(store, int(info["n_seq"]), 0.1, 0)
    with_held = sorted({int(i) for i in np.flatnonzero(held) // int(info["chunk_seqs"])})
    assert 0 < len(with_held) < n_chunks
    assert sorted(written) == sorted(list(range(n_chunks)) + with_held)
    for hook in HOOKS:
        assert store.evicted_chunks(f"acts/c/a/{hook}") == set(range(n_chunks))
        assert store.info(f"acts/c/a/{hook}")["complete"]
    assert verify_store(store) == []
    status = CliRunner().invoke(cli, ["status", str(tmp_path / "store")])
    assert f"{n_chunks} consumed and evicted" in status.output, status.output
    with pytest.raises(XprobeError, match="consumed and evicted"):
        store.read_chunk(f"acts/c/a/{HOOKS[0]}/x", 3)

    # a fit added afterwards: `xprobe run` (no budget) computes again exactly the evicted chunks
    # it needs and keeps them; the new fit equals one on the unsegmented store
    config = _config(
        tmp_path, corpus_jsonl, tokenizer_dir, gpt2_dir, sae, FITS + [("B3", HOOKS[1:])]
    )
    alone = CliRunner().invoke(cli, ["fit", "--config", str(config), "--index", str(len(FITS))])
    assert alone.exit_code != 0
    assert "consumed and evicted by a segmented run" in str(alone.exception), alone.output
    assert not Store(tmp_path / "store", mode="r").has("probes/B3")  # nothing written
    result = CliRunner().invoke(cli, ["run", str(config)])
    assert result.exit_code == 0, result.output
    assert f"activations: wrote {n_chunks} chunk(s)" in result.output, result.output
    store = Store(tmp_path / "store", mode="r")
    assert not store.evicted_chunks(f"acts/c/a/{HOOKS[1]}")
    ref_config = _config(
        reference, corpus_jsonl, tokenizer_dir, gpt2_dir, sae, FITS + [("B3", HOOKS[1:])]
    )
    assert CliRunner().invoke(cli, ["run", str(ref_config)]).exit_code == 0
    a = _arrays(store, "probes/B3")
    b = _arrays(Store(reference / "store", mode="r"), "probes/B3")
    for name in b:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def test_sigkill_at_random_points_then_resume(
    unsegmented, tmp_path, corpus_jsonl, tokenizer_dir, gpt2_dir
):
    """Three fits, killed at random points, resumed: the same bits as the unsegmented run.
    (This once differed in the last bit: a dask test earlier in the same pytest worker had let
    its nannies write OMP_NUM_THREADS=1 into this process's environment, so the resumed runs,
    started from here, summed on one BLAS thread and the reference on two; see
    pipeline/cluster.py threads_set_in_workers_only.)"""
    reference, sae, dense = unsegmented
    config = _config(tmp_path, corpus_jsonl, tokenizer_dir, gpt2_dir, sae, FITS)
    budget = _budget(reference, dense)
    command = [sys.executable, "-m", "pipeline.cli", "run", str(config), "--max-disk", str(budget)]
    rng = random.Random(7)
    kills = 0
    for _ in range(2):  # kill points past the imports (~4 s), across segments and the scoring
        proc = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        try:
            proc.wait(timeout=rng.uniform(5.0, 11.0))
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            kills += 1
            continue
        assert proc.returncode == 0, proc.stdout.read().decode()
        break
    else:
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        assert result.returncode == 0, result.stdout + result.stderr
    assert kills >= 1
    _assert_same_results(tmp_path, reference)
    assert verify_store(Store(tmp_path / "store", mode="r")) == []


KILL_IN_REMATERIALISATION = """
import os, signal, sys
import pipeline.segments as segments
from pipeline.cli import main
real = segments.Rematerialize._advance
def advance(self, index):  # the held-out passes' first segment computed again, then SIGKILL
    real(self, index)
    print(f"rematerialised from chunk {index}", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGKILL)
segments.Rematerialize._advance = advance
sys.argv = ["xprobe", *sys.argv[1:]]
main()
"""


def test_sigkill_during_rematerialisation_then_resume(
    unsegmented, tmp_path, corpus_jsonl, tokenizer_dir, gpt2_dir
):
    """Killed while the three fits score, just after the first evicted segment was computed
    again: the resumed run finishes and equals the unsegmented run bit for bit."""
    reference, sae, dense = unsegmented
    config = _config(tmp_path, corpus_jsonl, tokenizer_dir, gpt2_dir, sae, FITS)
    args = ["run", str(config), "--max-disk", str(_budget(reference, dense))]
    killed = subprocess.run(
        [sys.executable, "-c", KILL_IN_REMATERIALISATION, *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    assert "rematerialised from chunk" in killed.stderr, killed.stderr
    store = Store(tmp_path / "store", mode="r")
    assert all(store.has(f"probes/{name}") for name, _ in FITS)
    assert not any(store.info(f"probes/{name}").get("complete") for name, _ in FITS)
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args], cwd=ROOT, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stdout + result.stderr
    _assert_same_results(tmp_path, reference)
    assert verify_store(Store(tmp_path / "store", mode="r")) == []


def test_budget_errors(tmp_path, corpus_jsonl, tokenizer_dir, gpt2_dir):
    assert parse_size("50GB") == 50 * 10**9
    assert parse_size("1.5 TiB") == int(1.5 * 2**40)
    assert parse_size(1000) == 1000
    with pytest.raises(XprobeError, match="not a size"):
        parse_size("fifty")
    sae = save_standard_sae(tmp_path / "sae_a", hook=HOOKS[0], seed=0)
    config = _config(tmp_path, corpus_jsonl, tokenizer_dir, gpt2_dir, sae, FITS)
    result = CliRunner().invoke(cli, ["run", str(config), "--max-disk", "lots"])
    assert result.exit_code != 0 and "not a size" in str(result.exception)
    assert not (tmp_path / "store").exists()
    result = CliRunner().invoke(cli, ["run", str(config), "--max-disk", "100KB"])
    assert result.exit_code != 0
    assert "too small" in str(result.exception) and "Give at least" in str(result.exception)
    shutil.rmtree(tmp_path / "store", ignore_errors=True)


def test_max_disk_on_a_finished_store_evicts_nothing(unsegmented, tmp_path):
    """A finished (unsegmented) store run again with --max-disk: "already complete", and every
    dense chunk is still there (export reads them); a budget below one chunk is refused before
    anything is touched."""
    reference, _, _ = unsegmented
    shutil.copytree(reference / "store", tmp_path / "store")
    text = (
        (reference / "x.toml")
        .read_text()
        .replace(str(reference / "store"), str(tmp_path / "store"))
    )
    (tmp_path / "x.toml").write_text(text)
    store = Store(tmp_path / "store")
    before = {h: len(store.done_chunks(f"acts/c/a/{h}")) for h in HOOKS}
    for budget in ("50GB", "1KB"):
        result = CliRunner().invoke(cli, ["run", str(tmp_path / "x.toml"), "--max-disk", budget])
        if budget == "1KB":
            assert result.exit_code != 0 and "too small" in str(result.exception)
        else:
            assert result.exit_code == 0, result.output
        for hook in HOOKS:
            assert store.evicted_chunks(f"acts/c/a/{hook}") == set(), (budget, hook)
            assert len(store.done_chunks(f"acts/c/a/{hook}")) == before[hook]
    assert verify_store(Store(tmp_path / "store", mode="r")) == []

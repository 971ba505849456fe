"""Fit stage end to end on stored data, against sklearn Ridge / numpy lstsq on the same rows."""

from __future__ import annotations

import dataclasses
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pipeline.errors import XprobeError
from pipeline.lifecycle import run as run_stage
from pipeline.lineage import unit_input
from pipeline.stage import ChunkedStage
from pipeline.store import Store
from pipeline.store.checkpoint import CHECKPOINT, load_checkpoint
from pipeline.store.chunks import ChunkResult
from stages.activations import ActivationsConfig
from stages.activations import run as activations
from stages.fit import FitConfig
from stages.fit import run as fit
from tests.helpers import held_out_split, tokenize_small

N_FEAT = 24


@dataclasses.dataclass(frozen=True)
class _ToyConfig:
    seed: int = 0


class _FakeFeatures(ChunkedStage):
    """Writes a features unit in the features stage's format from a known map of A's activations:
    y = relu(x_A · W + b), dense top-K with K = N_FEAT (no drops), so the test knows the targets."""

    name = "features"

    def __init__(self, cfg: Any, acts_unit: str, x_scale: float, seed: int = 0):
        super().__init__(cfg)
        self.acts_unit = acts_unit
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(64, N_FEAT, generator=g) / (8 * x_scale)  # pre-activations ~ N(0, 1)
        self.b = -torch.rand(N_FEAT, generator=g) * torch.linspace(0, 2, N_FEAT)
        self.b[-1] = -1e9  # a dead feature

    def inputs(self, store):
        return {"tokens": unit_input(store, "tokens/c")}

    def units(self, store):
        t = store.info("tokens/c")
        return {
            "feats/c/toy": {
                "n_feat": N_FEAT,
                "corpus": "c",
                "corpus_fingerprint": t["corpus_fingerprint"],
            }
        }

    def prepare(self, store):
        t = store.info("tokens/c")
        rows = t["chunk_seqs"] * t["ctx"]
        prov = store.info("feats/c/toy")
        store.create_array(
            "feats/c/toy/idx",
            (t["n_seq"] * t["ctx"], N_FEAT),
            (rows, N_FEAT),
            "int32",
            prov,
            fill_value=-1,
        )
        store.create_array(
            "feats/c/toy/val", (t["n_seq"] * t["ctx"], N_FEAT), (rows, N_FEAT), "float32", prov
        )
        return t["n_chunks"]

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x @ self.w + self.b)

    def compute(self, store, todo: Callable[[int], bool]) -> Iterator[ChunkResult]:
        for i in range(store.info("tokens/c")["n_chunks"]):
            if todo(i):
                y = self.dense(torch.from_numpy(store.read_chunk(f"{self.acts_unit}/x", i))).numpy()
                idx = np.where(y > 0, np.arange(N_FEAT, dtype=np.int32)[None, :], -1).astype(
                    np.int32
                )
                yield ChunkResult(i, {"feats/c/toy/idx": idx, "feats/c/toy/val": y}, n_tok=len(y))


@pytest.fixture(scope="module")
def fitted_store(
    tmp_path_factory, corpus_jsonl, tokenizer_dir, gpt2_dir, llama_dir
) -> tuple[Path, _FakeFeatures]:
    path = tmp_path_factory.mktemp("fit") / "store"
    store = Store(path)
    tokenize_small(store, corpus_jsonl, tokenizer_dir, 8000)
    activations(
        ActivationsConfig(
            corpus="c", model=str(gpt2_dir), name="A", layers=(0,), device="cpu", progress=False
        ),
        store,
    )
    activations(
        ActivationsConfig(
            corpus="c", model=str(llama_dir), name="B", layers=(0, 1), device="cpu", progress=False
        ),
        store,
    )
    a_unit = "acts/c/A/blocks.0.hook_resid_post"
    feats = _FakeFeatures(_ToyConfig(), a_unit, x_scale=float(store.array(f"{a_unit}/x")[:].std()))
    run_stage(feats, store, progress=False)
    return path, feats


def _cfg(**kw) -> FitConfig:  # the linear probe: the tests check it against lstsq and sklearn
    base = dict(
        name="p",
        corpus="c",
        features="toy",
        model="B",
        hooks=("blocks.0.hook_resid_post", "blocks.1.hook_resid_post"),
        held_out_fraction=0.25,
        lambdas=(0.0, 1e-3, 1e-1),
        compute_dtype="float64",
        device="cpu",
        progress=False,
        predictor="linear",
        split_by="sequence",  # the references below split by sequence
        n_bootstrap=10,  # replicates are checked against numpy in test_held_out_scores (5)
    )
    base.update(kw)
    return FitConfig(**base)


def _in_memory(store: Store, feats: _FakeFeatures, hook: str) -> tuple[np.ndarray, ...]:
    x = store.array(f"acts/c/B/{hook}/x")[:].astype(np.float64)
    y = (
        feats.dense(torch.from_numpy(store.array("acts/c/A/blocks.0.hook_resid_post/x")[:]))
        .numpy()
        .astype(np.float64)
    )
    mask = store.array("tokens/c/mask")[:].reshape(-1)
    held_seq = held_out_split(store, store.info("tokens/c")["n_seq"], 0.25, 0, split_by="sequence")
    held = np.repeat(held_seq, 32)
    return x, y, mask & ~held, mask & held


def test_probes_equal_sklearn_ridge_and_lstsq(fitted_store):
    from sklearn.linear_model import Ridge

    path, feats = fitted_store
    store = Store(path)
    fit(_cfg(), store)
    hook = "blocks.1.hook_resid_post"
    x, y, train, held = _in_memory(store, feats, hook)
    got = {
        k: store.array(f"probes/p/{hook}/{k}")[:]
        for k in ("direction", "intercept", "lam", "r2_held_out", "status")
    }
    ok = got["status"] == 0
    assert ok.sum() >= N_FEAT - 4 and got["status"][-1] == 1  # the dead feature is flagged
    for f in np.nonzero(ok)[0]:
        ridge = Ridge(alpha=got["lam"][f], fit_intercept=True, solver="svd").fit(
            x[train], y[train, f]
        )
        np.testing.assert_allclose(
            got["direction"][f], ridge.coef_, rtol=2e-5, atol=2e-6 * np.abs(ridge.coef_).max()
        )
        np.testing.assert_allclose(got["intercept"][f], ridge.intercept_, rtol=1e-6, atol=1e-7)
        pred = x[held] @ got["direction"][f].astype(np.float64) + got["intercept"][f]
        r2 = 1 - ((y[held, f] - pred) ** 2).sum() / ((y[held, f] - y[held, f].mean()) ** 2).sum()
        assert abs(r2 - got["r2_held_out"][f]) < 1e-5
    # λ = 0 is plain least squares with an intercept column
    fit(_cfg(name="ols", lambdas=(0.0,)), store)
    a = np.hstack([x[train], np.ones((train.sum(), 1))])
    coef = np.linalg.lstsq(a, y[train], rcond=None)[0]
    direction = store.array(f"probes/ols/{hook}/direction")[:]
    ok = store.array(f"probes/ols/{hook}/status")[:] == 0
    np.testing.assert_allclose(
        direction[ok], coef[:-1].T[ok], rtol=1e-4, atol=1e-5 * np.abs(coef).max()
    )
    best = store.array("probes/p/best_hook")[:]
    r2s = np.stack([store.array(f"probes/p/{h}/r2_gcv")[:] for h in _cfg().hooks])
    assert np.array_equal(best, r2s.argmax(0))  # chosen on training tokens, not held-out ones


def test_held_out_scores_equal_numpy(fitted_store):
    """The evaluation pass: clipped R², firing AUROC and bootstrap replicates of R² (Poisson
    weights per held-out sequence) against a direct numpy computation on the same tokens."""
    from sklearn.metrics import roc_auc_score

    from pipeline.maths.evaluate import bootstrap_weights

    path, feats = fitted_store
    store = Store(path)
    fit(_cfg(name="e", n_bootstrap=5), store)
    hook = "blocks.0.hook_resid_post"
    x, y, _, held = _in_memory(store, feats, hook)
    got = {
        k: store.array(f"probes/e/{hook}/{k}")[:]
        for k in (
            "direction",
            "intercept",
            "status",
            "r2_held_out",
            "r2_clipped_held_out",
            "auroc_held_out",
            "r2_held_out_boot",
            "r2_clipped_held_out_boot",
        )
    }
    ok = got["status"] == 0
    assert ok.sum() >= N_FEAT - 4
    assert np.isnan(got["auroc_held_out"][~ok]).all()
    pred = x[held] @ got["direction"].T.astype(np.float64) + got["intercept"]
    yh = y[held]

    def r2(pred: np.ndarray, w: np.ndarray) -> np.ndarray:
        mean = (w[:, None] * yh).sum(0) / w.sum()
        sst = (w[:, None] * (yh - mean) ** 2).sum(0)
        with np.errstate(divide="ignore", invalid="ignore"):  # constant features: NaN
            return 1 - (w[:, None] * (yh - pred) ** 2).sum(0) / sst

    ones = np.ones(len(yh))
    np.testing.assert_allclose(r2(pred, ones)[ok], got["r2_held_out"][ok], atol=1e-5)
    clipped = r2(np.maximum(pred, 0), ones)
    np.testing.assert_allclose(got["r2_clipped_held_out"][ok], clipped[ok], atol=1e-5)
    assert (clipped[ok] >= got["r2_held_out"][ok] - 1e-9).all()
    auroc = [roc_auc_score(yh[:, f] != 0, pred[:, f]) for f in np.nonzero(ok)[0]]
    np.testing.assert_allclose(got["auroc_held_out"][ok], auroc, atol=0.01)
    t = store.info("tokens/c")
    weights = np.concatenate(
        [
            bootstrap_weights(0, i, min(t["chunk_seqs"], t["n_seq"] - i * t["chunk_seqs"]), 5)
            for i in range(t["n_chunks"])
        ]
    )
    token_weights = np.repeat(weights, t["ctx"], axis=0)[held].astype(np.float64)
    assert got["r2_held_out_boot"].shape == (N_FEAT, 5)
    for rep in range(5):
        w = token_weights[:, rep]
        np.testing.assert_allclose(got["r2_held_out_boot"][ok, rep], r2(pred, w)[ok], atol=1e-5)
        expect = r2(np.maximum(pred, 0), w)[ok]
        np.testing.assert_allclose(got["r2_clipped_held_out_boot"][ok, rep], expect, atol=1e-5)
    assert np.ptp(got["r2_held_out_boot"][ok], axis=1).min() > 0  # replicates differ


def test_write_direction_is_lstsq_slope_of_b_on_the_feature(fitted_store):
    """B's write direction: least squares of B's activations on [y_f, 1] (train tokens), numpy."""
    path, feats = fitted_store
    store = Store(path)
    fit(_cfg(name="w", lambdas=(0.0,)), store)
    hook = "blocks.0.hook_resid_post"
    x, y, train, _ = _in_memory(store, feats, hook)
    got = {
        k: store.array(f"probes/w/{hook}/{k}")[:]
        for k in ("write_direction", "write_norm", "write_r2", "status")
    }
    assert got["write_direction"].shape == (N_FEAT, x.shape[1])
    assert got["write_direction"].dtype == np.float32
    ok = got["status"] == 0
    assert ok.sum() >= N_FEAT - 4
    x_train = x[train]
    total = ((x_train - x_train.mean(0)) ** 2).sum()
    for f in range(N_FEAT):
        if not ok[f]:  # the dead feature among them: no direction
            assert not got["write_direction"][f].any() and got["write_r2"][f] == 0
            continue
        design = np.stack([y[train, f], np.ones(train.sum())], axis=1)
        coef, *_ = np.linalg.lstsq(design, x_train, rcond=None)  # [2, d]: slope, intercept
        np.testing.assert_allclose(
            got["write_direction"][f], coef[0], rtol=1e-5, atol=1e-6 * np.abs(coef[0]).max()
        )
        assert abs(got["write_norm"][f] - np.linalg.norm(coef[0])) < 1e-6 * np.linalg.norm(coef[0])
        r2 = 1 - ((x_train - design @ coef) ** 2).sum() / total
        assert abs(got["write_r2"][f] - r2) < 1e-9
    assert not got["write_direction"][-1].any()


def test_rerun_is_noop_and_config_change_refused(fitted_store):
    path, _ = fitted_store
    store = Store(path)
    fit(_cfg(name="q"), store)
    assert fit(_cfg(name="q"), store)["already_complete"]
    with pytest.raises(XprobeError, match="held_out_fraction: stored 0.25 != requested 0.5"):
        fit(_cfg(name="q", held_out_fraction=0.5), store)
    with pytest.raises(
        XprobeError, match="acts/c/nope/blocks.0.hook_resid_post is not in the store"
    ):
        fit(_cfg(name="r", model="nope"), store)
    with pytest.raises(XprobeError, match="affine_map needs A's activations"):
        fit(_cfg(name="m", affine_map=True), store)  # these features record no model of A


KILL_SCRIPT = """
import sys, time
import pipeline.probes.inputs
from pipeline.store import Store
from stages.fit import FitConfig, run
_load = pipeline.probes.inputs.load_acts
def slow_load(*args):  # a slow disk: the kill lands between checkpoints, never after the end
    time.sleep(0.2)
    return _load(*args)
pipeline.probes.inputs.load_acts = slow_load
run(FitConfig(name="k", corpus="c", features="toy", model="B", hooks=("blocks.0.hook_resid_post", "blocks.1.hook_resid_post"),
              held_out_fraction=0.25, lambdas=(0.0, 1e-3, 1e-1), compute_dtype="float64", device="cpu", progress=False,
              checkpoint_every=1, predictor="linear", split_by="sequence", n_bootstrap=10),
    Store(sys.argv[1]))
"""


@pytest.mark.slow  # kills and resumes
def test_sigkill_then_resume_equals_uninterrupted(fitted_store, tmp_path):
    import shutil

    path, _ = fitted_store
    copy = tmp_path / "copy"
    shutil.copytree(path, copy)
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, str(copy)], cwd=Path(__file__).parents[1]
    )
    ckpt = copy / "probes/k" / CHECKPOINT
    deadline = time.time() + 120
    while time.time() < deadline and not ckpt.exists():
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    resumed_store = Store(copy)
    consumed = load_checkpoint(resumed_store, "probes/k")["consumed"]
    assert 0 < len(consumed) < resumed_store.info("tokens/c")["n_chunks"], (
        "the kill must land partway"
    )
    fit(_cfg(name="k", checkpoint_every=1), resumed_store)
    ref = Store(path)
    fit(_cfg(name="k", checkpoint_every=1), ref)
    for hook in _cfg().hooks:
        for key in ("direction", "intercept", "r2_held_out", "lam"):
            assert np.array_equal(
                resumed_store.array(f"probes/k/{hook}/{key}")[:],
                ref.array(f"probes/k/{hook}/{key}")[:],
            ), key

"""Match stage: B's SAE a noisy permutation of A's is recovered; streaming top-k equals the dense
correlation matrix; every accumulator gives the same bits; resume; refusals; CLI; table/figure."""

from __future__ import annotations

import dataclasses
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.errors import XprobeError
from pipeline.lifecycle import run as run_stage
from pipeline.lineage import unit_input
from pipeline.stage import ChunkedStage
from pipeline.store import Store
from pipeline.store.checkpoint import CHECKPOINT, load_checkpoint
from pipeline.store.chunks import ChunkResult
from stages.match import MatchConfig, run
from tests.helpers import tokenize_small

N_A, N_B, K_STORED = 40, 56, 24
OUT = (
    "top_idx",
    "top_corr",
    "top_n_coactive",
    "best_idx",
    "best_corr",
    "n_positive",
    "mutual",
    "b_best_idx",
    "b_best_corr",
    "count_a",
    "count_b",
)


@dataclasses.dataclass(frozen=True)
class _ToyConfig:
    side: str
    seed: int = 0


def permutation() -> np.ndarray:
    return np.random.default_rng(7).permutation(N_B)


def toy_features(side: str, n_rows: int, mask: np.ndarray, seed: int) -> np.ndarray:
    """Dense [n_rows, F] activations of one chunk. A: sparse exponential features of varied
    frequency. B: A's features at permuted columns, with 20% multiplicative noise, 10% of
    activations dropped, plus sparse unrelated activations on every B feature."""
    rng = np.random.default_rng(seed)
    freq = np.linspace(0.02, 0.25, N_A)
    a = (rng.random((n_rows, N_A)) < freq) * rng.exponential(1.0, (n_rows, N_A))
    a[:, 5] = 0.0  # a dead A feature
    if side == "b":
        b = np.zeros((n_rows, N_B))
        noisy = a * (1 + 0.2 * rng.standard_normal(a.shape)) * (rng.random(a.shape) > 0.1)
        b[:, permutation()[:N_A]] = np.clip(noisy, 0, None)
        b += (rng.random((n_rows, N_B)) < 0.03) * rng.exponential(0.5, (n_rows, N_B))
        a = b
    return a * mask[:, None]


class _ToyFeatures(ChunkedStage):
    """Writes a features unit in the features stage's format (top-K idx/val, -1 padding)."""

    name = "features"

    def __init__(self, cfg: _ToyConfig, corpus: str = "c"):
        super().__init__(cfg)
        self.corpus = corpus
        self.unit = f"feats/{corpus}/s{cfg.side}"
        self.n_feat = N_A if cfg.side == "a" else N_B

    def inputs(self, store):
        return {"tokens": unit_input(store, f"tokens/{self.corpus}")}

    def units(self, store):
        t = store.info(f"tokens/{self.corpus}")
        return {
            self.unit: {
                "n_feat": self.n_feat,
                "corpus": self.corpus,
                "corpus_fingerprint": t["corpus_fingerprint"],
                "n_tok": t["n_tok"],
            }
        }

    def prepare(self, store):
        t = store.info(f"tokens/{self.corpus}")
        rows, n_tok = t["chunk_seqs"] * t["ctx"], t["n_seq"] * t["ctx"]
        prov = store.info(self.unit)
        shape, chunks = (n_tok, K_STORED), (rows, K_STORED)
        store.create_array(f"{self.unit}/idx", shape, chunks, "int32", prov, fill_value=-1)
        store.create_array(f"{self.unit}/val", shape, chunks, "float32", prov)
        return t["n_chunks"]

    def compute(self, store, todo: Callable[[int], bool]) -> Iterator[ChunkResult]:
        for i in range(store.info(f"tokens/{self.corpus}")["n_chunks"]):
            if not todo(i):
                continue
            mask = store.read_chunk(f"tokens/{self.corpus}/mask", i).reshape(-1)
            seed = 1000 * (1 + self.cfg.seed) + i
            dense = toy_features(self.cfg.side, len(mask), mask, seed=seed).astype(np.float32)
            order = np.argsort(-np.abs(dense), axis=1, kind="stable")[:, :K_STORED]
            val = np.take_along_axis(dense, order, 1)
            idx = np.where(val != 0, order, -1).astype(np.int32)
            arrays = {f"{self.unit}/idx": idx, f"{self.unit}/val": val}
            yield ChunkResult(i, arrays, n_tok=len(mask))


def _tokenize(store: Store, corpus: str, source: Path, tokenizer_dir: Path) -> None:
    tokenize_small(store, source, tokenizer_dir, 2000, corpus=corpus)


@pytest.fixture(scope="module")
def base_store(tmp_path_factory, corpus_jsonl, tokenizer_dir, documents) -> Path:
    """tokens/c with A's (40) and B's (56) toy SAE features; tokens/d, other documents, with B's."""
    root = tmp_path_factory.mktemp("match")
    store = Store(root / "store")
    _tokenize(store, "c", corpus_jsonl, tokenizer_dir)
    other = root / "other.txt"
    other.write_text("\n\n".join(documents[::-1][:150]))
    _tokenize(store, "d", other, tokenizer_dir)
    for side in ("a", "b"):
        run_stage(_ToyFeatures(_ToyConfig(side)), store, progress=False)
    run_stage(_ToyFeatures(_ToyConfig("b"), corpus="d"), store, progress=False)
    return root / "store"


@pytest.fixture
def store(base_store, tmp_path) -> Store:
    shutil.copytree(base_store, tmp_path / "store")
    return Store(tmp_path / "store")


def _cfg(**kw: Any) -> MatchConfig:
    base = dict(
        name="m", corpus="c", features_a="sa", features_b="sb", k=3, device="cpu", progress=False
    )
    base.update(kw)
    return MatchConfig(**base)


def _read(store: Store, name: str) -> dict[str, np.ndarray]:
    return {key: store.array(f"matches/{name}/{key}")[:] for key in OUT}


def _dense(store: Store, unit: str, n_feat: int) -> np.ndarray:
    """A stored features unit as a dense [n_counted, F] float64 matrix (mask applied)."""
    idx, val = store.array(f"{unit}/idx")[:], store.array(f"{unit}/val")[:]
    dense = np.zeros((len(idx), n_feat))
    rows, slots = np.nonzero(idx >= 0)
    dense[rows, idx[rows, slots]] = val[rows, slots]
    return dense[store.array("tokens/c/mask")[:].reshape(-1)]


def test_noisy_permutation_is_recovered(store):
    out = run(_cfg(), store)
    assert not out["already_complete"]
    got = _read(store, "m")
    live = np.arange(N_A) != 5
    perm = permutation()[:N_A]
    assert np.array_equal(got["best_idx"][live], perm[live])
    assert got["best_corr"][live].min() > 0.6
    assert got["best_idx"][5] == -1 and got["best_corr"][5] == 0 and got["count_a"][5] == 0
    assert got["mutual"][live].all() and not got["mutual"][5]
    assert np.array_equal(got["b_best_idx"][perm[live]], np.nonzero(live)[0])
    info = store.info("matches/m")
    assert info["complete"] and info["summary"]["n_mutual"] == N_A - 1
    assert info["corpus_fingerprint"] == store.info("tokens/c")["corpus_fingerprint"]
    # A against itself (the ceiling): every live feature is its own best match, corr 1
    run(_cfg(name="self", features_b="sa"), store)
    self_match = _read(store, "self")
    assert np.array_equal(self_match["best_idx"][live], np.nonzero(live)[0])
    np.testing.assert_allclose(self_match["best_corr"][live], 1.0, atol=1e-6)


@pytest.mark.parametrize(
    "runtime",
    [
        dict(accumulator="dense"),
        dict(accumulator="dense", memory_budget_mb=14 * N_B * 16 / 2**20),  # 3 blocks of A
        dict(accumulator="sparse", batch_tokens=100),
        dict(accumulator="sparse", memory_budget_mb=0.01),  # outgrows it: blocks split on the fly
    ],
    ids=["dense", "dense-blocks", "sparse", "sparse-split"],
)
def test_streaming_top_k_equals_dense_correlation(store, runtime):
    run(_cfg(k=5, **runtime), store)
    got = _read(store, "m")
    a, b = _dense(store, "feats/c/sa", N_A), _dense(store, "feats/c/sb", N_B)
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.corrcoef(np.hstack([a, b]).T)[:N_A, N_A:]
    coactive = (a != 0).T.astype(np.int64) @ (b != 0).astype(np.int64)
    assert (got["n_positive"] > 5).sum() > N_A // 2  # the top-5 is a real ranking, not all of them
    n_blocks = store.info("matches/m")["summary"]["n_blocks"]
    if "memory_budget_mb" not in runtime:
        assert n_blocks == 1
    elif runtime["accumulator"] == "dense":
        assert n_blocks == 3  # 14 rows of A per block
    else:
        assert n_blocks > 1, "the sparse accumulator must have split"
    for i in range(N_A):
        pos = np.nonzero(corr[i] > 0)[0]
        ranked = pos[np.lexsort((pos, -corr[i, pos]))][:5]
        assert got["n_positive"][i] == len(pos)
        assert np.array_equal(got["top_idx"][i, : len(ranked)], ranked), i
        assert (got["top_idx"][i, len(ranked) :] == -1).all()
        np.testing.assert_allclose(got["top_corr"][i, : len(ranked)], corr[i, ranked], atol=1e-6)
        assert np.array_equal(got["top_n_coactive"][i, : len(ranked)], coactive[i, ranked])
    best_a = np.where(corr > 0, corr, -np.inf)
    has = np.isfinite(best_a).any(0)
    assert np.array_equal(got["b_best_idx"][has], best_a.argmax(0)[has])
    assert (got["b_best_idx"][~has] == -1).all()
    np.testing.assert_array_equal(got["count_a"], (a != 0).sum(0))
    # every accumulator and block plan gives the same bits as the default one
    run(_cfg(name="ref", k=5), store)
    ref = _read(store, "ref")
    for key in OUT:
        assert np.array_equal(got[key], ref[key]), key


class _Interrupt(BaseException):
    pass


class _FailingLoads:
    """Replaces ``stages.match.load_sparse`` (``on()``) with one that raises ``_Interrupt`` once it
    has read ``after`` times; ``off()`` puts the real one back."""

    def __init__(self, monkeypatch, after: int):
        import stages.match

        self.monkeypatch, self.after, self.load = monkeypatch, after, stages.match.load_sparse

    def __call__(self, *args):
        self.calls += 1
        if self.calls > self.after:
            raise _Interrupt()
        return self.load(*args)

    def on(self) -> None:
        import stages.match

        self.calls = 0
        self.monkeypatch.setattr(stages.match, "load_sparse", self)

    def off(self) -> None:
        import stages.match

        self.monkeypatch.setattr(stages.match, "load_sparse", self.load)


def test_interrupted_then_resumed_equals_uninterrupted(store, monkeypatch):
    """Three blocks of A features (three passes), interrupted halfway through the second."""

    n_chunks = store.info("tokens/c")["n_chunks"]
    failing = _FailingLoads(monkeypatch, after=2 * (n_chunks + n_chunks // 2))  # 2 reads a chunk
    failing.on()
    blocks = dict(accumulator="dense", memory_budget_mb=14 * N_B * 16 / 2**20)
    cfg = _cfg(name="r", checkpoint_every=1, **blocks)
    with pytest.raises(_Interrupt):
        run(cfg, store)
    state = load_checkpoint(store, "matches/r")
    assert len(state["plan"]["blocks"]) == 3
    assert state["block"] == 1 and len(state["consumed"]) == n_chunks // 2
    assert not store.info("matches/r").get("complete")
    failing.off()
    run(cfg, store)
    assert load_checkpoint(store, "matches/r") is None
    run(_cfg(name="u", **blocks), store)
    resumed, uninterrupted = _read(store, "r"), _read(store, "u")
    for key in OUT:
        assert np.array_equal(resumed[key], uninterrupted[key]), key


def test_sparse_interrupted_mid_pass(store, monkeypatch):
    """The single sparse pass, interrupted halfway, resumes from its checkpoint."""

    n_chunks = store.info("tokens/c")["n_chunks"]
    failing = _FailingLoads(monkeypatch, after=n_chunks)  # halfway through the only pass
    failing.on()
    cfg = _cfg(name="r", accumulator="sparse", checkpoint_every=2)
    with pytest.raises(_Interrupt):
        run(cfg, store)
    state = load_checkpoint(store, "matches/r")
    assert state["block"] == 0 and 0 < len(state["consumed"]) < n_chunks
    failing.off()
    run(cfg, store)
    run(_cfg(name="u", accumulator="sparse"), store)
    # a checkpoint is never resumed on other features: B's features rewritten in between
    failing.on()
    with pytest.raises(_Interrupt):
        run(_cfg(name="w", accumulator="sparse", checkpoint_every=2), store)
    failing.off()
    run_stage(_ToyFeatures(_ToyConfig("b", seed=1)), store, force=True, progress=False)
    with pytest.raises(XprobeError, match="matches/w is stale: feats/c/sb changed since"):
        run(_cfg(name="w", accumulator="sparse", checkpoint_every=2), store)
    resumed, uninterrupted = _read(store, "r"), _read(store, "u")
    for key in OUT:
        assert np.array_equal(resumed[key], uninterrupted[key]), key


def test_rerun_noop_config_change_and_mismatched_corpus_refused(store):
    run(_cfg(), store)
    assert run(_cfg(), store)["already_complete"]
    assert run(_cfg(accumulator="sparse", memory_budget_mb=1.0), store)["already_complete"]
    with pytest.raises(XprobeError, match="k: stored 3 != requested 4"):
        run(_cfg(k=4), store)
    assert not run(_cfg(k=4), store, force=True)["already_complete"]
    with pytest.raises(XprobeError, match="another token stream than tokens/c"):
        run(_cfg(name="x", corpus_b="d"), store)
    with pytest.raises(XprobeError, match="feats/c/nope is not in the store"):
        run(_cfg(name="x", features_b="nope"), store)
    with pytest.raises(XprobeError, match="A feature 0 alone has"):
        run(_cfg(name="x", accumulator="sparse", memory_budget_mb=1e-4), store)


def test_cli_match_and_report_helpers(store):
    from pipeline.cli import cli
    from pipeline.report.matches import best_corr_figure, match_table

    args = ["match", "--store", str(store.local_path), "--name", "cli", "--corpus", "c"]
    args += ["--features-a", "sa", "--features-b", "sb", "--k", "2", "--device", "cpu"]
    result = CliRunner().invoke(cli, [*args, "--no-progress"])
    assert result.exit_code == 0, result.output
    assert "match: wrote" in result.output
    table = match_table(store, "cli", presence=np.linspace(0, 1, N_A))
    assert list(table.columns[:4]) == ["feature", "best_match", "best_corr", "presence"]
    assert np.array_equal(table["best_match"], store.array("matches/cli/best_idx")[:])
    assert table["dead"].sum() == 1
    fig = best_corr_figure(table["best_corr"], dead=table["dead"])
    assert len(fig.axes[0].patches) == 40  # histogram bars
    config = store.local_path.parent / "xprobe.toml"
    config.write_text(
        f'store = "{store.local_path}"\n\n[[match]]\nname = "toml"\ncorpus = "c"\n'
        'features_a = "sa"\nfeatures_b = "sb"\ndevice = "cpu"\nprogress = false\n'
    )
    first = CliRunner().invoke(cli, ["run", str(config), "--only", "match"])
    assert first.exit_code == 0 and "match: wrote" in first.output, first.output
    again = CliRunner().invoke(cli, ["run", str(config)])
    assert "match: already complete (matches/toml)" in again.output, again.output


def test_sae_lens_saes_end_to_end(tmp_path, corpus_jsonl, tokenizer_dir, gpt2_dir):
    """The features stage on the test GPT-2 with a sae-lens SAE A and an SAE B that is A with its
    features permuted and 10% noise on the encoder: the match recovers the permutation."""

    import torch
    from sae_lens import SAE

    from stages.activations import ActivationsConfig
    from stages.activations import run as activations
    from stages.features import FeaturesConfig
    from stages.features import run as features
    from tests.helpers import save_standard_sae

    hook = "blocks.0.hook_resid_post"
    sae_a = save_standard_sae(tmp_path / "sae_a", d_sae=128, hook=hook)
    sae = SAE.load_from_disk(str(sae_a))
    perm = torch.from_numpy(np.random.default_rng(3).permutation(128))
    g = torch.Generator().manual_seed(4)
    with torch.no_grad():
        w_enc = sae.W_enc + 0.1 * sae.W_enc.std() * torch.randn(sae.W_enc.shape, generator=g)
        sae.W_enc[:, perm] = w_enc
        sae.b_enc[perm] = sae.b_enc.clone()
        sae.W_dec[perm] = sae.W_dec.clone()
    sae.save_model(str(tmp_path / "sae_b"))
    store = Store(tmp_path / "store")
    _tokenize(store, "c", corpus_jsonl, tokenizer_dir)
    activations(
        ActivationsConfig(
            corpus="c", model=str(gpt2_dir), name="A", hooks=(hook,), device="cpu", progress=False
        ),
        store,
    )
    for side in ("a", "b"):
        features(
            FeaturesConfig(
                corpus="c",
                model="A",
                sae_path=str(tmp_path / f"sae_{side}"),
                name=f"sae_{side}",
                device="cpu",
                progress=False,
            ),
            store,
        )
    run(_cfg(features_a="sae_a", features_b="sae_b", svcca=True), store)
    got = _read(store, "m")
    frequent = got["count_a"] >= 20
    assert frequent.sum() > 30
    assert np.array_equal(got["best_idx"][frequent], perm.numpy()[frequent])
    assert np.median(got["best_corr"][frequent]) > 0.9
    # B's decoder rows are A's, permuted: matched decoder directions are identical
    result = store.info("matches/m")["summary"]["svcca"]
    assert result["n_pairs"] >= frequent.sum() - 5
    assert result["svcca"] > 0.999 and result["random_mean"] < 0.95 and result["p_value"] < 0.05


def test_svcca_equals_textbook_cca():
    """Canonical correlations equal sqrt(eig(Sxx^-1 Sxy Syy^-1 Syx)) of the SVD-reduced data;
    SVCCA is 1 for a rotation of the same vectors and near chance for unrelated ones."""
    from pipeline.maths.svcca import _reduce, canonical_correlations, svcca

    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 12)) @ rng.standard_normal((12, 12))
    y = 0.5 * x[:, :8] @ rng.standard_normal((8, 10)) + rng.standard_normal((300, 10))
    rho = canonical_correlations(x, y, keep_variance=0.99)
    xr, yr = (_reduce(z, 0.99) for z in (x, y))
    xr, yr = xr * rng.uniform(1, 3, xr.shape[1]), yr @ rng.standard_normal((yr.shape[1],) * 2)
    sxx, syy, sxy = xr.T @ xr, yr.T @ yr, xr.T @ yr
    eig = np.linalg.eigvals(np.linalg.solve(sxx, sxy) @ np.linalg.solve(syy, sxy.T))
    ref = np.sort(np.sqrt(np.clip(eig.real, 0, None)))[::-1][: len(rho)]
    np.testing.assert_allclose(rho, ref, atol=1e-8)
    rotation = np.linalg.qr(rng.standard_normal((12, 12)))[0]
    rotated = svcca(x, x @ rotation, n_random=5)
    assert rotated["svcca"] > 1 - 1e-9 and rotated["random_mean"] < 0.5
    unrelated = svcca(x, rng.standard_normal((300, 12)), n_random=5)
    assert unrelated["svcca"] < 0.3 and unrelated["p_value"] > 0.1


KILL_SCRIPT = """
import sys, time
import stages.match
from pipeline.store import Store
from stages.match import MatchConfig, run
_load = stages.match.load_sparse
def slow_load(*args):  # a slow disk: the kill lands between checkpoints, never after the end
    time.sleep(0.1)
    return _load(*args)
stages.match.load_sparse = slow_load
run(MatchConfig(name="k", corpus="c", features_a="sa", features_b="sb", k=3, device="cpu",
                progress=False, accumulator="sparse", checkpoint_every=1), Store(sys.argv[1]))
"""


def test_sigkill_then_resume_equals_uninterrupted(store):
    import signal
    import subprocess
    import sys
    import time

    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, str(store.local_path)], cwd=Path(__file__).parents[1]
    )
    ckpt = store.local_path / "matches/k" / CHECKPOINT
    deadline = time.time() + 120
    while time.time() < deadline and not ckpt.exists():
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    consumed = load_checkpoint(store, "matches/k")["consumed"]
    assert 0 < len(consumed) < store.info("tokens/c")["n_chunks"], "the kill must land partway"
    cfg = _cfg(name="k", accumulator="sparse", checkpoint_every=1)
    run(cfg, store)  # the dead run's lock is taken over
    run(_cfg(name="u", accumulator="sparse"), store)
    resumed, uninterrupted = _read(store, "k"), _read(store, "u")
    for key in OUT:
        assert np.array_equal(resumed[key], uninterrupted[key]), key

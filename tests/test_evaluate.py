"""Test-token scores of solved probes (pipeline/maths/evaluate.py) against numpy and sklearn."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score

import pipeline.maths.evaluate as evaluate
from pipeline.maths.evaluate import ProbeScores, bootstrap_weights

CPU = torch.device("cpu")


def relu_problem(rng: np.random.Generator, n: int, d: int, n_feat: int):
    """x [n, d], ReLU targets y [n, F] (sparse), and noisy probes (direction [F, d], intercept [F])."""
    x = rng.normal(size=(n, d)) + rng.normal(size=d)
    true = rng.normal(size=(d, n_feat)) / np.sqrt(d)
    bias = -rng.uniform(0.5, 2.0, n_feat)
    y = np.maximum(x @ true + bias + 0.3 * rng.normal(size=(n, n_feat)), 0.0)
    direction = (true + 0.2 * rng.normal(size=true.shape) / np.sqrt(d)).T
    intercept = bias + 0.1 * rng.normal(size=n_feat)
    return x, y, direction, intercept


def r2(y: np.ndarray, pred: np.ndarray, w: np.ndarray | None = None) -> np.ndarray:
    """Weighted R² per column; NaN where y is constant on the tokens with weight."""
    w = np.ones(len(y)) if w is None else w
    mean = (w[:, None] * y).sum(0) / w.sum()
    sst = (w[:, None] * (y - mean) ** 2).sum(0)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(sst > 0, 1 - (w[:, None] * (y - pred) ** 2).sum(0) / sst, np.nan)


def scores_of(
    x, y, direction, intercept, sizes, weights=None, groups=None, **kwargs
) -> dict[str, np.ndarray]:
    """ProbeScores over consecutive chunks of ``sizes`` tokens; ``weights [n_groups, R]`` per
    group of tokens (``groups [n]``; None: one group per token)."""
    acc = ProbeScores(
        torch.from_numpy(direction),
        torch.from_numpy(intercept),
        torch.from_numpy(y.mean(0)),
        torch.from_numpy(y.std(0)),
        CPU,
        **kwargs,
    )
    if weights is not None and groups is None:
        groups = np.arange(len(x))  # one group per token
    start = 0
    for size in sizes:
        chunk = y[start : start + size]
        rows, cols = np.nonzero(chunk)
        acc.update(
            torch.from_numpy(x[start : start + size]),
            torch.from_numpy(rows),
            torch.from_numpy(cols),
            torch.from_numpy(chunk[rows, cols]),
            None if weights is None else torch.from_numpy(weights),
            None if groups is None else torch.from_numpy(groups[start : start + size]),
        )
        start += size
    return acc.result()


def test_scores_match_numpy_and_sklearn(monkeypatch):
    monkeypatch.setattr(evaluate, "_BLOCK_ELEMS", 7 * 64)  # several row and feature blocks
    rng = np.random.default_rng(0)
    x, y, direction, intercept = relu_problem(rng, 3000, 12, 9)
    y[:, 4] = 0.0  # never fires: R², r and AUROC undefined
    out = scores_of(
        x, y, direction, intercept, [1000, 1, 1999], compute_dtype=torch.float64, feature_block=4
    )
    pred = x @ direction.T + intercept
    fires = (y != 0).any(0)
    np.testing.assert_allclose(out["r2"][fires], r2(y, pred)[fires], rtol=1e-10)
    np.testing.assert_allclose(
        out["r2_clipped"][fires], r2(y, np.maximum(pred, 0))[fires], rtol=1e-10
    )
    pearson = [np.corrcoef(pred[:, f], y[:, f])[0, 1] for f in np.nonzero(fires)[0]]
    np.testing.assert_allclose(out["pearson"][fires], pearson, rtol=1e-9)
    exact = [roc_auc_score(y[:, f] != 0, pred[:, f]) for f in np.nonzero(fires)[0]]
    np.testing.assert_allclose(out["auroc"][fires], exact, atol=0.01)
    assert 0.7 < min(exact) and max(exact) < 0.999  # neither trivial nor perfect
    assert np.isnan([out[k][4] for k in ("r2", "r2_clipped", "pearson", "auroc")]).all()
    np.testing.assert_array_equal(out["n_firing"], (y != 0).sum(0))
    assert (out["r2_clipped"][fires] > out["r2"][fires]).all()  # the targets are ≥ 0


def test_bootstrap_replicates_are_weighted_scores():
    rng = np.random.default_rng(1)
    x, y, direction, intercept = relu_problem(rng, 640, 8, 5)
    seq_weights = bootstrap_weights(seed=3, chunk=0, n_seq=20, n_boot=6)  # 20 sequences of 32
    assert np.array_equal(seq_weights, bootstrap_weights(3, 0, 20, 6))  # aligned across fits
    assert not np.array_equal(seq_weights, bootstrap_weights(3, 1, 20, 6))
    weights = np.repeat(seq_weights, 32, axis=0)
    out = scores_of(
        x, y, direction, intercept, [320, 320], seq_weights, np.arange(640) // 32, n_boot=6
    )
    per_token = scores_of(x, y, direction, intercept, [100, 540], weights, n_boot=6)
    np.testing.assert_allclose(per_token["r2_boot"], out["r2_boot"], rtol=1e-10)
    plain = scores_of(x, y, direction, intercept, [640])
    for key in ("r2", "r2_clipped", "pearson", "auroc"):
        np.testing.assert_allclose(out[key], plain[key], rtol=1e-6)
    pred = (
        torch.from_numpy(x).float() @ torch.from_numpy(direction).float().T
    ).double().numpy() + intercept  # float32 GEMM, as the accumulator does
    for rep in range(6):
        w = weights[:, rep].astype(np.float64)
        np.testing.assert_allclose(out["r2_boot"][:, rep], r2(y, pred, w), rtol=1e-9)
        np.testing.assert_allclose(
            out["r2_clipped_boot"][:, rep], r2(y, np.maximum(pred, 0), w), rtol=1e-9
        )


def test_rejects_bad_inputs():
    from pipeline.errors import XprobeError

    rng = np.random.default_rng(2)
    x, y, direction, intercept = relu_problem(rng, 10, 4, 3)
    with pytest.raises(XprobeError, match="weights must be"):
        scores_of(x, y, direction, intercept, [10], n_boot=2)
    with pytest.raises(XprobeError, match="expected"):
        scores_of(x[:, :3], y, direction, intercept, [10])


def test_sequence_bootstrap_interval_covers_known_r2():
    """y = xᵀβ + u_seq + ε with a per-sequence effect u (tokens of a sequence are correlated), a
    fixed probe w = β + δ: its population R² is known. 95% percentile intervals from the Poisson
    bootstrap over sequences cover it about 95% of the time; resampling tokens instead (ignoring
    the sequences) gives intervals too narrow to."""
    rng = np.random.default_rng(3)
    d, n_feat, n_seq, ctx, n_boot = 6, 200, 100, 32, 200
    coverage = {"sequence": [], "token": []}
    for draw in range(3):
        beta = rng.normal(size=(d, n_feat)) * rng.uniform(0.2, 1.0, n_feat)
        delta = 0.3 * rng.normal(size=(d, n_feat))
        tau, sigma = 1.2, 0.6
        total = (beta**2).sum(0) + tau**2 + sigma**2
        population = 1 - ((delta**2).sum(0) + tau**2 + sigma**2) / total
        x = rng.normal(size=(n_seq * ctx, d))
        u = np.repeat(rng.normal(size=(n_seq, n_feat)) * tau, ctx, axis=0)
        y = x @ beta + u + sigma * rng.normal(size=(n_seq * ctx, n_feat))
        direction, intercept = (beta + delta).T, np.zeros(n_feat)
        per_seq = bootstrap_weights(draw, 0, n_seq, n_boot)
        per_token = bootstrap_weights(draw, 1, n_seq * ctx, n_boot)
        seq_of_token = np.arange(n_seq * ctx) // ctx
        for kind, weights, groups in (
            ("sequence", per_seq, seq_of_token),
            ("token", per_token, np.arange(n_seq * ctx)),
        ):
            out = scores_of(
                x, y, direction, intercept, [n_seq * ctx], weights, groups, n_boot=n_boot
            )
            low, high = np.percentile(out["r2_boot"], [2.5, 97.5], axis=1)
            coverage[kind].append((low <= population) & (population <= high))
    by_sequence = np.concatenate(coverage["sequence"]).mean()
    by_token = np.concatenate(coverage["token"]).mean()
    assert 0.91 <= by_sequence <= 0.97, by_sequence  # measured 0.935 (0.9355 over 10 draws)
    assert by_token < 0.85, by_token  # measured 0.78


def test_document_bootstrap_interval_covers_known_r2_and_presence():
    """y = xᵀβ + u_doc + ε with per-document effects (u, and x's topic: x = 0.8·z_doc + 0.6·e,
    still N(0, I) over documents) shared by the 4 sequences of each document, a fixed probe w = β + δ (B) and the exact β (the ceiling): R² of each and presence
    R²_B / R²_ceiling are known. 95% intervals from Poisson weights per *document*
    (bootstrap_weights with doc_ids) cover them about 95% of the time; per sequence, they are too
    narrow (the issue's "intervals assume sequences are independent")."""
    from pipeline.maths.presence import percentile_interval, presence_replicates

    rng = np.random.default_rng(5)
    d, n_feat, n_doc, per_doc, ctx, n_boot = 6, 200, 60, 4, 8, 200
    n_seq = n_doc * per_doc
    doc_of_seq = np.repeat(rng.permutation(10 * n_doc)[:n_doc], per_doc)  # any ids will do
    seq_of_token = np.arange(n_seq * ctx) // ctx
    covered = {(kind, what): [] for kind in ("document", "sequence") for what in ("r2", "presence")}
    for draw in range(3):
        beta = rng.normal(size=(d, n_feat)) * rng.uniform(0.3, 1.0, n_feat)
        delta = 0.3 * rng.normal(size=(d, n_feat))
        tau, sigma = 1.0, 0.6
        total = (beta**2).sum(0) + tau**2 + sigma**2
        r2_b = 1 - ((delta**2).sum(0) + tau**2 + sigma**2) / total
        r2_ceiling = (beta**2).sum(0) / total
        presence = r2_b / r2_ceiling
        topic = np.repeat(rng.normal(size=(n_doc, d)), per_doc * ctx, axis=0)
        x = 0.8 * topic + 0.6 * rng.normal(size=(n_seq * ctx, d))
        u = np.repeat(rng.normal(size=(n_doc, n_feat)) * tau, per_doc * ctx, axis=0)
        y = x @ beta + u + sigma * rng.normal(size=(n_seq * ctx, n_feat))
        weights = {
            "document": bootstrap_weights(draw, 0, n_seq, n_boot, doc_ids=doc_of_seq),
            "sequence": bootstrap_weights(draw, 0, n_seq, n_boot),
        }
        for kind, w in weights.items():
            b, ceiling = (
                scores_of(
                    x, y, direction, np.zeros(n_feat), [len(x)], w, seq_of_token, n_boot=n_boot
                )
                for direction in ((beta + delta).T, beta.T)
            )
            low, high = np.percentile(b["r2_boot"], [2.5, 97.5], axis=1)
            covered[kind, "r2"].append((low <= r2_b) & (r2_b <= high))
            scored = (presence > 0.05) & (presence < 0.95)  # away from the clip at 0 and 1
            replicates = presence_replicates(b["r2_boot"], ceiling["r2_boot"], None, scored)
            low, high = percentile_interval(replicates[scored], 0.95)
            covered[kind, "presence"].append((low <= presence[scored]) & (presence[scored] <= high))
    coverage = {key: float(np.concatenate(v).mean()) for key, v in covered.items()}
    # measured: by document 0.932 (R²), 0.938 (presence); by sequence 0.660, 0.675
    assert 0.91 <= coverage["document", "r2"] <= 0.97, coverage
    assert 0.91 <= coverage["document", "presence"] <= 0.97, coverage
    assert coverage["sequence", "r2"] < 0.8 and coverage["sequence", "presence"] < 0.8, coverage


def test_document_weights_are_shared_by_a_document_in_every_chunk():
    """Per-document weights: every sequence of a document has its document's draw, whatever the
    chunk, the order or the other documents beside it; Poisson(1) in distribution."""
    docs = np.array([7, 7, 3, 9, 9, 9])
    w = bootstrap_weights(2, 0, 6, 50, doc_ids=docs)
    assert (w[0] == w[1]).all() and (w[3] == w[5]).all() and not (w[0] == w[2]).all()
    elsewhere = bootstrap_weights(2, 5, 3, 50, doc_ids=np.array([9, 1, 7]))  # another chunk
    assert (elsewhere[0] == w[3]).all() and (elsewhere[2] == w[0]).all()
    assert not (bootstrap_weights(3, 0, 6, 50, doc_ids=docs) == w).all()  # seeded
    many = bootstrap_weights(0, 0, 20000, 20, doc_ids=np.arange(20000)).astype(np.float64)
    assert abs(many.mean() - 1) < 0.01 and abs(many.var() - 1) < 0.02
    assert abs((many == 0).mean() - np.exp(-1)) < 0.005
    with pytest.raises(evaluate.XprobeError, match="one per sequence"):
        bootstrap_weights(0, 0, 5, 3, doc_ids=docs)

"""The affine-map baseline's maths against numpy: dense-target statistics, the GCV ridge map,
scores of an arbitrary predictor, and the linear pre-activation read through the map."""

from __future__ import annotations

import numpy as np
import torch

from pipeline.maths.evaluate import PredictionScores
from pipeline.maths.lstsq import SufficientStats, solve_ridge
from pipeline.maths.stitch import linear_r2_through_map, solve_map

CPU = torch.device("cpu")


def _ridge_gcv(x: np.ndarray, y: np.ndarray, grid: np.ndarray):
    """Reference: per target, ridge with an unpenalised intercept at each λ (closed form on the
    centred rows), λ by GCV with an explicit hat matrix; returns (W [d_y, d_x], b, λ)."""
    n = len(x)
    xc, yc = x - x.mean(0), y - y.mean(0)
    best = np.full(y.shape[1], np.inf)
    weight, lam = np.zeros((y.shape[1], x.shape[1])), np.zeros(y.shape[1])
    for value in grid:
        w = np.linalg.solve(xc.T @ xc + value * np.eye(x.shape[1]), xc.T @ yc)  # [d_x, d_y]
        hat = np.ones((n, n)) / n + xc @ np.linalg.solve(
            xc.T @ xc + value * np.eye(x.shape[1]), xc.T
        )
        gcv = ((yc - xc @ w) ** 2).mean(0) / (1 - np.trace(hat) / n) ** 2
        better = gcv < best
        best[better], weight[better], lam[better] = gcv[better], w.T[better], value
    return weight, y.mean(0) - weight @ x.mean(0), lam


def test_map_is_gcv_ridge_of_dense_targets():
    rng = np.random.default_rng(0)
    n, d_b, d_a = 120, 20, 9
    x = rng.normal(size=(n, d_b)) * rng.uniform(0.1, 3, size=d_b)
    y = x @ rng.normal(size=(d_b, d_a)) * 0.3 + rng.normal(size=d_a)
    y += rng.normal(size=(n, d_a)) * rng.uniform(0.5, 4, size=d_a)  # some targets mostly noise
    y[:, 3] = 2.5  # a constant coordinate: predicted by its mean
    stats = SufficientStats(d_b, d_a, CPU, torch.float64)
    for part in np.array_split(np.arange(n), [50, 51]):  # chunks of 50, 1 and 69 rows
        stats.update_dense(torch.from_numpy(x[part]), torch.from_numpy(y[part]))
    xc, yc = x - x.mean(0), y - y.mean(0)
    np.testing.assert_allclose(stats.cxx.numpy(), xc.T @ xc, rtol=1e-10, atol=1e-9)
    np.testing.assert_allclose(stats.cyx.numpy(), yc.T @ xc, rtol=1e-10, atol=1e-9)
    np.testing.assert_allclose(stats.syy.numpy(), (yc**2).sum(0), rtol=1e-10, atol=1e-9)
    units = (0.0, 1e-2, 1.0, 30.0)
    got = solve_map(stats, units)
    grid = np.asarray(units) * np.trace(xc.T @ xc) / d_b
    weight, bias, lam = _ridge_gcv(x, np.delete(y, 3, 1), grid)
    keep = np.arange(d_a) != 3
    assert len(set(lam)) > 1  # the grid's choice differs between coordinates
    np.testing.assert_allclose(got["lam"][keep], lam, rtol=1e-12)
    np.testing.assert_allclose(got["weight"][keep], weight, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(got["bias"][keep], bias, rtol=1e-7, atol=1e-9)
    assert (got["weight"][3] == 0).all() and got["bias"][3] == 2.5
    residual = y - x @ got["weight"].T - got["bias"]
    total = 1 - (residual**2).sum() / (yc**2).sum()
    np.testing.assert_allclose(got["r2_train_total"], total, rtol=1e-9)


def test_scores_through_a_predictor_and_linear_bound():
    """Held-out R² of ``relu(E·(x·Mᵀ + c) + e)`` against numpy, and the training R² of the
    linear pre-activation, which the least-squares probe's training R² bounds from above."""
    rng = np.random.default_rng(1)
    n, d_b, d_a, n_feat = 400, 10, 6, 15
    x = rng.normal(size=(n, d_b))
    a = x @ rng.normal(size=(d_b, d_a)) + 0.5 * rng.normal(size=(n, d_a))
    enc, enc_b = rng.normal(size=(d_a, n_feat)), rng.normal(size=n_feat) - 1.0
    feats = np.maximum(a @ enc + enc_b + 0.3 * rng.normal(size=(n, n_feat)), 0)
    train, test = slice(0, 300), slice(300, n)
    dense = SufficientStats(d_b, d_a, CPU, torch.float64)
    dense.update_dense(torch.from_numpy(x[train]), torch.from_numpy(a[train]))
    mapped = solve_map(dense, (0.0,))
    m, c = mapped["weight"], mapped["bias"]
    np.testing.assert_allclose(
        np.c_[m, c],
        np.linalg.lstsq(np.c_[x[train], np.ones(300)], a[train], rcond=None)[0].T,
        rtol=1e-8,
        atol=1e-10,
    )

    def predict(xb: torch.Tensor) -> torch.Tensor:
        y = xb.double() @ torch.from_numpy(m).T + torch.from_numpy(c)
        return torch.relu(y @ torch.from_numpy(enc) + torch.from_numpy(enc_b))

    probe = SufficientStats(d_b, n_feat, CPU, torch.float64)
    rows, cols = np.nonzero(feats[train])
    probe.update(
        torch.from_numpy(x[train]),
        torch.from_numpy(rows),
        torch.from_numpy(cols),
        torch.from_numpy(feats[train][rows, cols]),
    )
    scores = PredictionScores(
        predict,
        n_feat,
        d_b,
        probe.mean_y,
        torch.sqrt(probe.syy / probe.n),
        CPU,
        torch.float64,
        block_rows=7,  # several predictor calls per update
    )
    rows, cols = np.nonzero(feats[test])
    for part in (slice(0, 37), slice(37, 100)):
        keep = (rows >= part.start) & (rows < part.stop)
        scores.update(
            torch.from_numpy(x[test][part]),
            torch.from_numpy(rows[keep] - part.start),
            torch.from_numpy(cols[keep]),
            torch.from_numpy(feats[test][rows[keep], cols[keep]]),
        )
    got = scores.result()
    pred = np.maximum((x[test] @ m.T + c) @ enc + enc_b, 0)
    truth = feats[test]
    expect = 1 - ((truth - pred) ** 2).sum(0) / ((truth - truth.mean(0)) ** 2).sum(0)
    np.testing.assert_allclose(got["r2"], expect, rtol=1e-9)
    # linear pre-activation through the map on train, against numpy; below least squares
    linear = linear_r2_through_map(
        probe, m, c, torch.from_numpy(enc), torch.from_numpy(enc_b), feature_block=4
    )
    pre = (x[train] @ m.T + c) @ enc + enc_b
    y = feats[train]
    expect = 1 - ((y - pre) ** 2).sum(0) / ((y - y.mean(0)) ** 2).sum(0)
    np.testing.assert_allclose(linear, expect, rtol=1e-9)
    ols = solve_ridge(probe, None, [0.0], min_active=1)["r2_train"]
    assert (ols >= linear - 1e-12).all()
    assert (ols - linear).max() > 0.01  # the bound is not trivially tight here

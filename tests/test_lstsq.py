"""Streaming ridge probes against numpy.linalg.lstsq, sklearn Ridge and direct held-out scoring."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.linear_model import Ridge

from pipeline.maths.lstsq import (
    STATUS_CONSTANT_HELD_OUT,
    STATUS_CONSTANT_TRAIN,
    STATUS_DEAD,
    STATUS_OK,
    STATUS_RARE,
    SufficientStats,
    solve_ridge,
)

CPU = torch.device("cpu")


def sparse_targets(
    rng: np.random.Generator, x: np.ndarray, n_feat: int, noise: float
) -> np.ndarray:
    """Dense reference Y [n, n_feat]: linear in x plus noise, with 20–50% of entries zeroed."""
    weights = rng.normal(size=(x.shape[1], n_feat)) / np.sqrt(x.shape[1])
    y = x @ weights + rng.normal(size=n_feat) + noise * rng.normal(size=(x.shape[0], n_feat))
    zero_rate = rng.uniform(0.2, 0.5, size=n_feat)
    return np.where(rng.random(y.shape) < zero_rate, 0.0, y)


def feed(
    stats: SufficientStats, x: np.ndarray | torch.Tensor, y: np.ndarray, sizes: list[int]
) -> None:
    """Update ``stats`` with consecutive chunks of the given sizes, Y passed as shuffled COO.

    A few zero entries of Y are stored explicitly: they must count as zeros, not as active.
    """
    assert sum(sizes) == len(x)
    start = 0
    for size in sizes:
        chunk_y = y[start : start + size]
        rng = np.random.default_rng(size)
        rows, cols = np.nonzero((chunk_y != 0) | (rng.random(chunk_y.shape) < 0.05))
        order = rng.permutation(len(rows))
        rows, cols = rows[order], cols[order]
        stats.update(
            torch.as_tensor(x[start : start + size]),
            torch.from_numpy(rows),
            torch.from_numpy(cols),
            torch.from_numpy(chunk_y[rows, cols]),
        )
        start += size


def fitted(
    x: np.ndarray | torch.Tensor, y: np.ndarray, sizes: list[int], **kwargs
) -> SufficientStats:
    stats = SufficientStats(x.shape[1], y.shape[1], CPU, **kwargs)
    feed(stats, x, y, sizes)
    return stats


def r2(y: np.ndarray, pred: np.ndarray) -> np.ndarray:
    return 1 - ((y - pred) ** 2).sum(0) / ((y - y.mean(0)) ** 2).sum(0)


def test_matches_lstsq_and_sklearn_ridge():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(3000, 16)) * rng.uniform(0.5, 3, size=16) + rng.normal(size=16)
    y = sparse_targets(rng, x, 10, noise=0.5)
    stats = fitted(x, y, [1, 700, 1299, 1000], compute_dtype=torch.float64)
    assert stats.n == 3000
    np.testing.assert_array_equal(stats.n_active.numpy(), (y != 0).sum(0))

    design = np.hstack([x, np.ones((len(x), 1))])
    solution = np.linalg.lstsq(design, y, rcond=None)[0]
    out = solve_ridge(stats, None, [0.0], direction_dtype=torch.float64)
    np.testing.assert_allclose(out["direction"], solution[:-1].T, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(out["intercept"], solution[-1], rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(out["r2_train"], r2(y, design @ solution), rtol=1e-6)
    assert (out["status"] == STATUS_OK).all()

    for alpha in [0.1, 30.0, 3000.0]:
        ridge = Ridge(alpha=alpha, fit_intercept=True, solver="svd").fit(x, y)
        out = solve_ridge(stats, None, [alpha], direction_dtype=torch.float64)
        np.testing.assert_array_equal(out["lam"], alpha)
        np.testing.assert_allclose(out["direction"], ridge.coef_, rtol=1e-6, atol=1e-12)
        np.testing.assert_allclose(out["intercept"], ridge.intercept_, rtol=1e-6, atol=1e-12)
        np.testing.assert_allclose(out["r2_train"], r2(y, ridge.predict(x)), rtol=1e-6)


def ill_conditioned_x(rng: np.random.Generator, n: int) -> np.ndarray:
    """float32 [n, 10]: offset 1e3, spreads 1..100, one 1e5 outlier, exactly collinear columns.

    Values are multiples of 1/16 below 2^18, so sums of two columns are exact in float32.
    """
    x = 1e3 + rng.normal(size=(n, 10)) * np.geomspace(1, 100, 10)
    x[17, 0] = 1e5
    x = np.round(x * 16) / 16
    x[:, 8] = x[:, 2]  # a copy
    x[:, 9] = x[:, 0] + x[:, 4]  # a combination (exact: few mantissa bits used)
    x32 = x.astype(np.float32)
    assert np.array_equal(x32.astype(np.float64), x)
    return x32


@pytest.mark.parametrize(("compute_dtype", "rtol"), [(torch.float64, 1e-9), (torch.float32, 1e-5)])
def test_ill_conditioned_float32_chunks(compute_dtype, rtol):
    """float32 products limit accuracy to ~1e-6 here (one 1e5 token in an fp32 accumulator);
    centring in float64 is what keeps it there: an uncentred fp32 Gram matrix is off by ~1e-1."""
    rng = np.random.default_rng(1)
    x32 = ill_conditioned_x(rng, 3000)
    x = x32.astype(np.float64)
    y = sparse_targets(rng, (x - 1e3) / 30, 6, noise=0.3)
    stats = fitted(x32, y, [900, 1100, 1000], compute_dtype=compute_dtype)
    out = solve_ridge(stats, None, [0.0], direction_dtype=torch.float64)

    centred_x, centred_y = x - x.mean(0), y - y.mean(0)
    min_norm = np.linalg.lstsq(centred_x, centred_y, rcond=None)[0]  # [d, F], rank 8 of 10
    assert np.linalg.matrix_rank(centred_x) == 8
    reference = centred_x @ min_norm + y.mean(0)
    prediction = x @ out["direction"].T + out["intercept"]
    scale = np.abs(reference).max(0)
    np.testing.assert_array_less(np.abs(prediction - reference).max(0), rtol * scale)
    np.testing.assert_allclose(out["r2_train"], r2(y, reference), rtol=rtol)
    if compute_dtype == torch.float64:
        np.testing.assert_allclose(out["direction"], min_norm.T, rtol=1e-7, atol=1e-9)


def test_held_out_scores_match_direct_prediction():
    rng = np.random.default_rng(2)
    x = rng.normal(size=(2500, 12)) * 2 + 5
    y = sparse_targets(rng, x, 8, noise=1.0)
    train = fitted(x[:2000], y[:2000], [1000, 1000], compute_dtype=torch.float64)
    held_out = fitted(x[2000:], y[2000:], [123, 377], compute_dtype=torch.float64)
    out = solve_ridge(
        train, held_out, [0.0, 10.0, 1e3, 1e5], feature_block=3, direction_dtype=torch.float64
    )
    assert (out["status"] == STATUS_OK).all()
    assert len(set(out["lam"])) > 1  # the per-feature choice is exercised

    prediction = x[2000:] @ out["direction"].T + out["intercept"]
    np.testing.assert_allclose(out["r2_held_out"], r2(y[2000:], prediction), rtol=1e-8)
    pearson = [np.corrcoef(prediction[:, f], y[2000:, f])[0, 1] for f in range(8)]
    np.testing.assert_allclose(out["pearson_held_out"], pearson, rtol=1e-8)
    train_prediction = x[:2000] @ out["direction"].T + out["intercept"]
    np.testing.assert_allclose(out["r2_train"], r2(y[:2000], train_prediction), rtol=1e-8)
    np.testing.assert_array_equal(out["n_active_held_out"], (y[2000:] != 0).sum(0))


def test_moments_match_numpy_and_merge_equals_single_pass():
    rng = np.random.default_rng(3)
    x = (rng.normal(size=(1200, 8)) * 10 + 100).astype(np.float32)
    y = sparse_targets(rng, x.astype(np.float64) / 10, 5, noise=0.1)
    whole = fitted(x, y, [1200], compute_dtype=torch.float64)
    centred_x = x.astype(np.float64) - x.astype(np.float64).mean(0)
    centred_y = y - y.mean(0)
    moments = {
        "mean_x": x.astype(np.float64).mean(0),
        "mean_y": y.mean(0),
        "cxx": centred_x.T @ centred_x,
        "cyx": centred_y.T @ centred_x,
        "syy": (centred_y**2).sum(0),
    }
    for name, value in moments.items():
        np.testing.assert_allclose(getattr(whole, name).numpy(), value, rtol=1e-10, atol=1e-10)

    left = fitted(x[:300], y[:300], [100, 1, 199], compute_dtype=torch.float64)
    right = fitted(x[300:], y[300:], [450, 450], compute_dtype=torch.float64)
    merged = SufficientStats(8, 5, CPU)
    merged.merge(left)
    merged.merge(SufficientStats(8, 5, CPU))  # merging nothing changes nothing
    merged.merge(right)
    assert merged.n == whole.n
    for name in moments:
        a, b = getattr(merged, name).numpy(), getattr(whole, name).numpy()
        np.testing.assert_allclose(a, b, rtol=1e-12, atol=1e-12 * np.abs(b).max())
    assert torch.equal(merged.n_active, whole.n_active)

    state = whole.state_dict()
    restored = SufficientStats.from_state_dict(state, CPU, torch.float64)
    from_numpy = SufficientStats.from_state_dict(
        {k: v.numpy() for k, v in state.items()}, CPU, torch.float64
    )
    feed(whole, x[:100], y[:100], [100])  # the saved state must not alias live buffers
    for copy in (restored, from_numpy):
        assert copy.n == 1200
        for name, value in state.items():
            if name != "n":
                assert torch.equal(getattr(copy, name), value)
        feed(copy, x[:100], y[:100], [100])
        for name in ("mean_x", "mean_y", "cxx", "cyx", "syy", "n_active"):
            assert torch.equal(getattr(copy, name), getattr(whole, name))


def test_status_codes_and_no_nan():
    rng = np.random.default_rng(4)
    x = rng.normal(size=(1000, 6))
    y = sparse_targets(rng, x, 6, noise=0.5)
    train, held = slice(0, 800), slice(800, 1000)
    y[:, 1] = 0.0  # dead
    y[:, 2] = 0.0
    y[[5, 50, 500], 2] = 1.0  # too rare (3 < min_active)
    y[held, 3] = 0.0  # constant in held-out
    y[train, 4] = 2.0  # active on every train token with one value: constant in train
    stats_train = fitted(x[train], y[train], [400, 400])
    stats_held = fitted(x[held], y[held], [200])
    out = solve_ridge(stats_train, stats_held, [0.0, 1.0], min_active=5)

    expected = [
        STATUS_OK,
        STATUS_DEAD,
        STATUS_RARE,
        STATUS_CONSTANT_HELD_OUT,
        STATUS_CONSTANT_TRAIN,
        STATUS_OK,
    ]
    np.testing.assert_array_equal(out["status"], expected)
    for name, value in out.items():
        assert np.isfinite(value).all(), name
    bad = out["status"] != STATUS_OK
    assert not out["direction"][bad].any()
    for name in ("r2_train", "r2_held_out", "pearson_held_out", "lam"):
        assert not out[name][bad].any(), name
    np.testing.assert_allclose(out["intercept"][bad], y[train][:, bad].mean(0))
    assert out["r2_held_out"][~bad].min() > 0.1
    np.testing.assert_array_equal(out["n_active_train"], (y[train] != 0).sum(0))


def test_lambda_choice_is_gcv_argmin_on_train_only():
    """λ is chosen by GCV from training statistics: equal to an explicit hat-matrix GCV in numpy,
    close to sklearn RidgeCV's leave-one-out errors, and blind to the held-out tokens."""
    from sklearn.linear_model import RidgeCV

    rng = np.random.default_rng(5)
    n_train, d = 120, 50  # d close to n_train and noisy: shrinkage pays
    x = rng.normal(size=(n_train + 400, d))
    y = sparse_targets(rng, x, 12, noise=0.0)
    y += np.where(y != 0, rng.normal(size=y.shape) * np.geomspace(0.02, 10, 12), 0.0)
    lambdas = [0.0, 1.0, 10.0, 100.0, 1000.0]
    train = fitted(x[:n_train], y[:n_train], [50, 70], compute_dtype=torch.float64)
    held_out = fitted(x[n_train:], y[n_train:], [400], compute_dtype=torch.float64)
    out = solve_ridge(train, held_out, lambdas, feature_block=5)

    xt, yt = x[:n_train], y[:n_train]
    xc = xt - xt.mean(0)
    gcv = []
    for alpha in lambdas:  # explicit hat matrix of ridge with an unpenalised intercept
        hat = (
            np.full((n_train, n_train), 1 / n_train)
            + xc @ np.linalg.pinv(xc.T @ xc + alpha * np.eye(d)) @ xc.T
        )
        residual = yt - hat @ yt
        df = np.trace(hat)
        gcv.append((residual**2).mean(0) / (1 - df / n_train) ** 2)
        assert np.isclose(out["df"][lambdas.index(alpha)], df, rtol=1e-9)
    gcv = np.stack(gcv)  # [L, F]
    np.testing.assert_array_equal(out["lam"], np.array(lambdas)[gcv.argmin(0)])
    sst = ((yt - yt.mean(0)) ** 2).mean(0)
    np.testing.assert_allclose(out["r2_gcv"], 1 - gcv.min(0) / sst, rtol=1e-8)
    assert len(set(out["lam"])) >= 3  # the per-feature choice is exercised

    # sklearn's "GCV mode" is exact leave-one-out: per-token leverages instead of their mean
    grid = lambdas[1:]  # RidgeCV needs alphas > 0
    ridge_cv = RidgeCV(alphas=grid, alpha_per_target=True, store_cv_results=True).fit(xt, yt)
    loo = ridge_cv.cv_results_.mean(0).T  # [L-1, F] mean squared leave-one-out error
    ours = solve_ridge(train, None, grid)
    np.testing.assert_allclose(gcv[1:], loo, rtol=0.15)  # d/n = 0.4: leverages vary
    agree = ours["lam"] == ridge_cv.alpha_
    assert agree.mean() >= 0.75
    # where they disagree, our λ is near-optimal by sklearn's own criterion
    ours_loo = loo[[grid.index(lam) for lam in ours["lam"]], np.arange(12)]
    np.testing.assert_array_less(ours_loo, 1.05 * loo.min(0))

    # the held-out tokens do not choose: scrambling them changes scores, never λ or direction
    scrambled = fitted(
        x[n_train:], rng.permutation(y[n_train:]), [400], compute_dtype=torch.float64
    )
    other = solve_ridge(train, scrambled, lambdas, feature_block=5)
    np.testing.assert_array_equal(other["lam"], out["lam"])
    np.testing.assert_array_equal(other["direction"], out["direction"])
    assert not np.allclose(other["r2_held_out"], out["r2_held_out"])

    held_x, held_y = x[n_train:], y[n_train:]
    design = np.hstack([xt, np.ones((n_train, 1))])
    ols = np.linalg.lstsq(design, yt, rcond=None)[0]
    predictions = [held_x @ ols[:-1] + ols[-1]]
    for alpha in lambdas[1:]:
        predictions.append(Ridge(alpha=alpha).fit(xt, yt).predict(held_x))
    per_lambda = np.stack([r2(held_y, p) for p in predictions])  # [L, F]
    np.testing.assert_allclose(out["mean_r2_held_out"], per_lambda.mean(1), rtol=1e-8)
    chosen = per_lambda[[lambdas.index(lam) for lam in out["lam"]], np.arange(12)]
    np.testing.assert_allclose(out["r2_held_out"], chosen, rtol=1e-8)
    np.testing.assert_array_equal(out["lambdas"], lambdas)


def test_rejects_bad_inputs():
    from pipeline.errors import XprobeError

    stats = SufficientStats(4, 3, CPU)
    with pytest.raises(XprobeError, match="no training tokens"):
        solve_ridge(stats, None, [0.0])
    feed(stats, np.ones((5, 4)), np.ones((5, 3)), [5])
    with pytest.raises(XprobeError, match="lambdas"):
        solve_ridge(stats, None, [-1.0])
    with pytest.raises(XprobeError, match="expected"):
        stats.update(torch.ones(5, 3), *torch.zeros(3, 0, dtype=torch.int64))


def test_bfloat16_input_is_centred_in_float64():
    rng = np.random.default_rng(6)
    x = torch.from_numpy(rng.normal(size=(500, 6)) + 300).to(torch.bfloat16)
    y = sparse_targets(rng, x.double().numpy(), 4, noise=0.5)
    from_bf16 = fitted(x, y, [200, 300], compute_dtype=torch.float64)
    from_f64 = fitted(x.double().numpy(), y, [200, 300], compute_dtype=torch.float64)
    for name in ("mean_x", "cxx", "cyx", "syy"):
        assert torch.equal(getattr(from_bf16, name), getattr(from_f64, name))


def test_score_of_gcv_choice_is_unbiased_where_held_out_choice_is_optimistic():
    """Known population R² (x ~ N(0, I), y = xᵀβ + ε): a probe chosen without the held-out tokens
    scores on them with the bias of a *fixed* probe (the true β's held-out R², scored the same
    way: a small finite-sample bias); choosing λ by held-out error adds optimism on top."""
    rng = np.random.default_rng(7)
    d, n_feat, n_train, n_held = 40, 400, 300, 100
    lambdas = [0.0, *np.geomspace(1, 1e4, 9)]
    excess_new, excess_old = [], []

    def bias(out: dict[str, np.ndarray], beta: np.ndarray) -> np.ndarray:
        """Held-out R² minus population R² of the probe (w, b): E(y − xᵀw − b)² = |β − w|² + b² + 1."""
        w, b = out["direction"].T, out["intercept"]
        population_var = (beta**2).sum(0) + 1.0
        population = 1 - (((beta - w) ** 2).sum(0) + b**2 + 1.0) / population_var
        return out["r2_held_out"] - population

    for _ in range(4):
        beta = rng.normal(size=(d, n_feat)) * rng.uniform(0.02, 0.3, n_feat)
        population_var = (beta**2).sum(0) + 1.0
        x = rng.normal(size=(n_train + n_held, d))
        y = x @ beta + rng.normal(size=(n_train + n_held, n_feat))
        train = fitted(x[:n_train], y[:n_train], [n_train], compute_dtype=torch.float64)
        held = fitted(x[n_train:], y[n_train:], [n_held], compute_dtype=torch.float64)

        fixed = r2(y[n_train:], x[n_train:] @ beta) - (beta**2).sum(0) / population_var
        new = solve_ridge(train, held, lambdas, direction_dtype=torch.float64)
        per_lambda = [
            solve_ridge(train, held, [lam], direction_dtype=torch.float64) for lam in lambdas
        ]
        old_bias = np.stack([bias(out, beta) for out in per_lambda])
        old_choice = np.stack([out["r2_held_out"] for out in per_lambda]).argmax(0)
        excess_new.append(bias(new, beta) - fixed)
        excess_old.append(old_bias[old_choice, np.arange(n_feat)] - fixed)
    new_excess, old_excess = np.concatenate(excess_new), np.concatenate(excess_old)
    se = np.sqrt(len(new_excess))
    assert abs(new_excess.mean()) < 3 * new_excess.std() / se  # GCV: no selection bias
    assert old_excess.mean() > max(0.005, 6 * old_excess.std() / se)  # held-out choice: optimistic

"""The affine-map baseline (model stitching, Chen et al. 2025): one ridge map from B's residual
stream to A's, and A's SAE read through it.

The map ``ŷ = x·Mᵀ + c`` (``x [n, d_B]`` B's residual at one hook, ``ŷ [n, d_A]`` A's residual at
the SAE's hook, as the SAE reads it) is fitted from the same streaming statistics as the probes,
with dense targets (:meth:`pipeline.maths.lstsq.SufficientStats.update_dense`: centred ``XᵀX``
``[d_B, d_B]`` and ``YᵀX`` ``[d_A, d_B]``, float64). Each of the d_A output coordinates is one
ridge problem solved by :func:`pipeline.maths.lstsq.solve_ridge`, its λ chosen by GCV on the
training statistics like a probe's (the grid in units of the mean eigenvalue of B's centred XᵀX).
A's SAE encoder applied to mapped test activations, ``sae.encode(x·Mᵀ + c)``, is one predictor of
every feature at once; its test scores come from :class:`pipeline.maths.evaluate.PredictionScores`.

Where the SAE's pre-activation is affine in its input (``pre(ŷ) = ŷ·E + e``: ReLU, TopK, JumpReLU
SAEs), the pre-activation read through the map is a *linear* predictor of the feature from x,
direction ``Mᵀ E_f`` and intercept ``c·E_f + e_f``; its training R² comes from the probes'
statistics (:func:`linear_r2_through_map`). The least-squares probe is the best linear predictor
on the training tokens, so its training R² bounds this one from above.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from pipeline.errors import XprobeError
from pipeline.lazy import torch
from pipeline.maths.lstsq import SufficientStats, r2_from_stats, solve_ridge


def solve_map(
    train: SufficientStats, lambdas: Sequence[float], feature_block: int = 16384
) -> dict[str, np.ndarray]:
    """The ridge map from the dense statistics ``train`` (x: B's residual ``[d_B]``, targets:
    A's residual ``[d_A]``). ``lambdas`` in units of the mean eigenvalue of train cxx; λ per output
    coordinate by GCV. Returns numpy ``weight [d_A, d_B]`` (M, float64), ``bias [d_A]`` (c),
    ``lam [d_A]``, ``r2_train [d_A]``, ``r2_gcv [d_A]`` (per coordinate of A's residual; a constant
    coordinate is predicted by its mean: weight 0, R² 0) and ``r2_train_total`` (0-d: share of
    A's total residual variance the map explains on the training tokens)."""
    if train.n == 0:
        raise XprobeError("the affine map has no training tokens")
    scale = float(torch.trace(train.cxx)) / train.d
    grid = [lam * scale for lam in lambdas]
    solved = solve_ridge(
        train, None, grid, feature_block, min_active=1, direction_dtype=torch.float64
    )
    syy = train.syy.cpu().numpy()
    ok = solved["status"] == 0
    rss = np.where(ok, (1 - solved["r2_train"]) * syy, syy)
    total = float(syy.sum())
    return {
        "weight": solved["direction"],
        "bias": solved["intercept"],
        "lam": solved["lam"],
        "r2_train": solved["r2_train"],
        "r2_gcv": solved["r2_gcv"],
        "r2_train_total": np.asarray(1 - rss.sum() / total if total > 0 else 0.0),
    }


def linear_r2_through_map(
    probe_train: SufficientStats,
    weight: np.ndarray | torch.Tensor,
    bias: np.ndarray | torch.Tensor,
    enc_weight: torch.Tensor,
    enc_bias: torch.Tensor,
    feature_block: int = 16384,
) -> np.ndarray:
    """Training R² ``[F]`` of the SAE's affine pre-activation read through the map, as a predictor
    of each feature from B's activations: direction ``Mᵀ E_f`` and intercept ``c·E_f + e_f``,
    from the probes' training statistics (``probe_train``: x = B, y = the F features).
    ``weight [d_A, d_B]``, ``bias [d_A]`` (the map), ``enc_weight [d_A, F]``, ``enc_bias [F]``
    (the SAE's pre-activation ``ŷ·E + e``). NaN where a feature is constant on train."""
    dev = probe_train.device
    m = torch.as_tensor(weight).to(dev, torch.float64)
    c = torch.as_tensor(bias).to(dev, torch.float64)
    n_feat = enc_weight.shape[1]
    if enc_weight.shape[0] != m.shape[0] or n_feat != probe_train.n_feat:
        raise XprobeError(
            f"encoder [{enc_weight.shape[0]}, {n_feat}] does not fit the map [{m.shape[0]}, "
            f"{m.shape[1]}] and {probe_train.n_feat} features"
        )
    out = np.full(n_feat, np.nan)
    for start in range(0, n_feat, feature_block):
        block = slice(start, min(start + feature_block, n_feat))
        e = enc_weight[:, block].to(dev, torch.float64)  # [d_A, B]
        direction = e.T @ m  # [B, d_B]
        intercept = c @ e + enc_bias[block].to(dev, torch.float64)
        sub = _feature_slice(probe_train, block)
        out[block] = r2_from_stats(sub, direction, intercept, feature_block)
    return out


def _feature_slice(stats: SufficientStats, block: slice) -> SufficientStats:
    """A view of ``stats`` restricted to the features in ``block`` (no copy of cxx)."""
    sub = SufficientStats.__new__(SufficientStats)
    sub.__dict__.update(stats.__dict__)
    sub.mean_y, sub.cyx, sub.syy = stats.mean_y[block], stats.cyx[block], stats.syy[block]
    sub.n_active = stats.n_active[block]
    sub.n_feat = sub.syy.shape[0]
    return sub

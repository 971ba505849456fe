"""Direct SAE transfer (Kissane et al. 2024): model A's SAE on model B's activations.

The features stage adds, per batch of counted tokens, float64 partial sums for each B
(:func:`add_transfer_sums`) into ``pair [len(PAIR), n_feat]`` and
``scalars [len(SCALARS) + 2 * d_model]``, stores them per chunk, and at finalize turns their
sums over chunks into the per-feature A/B correlation and the scalar metrics
(:func:`transfer_metrics`). Explained variance is
``1 - sum ||x - sae.decode(sae.encode(x))||^2 / sum ||x - mean(x)||^2`` over counted tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from pipeline.lazy import torch

PAIR = ("sum_b", "sum_bb", "sum_ab")
"""Rows of ``chunk_transfer/<B>/pair``: per-feature partial sums for the A/B correlation."""
SCALARS = ("n", "sse_a", "sse_b", "sumsq_a", "sumsq_b", "sum_cos")
"""First entries of ``chunk_transfer/<B>/scalars``; then sum of x_A [d_model], sum of x_B [d_model]."""


def add_transfer_sums(
    sae: Any,
    encode: Callable[[torch.Tensor], torch.Tensor],
    xa: torch.Tensor,
    fa: torch.Tensor,
    xb: torch.Tensor,
    keep: torch.Tensor,
    pair: torch.Tensor,
    scalars: torch.Tensor,
) -> None:
    """Add one batch's partial sums for the transfer metrics of B (counted tokens only).

    ``xa``, ``xb`` ``[n, d_model]`` are A's and B's activations, ``fa [n, n_feat]`` is
    ``encode(xa)`` and ``keep [n]`` marks the counted tokens.
    """
    fb = encode(xb)[keep].double()
    fa = fa[keep].double()
    xa, xb = xa[keep], xb[keep]
    rec_a, rec_b = (
        sae.decode(fa.to(sae.dtype)),
        sae.decode(fb.to(sae.dtype)),
    )
    xa64, xb64 = xa.double(), xb.double()
    pair[0] += fb.sum(0).cpu()
    pair[1] += fb.square().sum(0).cpu()
    pair[2] += (fa * fb).sum(0).cpu()
    cos = torch.nn.functional.cosine_similarity(xa64, xb64, dim=1)
    d = xa.shape[1]
    scalars[:6] += torch.stack(
        [
            torch.tensor(float(len(xa)), dtype=torch.float64),
            (xa64 - rec_a.double()).square().sum().cpu(),
            (xb64 - rec_b.double()).square().sum().cpu(),
            xa64.square().sum().cpu(),
            xb64.square().sum().cpu(),
            cos.sum().cpu(),
        ]
    )
    scalars[6 : 6 + d] += xa64.sum(0).cpu()
    scalars[6 + d :] += xb64.sum(0).cpu()


def transfer_metrics(
    pair: np.ndarray, scal: np.ndarray, sum_a: np.ndarray, sum_sq_a: np.ndarray, d: int
) -> tuple[np.ndarray, dict[str, float]]:
    """B's transfer metrics from the summed ``pair`` and ``scalars`` partials and A's per-feature
    ``sum`` and ``sum_sq`` ``[n_feat]`` (``d`` = d_model).

    Returns ``corr [n_feat]`` (Pearson correlation of each feature on A and on B; NaN where a
    side is constant) and the scalars recorded in the provenance.
    """
    n = max(scal[0], 1.0)
    mean_a, mean_b = sum_a / n, pair[0] / n
    cov = pair[2] / n - mean_a * mean_b
    var_a, var_b = sum_sq_a / n - mean_a**2, pair[1] / n - mean_b**2
    with np.errstate(invalid="ignore", divide="ignore"):
        corr = np.where((var_a > 0) & (var_b > 0), cov / np.sqrt(var_a * var_b), np.nan)
    sum_xa, sum_xb = scal[6 : 6 + d], scal[6 + d :]
    tss_a = scal[3] - np.square(sum_xa).sum() / n
    tss_b = scal[4] - np.square(sum_xb).sum() / n
    return corr, {
        "explained_variance_a": float(1 - scal[1] / tss_a),
        "explained_variance_b": float(1 - scal[2] / tss_b),
        "mean_cosine": float(scal[5] / n),
        "mean_corr": float(np.nanmean(corr)) if np.isfinite(corr).any() else float("nan"),
        "n_counted": int(scal[0]),
    }

"""Writing side of sparse feature storage (the reading side is :mod:`pipeline.store.sparse`).

The features stage turns an SAE's dense output ``[n, n_feat]`` into fixed-width rows
``idx [n, K] int32`` (-1 = padding) and ``val [n, K]`` with :func:`pack_sparse`, and sums exact
per-feature statistics from every non-zero before the width limit: per-chunk partials
``[len(STATS), n_feat]`` (float64) with :func:`add_feature_stats`, the whole run's
``stats/*`` arrays from them with :func:`feature_stats`.
"""

from __future__ import annotations

import math

import numpy as np

from pipeline.lazy import torch

STATS = ("count", "sum", "sum_sq", "max")
"""Rows of ``chunk_stats``: per-feature partial statistics of one chunk (float64)."""
CALIBRATION_TOKENS = 4096
"""Counted tokens of chunk 0 whose largest L0 sets the default top-K width."""


def calibrated_k(l0: int, n_feat: int) -> int:
    """Default top-K width for a largest L0 of ``l0``: 1.5 x, rounded up to a multiple of 8."""
    return min(n_feat, max(8, math.ceil(1.5 * l0 / 8) * 8))


def pack_sparse(
    feats: torch.Tensor, keep: torch.Tensor, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Fixed-width sparse form of ``feats [n, n_feat]`` (rows where ``keep`` is False dropped).

    Returns ``idx [n, k]`` (int32, -1 = padding) and ``val [n, k]``: each kept row's non-zero
    features in ascending id order; a row with more than ``k`` keeps its ``k`` largest
    |activations| (still in id order). Also returns every kept non-zero entry, before the
    width limit, as ``(cols, vals)``: the exact statistics come from those. Cost
    is one pass over ``feats`` plus O(nnz); ``topk`` runs only on overflowing rows.
    """
    n, n_feat = feats.shape
    flat = feats.reshape(-1)
    where = flat.nonzero().squeeze(1)  # row-major order
    rows = where // n_feat
    if not bool(keep.all()):
        kept = keep[rows]
        where, rows = where[kept], rows[kept]
    cols = where - rows * n_feat
    vals = flat[where]
    counts = torch.bincount(rows, minlength=n)
    starts = torch.cumsum(counts, 0) - counts
    target = rows * k + (torch.arange(len(rows), device=feats.device) - starts[rows])
    idx = torch.full((n * k,), -1, dtype=torch.int32, device=feats.device)
    val = torch.zeros(n * k, dtype=feats.dtype, device=feats.device)
    over = (counts > k).nonzero().squeeze(1)
    if len(over):
        fits = counts[rows] <= k
        idx[target[fits]], val[target[fits]] = cols[fits].to(torch.int32), vals[fits]
    else:
        idx[target], val[target] = cols.to(torch.int32), vals
    idx, val = idx.view(n, k), val.view(n, k)
    if len(over):
        dense = feats[over]
        top = dense.abs().topk(k, dim=1).indices.sort(dim=1).values
        idx[over], val[over] = top.to(torch.int32), dense.gather(1, top)
    return idx, val, cols, vals


def new_feature_stats(n_feat: int) -> torch.Tensor:
    """Empty per-chunk ``STATS`` rows ``[len(STATS), n_feat]`` (float64; ``max`` starts at -inf)."""
    stats = torch.zeros(len(STATS), n_feat, dtype=torch.float64)
    stats[3] = -math.inf
    return stats


def add_feature_stats(
    stats: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, n_counted: int
) -> None:
    """Add a batch's exact per-feature ``STATS`` rows from its non-zero entries (float64).

    ``max`` is over all counted tokens, zeros included, as a dense ``amax`` would give: a
    feature that is zero on some counted token has a max of at least 0.
    """
    n_feat = stats.shape[1]
    count = torch.bincount(cols, minlength=n_feat).double()
    stats[0] += count
    stats[1].index_add_(0, cols, vals)
    stats[2].index_add_(0, cols, vals * vals)
    if n_counted == 0:
        return
    peak = torch.full((n_feat,), -math.inf, dtype=torch.float64)
    peak.scatter_reduce_(0, cols, vals, reduce="amax")
    peak = torch.where(count < n_counted, peak.clamp_min(0.0), peak)
    torch.maximum(stats[3], peak, out=stats[3])


def feature_stats(partial: np.ndarray, n_counted: int, n_feat: int) -> dict[str, np.ndarray]:
    """The stored ``stats/*`` arrays ``[n_feat]`` from every chunk's ``STATS`` rows
    ``partial [n_chunks, len(STATS), n_feat]``, summed in chunk order: the same bits whether or
    not the run was resumed. ``mean`` is over all ``n_counted`` tokens (zeros included)."""
    stats = partial[:, :3].sum(0)
    peak = partial[:, 3].max(0) if len(partial) else np.zeros(n_feat)
    count = stats[0].astype(np.int64)
    return {
        "count": count,
        "frequency": count / max(n_counted, 1),
        "mean": stats[1] / max(n_counted, 1),
        "max": np.where(np.isfinite(peak), peak, 0.0),
        "sum": stats[1],
        "sum_sq": stats[2],
        "dead": count == 0,
    }

"""Per-token residual norms: a log-space histogram that sums across chunks, and its quantiles.

Attention-sink / BOS-like positions can have residual L2 norms far above the median; the
activations stage records, per chunk of each unit, how many tokens' norms fall in each bin of a
fixed log2 grid (``BINS_PER_OCTAVE`` bins per doubling from ``2**LOG2_MIN`` to ``2**LOG2_MAX``,
plus an underflow bin below and an overflow bin above). The grid is fixed, so the chunks'
histograms add up in any order and a resumed run records the same counts bit for bit.

A quantile read from the histogram is the geometric middle of the bin holding numpy's
``method="inverted_cdf"`` quantile (the smallest norm with at least that share of tokens at or
below it), clipped to the exact maximum: its relative error is at most ``TOLERANCE``
(half a bin, 2**(1/128) - 1 ~ 0.54%) for norms inside the grid.

Position groups (``GROUPS``): counted tokens at position 0, at position 1, at positions 2 and
beyond, and positions that do not count (a BOS the tokenizer prepended, padding).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

LOG2_MIN = -16
LOG2_MAX = 24
BINS_PER_OCTAVE = 64
N_BINS = (LOG2_MAX - LOG2_MIN) * BINS_PER_OCTAVE + 2  # + underflow, overflow
TOLERANCE = 2 ** (1 / (2 * BINS_PER_OCTAVE)) - 1
GROUPS = ("pos0", "pos1", "pos2+", "not_counted")


def bin_of(norms: np.ndarray) -> np.ndarray:
    """Bin index of each norm: 0 underflow (incl. 0), 1..N_BINS-2 the grid, N_BINS-1 overflow."""
    norms = np.asarray(norms, dtype=np.float64)
    with np.errstate(divide="ignore"):
        pos = np.floor((np.log2(norms) - LOG2_MIN) * BINS_PER_OCTAVE)
    pos = np.where(norms > 0, pos, -1)
    return (np.clip(pos, -1, N_BINS - 2) + 1).astype(np.int64)


def chunk_histograms(
    norms: np.ndarray, mask: np.ndarray, ctx: int
) -> tuple[np.ndarray, np.ndarray]:
    """``[len(GROUPS), N_BINS]`` uint32 counts and ``[len(GROUPS)]`` float64 maxima (0 where
    empty) for one chunk: ``norms`` and ``mask`` are ``[rows]``, row ``r`` at position ``r % ctx``."""
    norms = np.asarray(norms, dtype=np.float64).reshape(-1)
    mask = np.asarray(mask, dtype=bool).reshape(-1)
    position = np.arange(len(norms)) % ctx
    group = np.where(~mask, 3, np.minimum(position, 2))
    bins = bin_of(norms)
    hist = np.zeros((len(GROUPS), N_BINS), dtype=np.uint32)
    np.add.at(hist, (group, bins), 1)
    top = np.zeros(len(GROUPS), dtype=np.float64)
    for g in range(len(GROUPS)):
        if (group == g).any():
            top[g] = norms[group == g].max()
    return hist, top


def quantile(counts: np.ndarray, q: float, top: float | None = None) -> float:
    """The ``q`` quantile (inverted CDF) of the norms counted in ``counts`` ``[N_BINS]``; nan if
    empty. ``top``: the exact maximum, which clips the answer (and is the answer for q = 1)."""
    counts = np.asarray(counts, dtype=np.int64)
    n = int(counts.sum())
    if n == 0:
        return math.nan
    k = max(1, math.ceil(q * n))
    if top is not None and k >= n:
        return float(top)
    b = int(np.searchsorted(np.cumsum(counts), k))
    if b == 0:
        value = 0.0
    elif b == N_BINS - 1:
        value = math.inf
    else:
        value = 2.0 ** (LOG2_MIN + (b - 0.5) / BINS_PER_OCTAVE)
    return float(min(value, top)) if top is not None else float(value)


def summary(hist: np.ndarray, top: np.ndarray) -> dict[str, Any]:
    """Provenance facts from a unit's summed ``[len(GROUPS), N_BINS]`` histogram and maxima:
    median, p99 and max of counted tokens' norms, and the median (and count) of each group."""
    counted = hist[:3].sum(axis=0)
    counted_top = float(top[:3].max())
    out: dict[str, Any] = {
        "n": int(counted.sum()),
        "median": quantile(counted, 0.5, counted_top),
        "p99": quantile(counted, 0.99, counted_top),
        "max": counted_top,
        "relative_tolerance": TOLERANCE,
        "by_position": {
            name: {
                "n": int(hist[g].sum()),
                "median": quantile(hist[g], 0.5, float(top[g])) if hist[g].sum() else None,
                "max": float(top[g]) if hist[g].sum() else None,
            }
            for g, name in enumerate(GROUPS)
        },
    }
    return out


def describe(norms: dict[str, Any]) -> str:
    """One line: ``median 12.3, p99 40.1, max 812 (pos 0: median 790 over 8 tokens)``."""
    text = f"median {norms['median']:.4g}, p99 {norms['p99']:.4g}, max {norms['max']:.4g}"
    by = norms.get("by_position") or {}
    parts = []
    for name, label in (
        ("pos0", "position 0"),
        ("pos1", "position 1"),
        ("not_counted", "not counted"),
    ):
        g = by.get(name) or {}
        if g.get("n"):
            parts.append(f"{label}: median {g['median']:.4g} over {g['n']:,}")
    return text + (f" ({'; '.join(parts)})" if parts else "")

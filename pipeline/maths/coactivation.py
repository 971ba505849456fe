"""Streaming Pearson correlation between two sparse feature sets, without a dense F_A x F_B matrix.

Over n counted tokens, feature i of A and feature j of B have

    corr_ij = (Σab − Σa Σb / n) / sqrt((Σa² − (Σa)²/n) (Σb² − (Σb)²/n))

The marginals (n, Σa, Σa², Σb, Σb²) are vectors. Σab is non-zero only for pairs that fire on a
common token, so only those *co-active* pairs are accumulated: per batch of tokens, the sparse
product Aᵀ B (``torch.sparse.mm``, cost ∝ Σ_t |A_t|·|B_t|) gives each co-active pair's Σab and
co-activation count, keyed ``i * n_b + j``.

For non-negative activations (ReLU, TopK, JumpReLU SAEs) a pair that never co-activates has
Σab = 0, so corr_ij = −Σa Σb / (n ...) ≤ 0: every positive correlation comes from a co-active
pair, and the top-k *positive* matches computed from co-active pairs alone are exact.

Two accumulators hold the pair sums, with the same arithmetic (a batch's value for a pair is added
to that pair's running sum, batches in order), so they give the same bits:
    DensePairs   a dense block of A rows [hi − lo, n_b]: 16 bytes per pair of the block
    SparsePairs  sorted runs of disjoint keys (a log-structured merge): 24 bytes per co-active pair
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from typing import Any

from pipeline.lazy import torch

PairBatch = "tuple[torch.Tensor, torch.Tensor, torch.Tensor]"
"""(keys int64 sorted unique, Σab float64, co-activation count int64) of co-active pairs."""


class Marginals:
    """Per-feature n, Σv, Σv² and active count of one side, over counted tokens (float64, CPU)."""

    def __init__(self, n_feat: int):
        self.sum = torch.zeros(n_feat, dtype=torch.float64)
        self.sum_sq = torch.zeros(n_feat, dtype=torch.float64)
        self.count = torch.zeros(n_feat, dtype=torch.int64)
        self.n_negative = 0

    def update(self, cols: torch.Tensor, vals: torch.Tensor) -> None:
        v = vals.to(torch.float64)
        self.sum.index_add_(0, cols, v)  # CPU index_add_ is sequential: deterministic
        self.sum_sq.index_add_(0, cols, v * v)
        self.count.index_add_(0, cols, torch.ones_like(cols))
        self.n_negative += int((vals < 0).sum())

    def variance_sum(self, n: int) -> torch.Tensor:
        """Σ(v − mean)² per feature: Σv² − (Σv)²/n, clamped at 0."""
        return (self.sum_sq - self.sum.square() / max(n, 1)).clamp_min(0)

    def state_dict(self) -> dict[str, Any]:
        return {"sum": self.sum, "sum_sq": self.sum_sq, "count": self.count, "neg": self.n_negative}

    @classmethod
    def from_state_dict(cls, state: dict[str, Any]) -> Marginals:
        out = cls(len(state["sum"]))
        out.sum, out.sum_sq, out.count = state["sum"], state["sum_sq"], state["count"]
        out.n_negative = int(state["neg"])
        return out


def batch_pair_sums(
    a: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    b: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    n_tok: int,
    a_range: tuple[int, int],
    n_b: int,
    device: torch.device,
) -> PairBatch:
    """Σ_t a_ti b_tj and the count of tokens where both fire, for the co-active pairs of one batch.

    ``a`` and ``b`` are COO ``(token, feature, value)`` over the same ``n_tok`` tokens; only A
    features in ``a_range = (lo, hi)`` are paired. Keys are ``i * n_b + j`` with i the global A id.
    """
    lo, hi = a_range
    a_tok, a_feat, a_val = a
    keep = (a_feat >= lo) & (a_feat < hi)
    a_tok, a_feat, a_val = a_tok[keep], a_feat[keep] - lo, a_val[keep]
    b_tok, b_feat, b_val = b
    if len(a_tok) == 0 or len(b_tok) == 0:
        empty = torch.zeros(0, dtype=torch.int64, device=device)
        return empty, empty.to(torch.float64), empty

    a_vals = torch.sparse_coo_tensor(
        torch.stack([a_feat, a_tok]).to(device),
        a_val.to(device, torch.float64),
        (hi - lo, n_tok),
        check_invariants=False,  # built from valid indices; checking costs a pass
    ).coalesce()
    b_vals = torch.sparse_coo_tensor(
        torch.stack([b_tok, b_feat]).to(device),
        b_val.to(device, torch.float64),
        (n_tok, n_b),
        check_invariants=False,
    ).coalesce()
    sums = _mm(a_vals, b_vals)
    counts = _mm(_ones_like(a_vals), _ones_like(b_vals))  # float64 counts: exact below 2^53
    keys = _keys(counts, lo, n_b)
    sum_values = sums.values()
    if not torch.equal(sums.indices(), counts.indices()):  # a Σab that cancelled to 0 was dropped
        sum_values = torch.zeros_like(counts.values())
        sum_values[torch.searchsorted(keys, _keys(sums, lo, n_b))] = sums.values()
    return keys, sum_values, counts.values().round().to(torch.int64)


def _mm(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    with warnings.catch_warnings():  # sparse.mm goes through CSR, which warns it is "beta"
        warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta")
        return torch.sparse.mm(left, right).coalesce()


def _ones_like(coo: torch.Tensor) -> torch.Tensor:
    """The same (coalesced) sparsity pattern with every value 1."""
    return torch.sparse_coo_tensor(
        coo.indices(),
        torch.ones_like(coo.values()),
        coo.shape,
        is_coalesced=True,
        check_invariants=False,
    )


def _keys(product: torch.Tensor, lo: int, n_b: int) -> torch.Tensor:
    rows, cols = product.indices()
    return (rows + lo) * n_b + cols


def _add_into(
    keys: torch.Tensor,
    sums: torch.Tensor,
    counts: torch.Tensor,
    run: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
) -> torch.Tensor:
    """Add the entries whose key is in ``run`` (sorted unique keys) into it; return the misses."""
    run_keys, run_sums, run_counts = run
    if len(run_keys) == 0:
        return torch.ones_like(keys, dtype=torch.bool)
    pos = torch.searchsorted(run_keys, keys).clamp_max(len(run_keys) - 1)
    hit = run_keys[pos] == keys
    where = pos[hit]  # unique: keys are unique
    run_sums[where] += sums[hit]
    run_counts[where] += counts[hit]
    return ~hit


class SparsePairs:
    """Co-active pair sums as sorted runs of disjoint keys, merged when a run outgrows half the one
    before it (amortised O(log) work per pair). Each key lives in exactly one run and merging only
    moves entries, so the sums do not depend on when runs merge."""

    BYTES_PER_PAIR = 24  # int64 key, float64 Σab, int64 count

    def __init__(self, device: torch.device):
        self.device = device
        self.runs: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []

    def add(self, keys: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor) -> None:
        for run in self.runs:
            if len(keys) == 0:
                break
            miss = _add_into(keys, sums, counts, run)
            keys, sums, counts = keys[miss], sums[miss], counts[miss]
        if len(keys):
            self.runs.append((keys.clone(), sums.clone(), counts.clone()))
        while len(self.runs) > 1 and 2 * len(self.runs[-1][0]) >= len(self.runs[-2][0]):
            last, before = self.runs.pop(), self.runs.pop()
            self.runs.append(_union(before, last))

    @property
    def nbytes(self) -> int:
        return self.BYTES_PER_PAIR * sum(len(r[0]) for r in self.runs)

    def merged(self) -> PairBatch:
        """All co-active pairs as one sorted run."""
        while len(self.runs) > 1:
            last, before = self.runs.pop(), self.runs.pop()
            self.runs.append(_union(before, last))
        if not self.runs:
            empty = torch.zeros(0, dtype=torch.int64, device=self.device)
            return empty, empty.to(torch.float64), empty
        return self.runs[0]

    def rows(self, n_b: int, lo: int, hi: int) -> PairBatch:
        """The co-active pairs of A rows lo..hi-1 (sorted by key)."""
        keys, sums, counts = self.merged()
        start, stop = torch.searchsorted(
            keys, torch.tensor([lo * n_b, hi * n_b], device=keys.device)
        )
        return keys[start:stop], sums[start:stop], counts[start:stop]

    def state_dict(self) -> dict[str, Any]:
        keys, sums, counts = self.merged()
        return {"keys": keys.cpu(), "sums": sums.cpu(), "counts": counts.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if len(state["keys"]):
            self.runs = [tuple(state[k].to(self.device) for k in ("keys", "sums", "counts"))]


def _union(
    a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    keys = torch.cat([a[0], b[0]])
    order = torch.argsort(keys, stable=True)
    return keys[order], torch.cat([a[1], b[1]])[order], torch.cat([a[2], b[2]])[order]


class DensePairs:
    """Pair sums for A rows lo..hi-1 against all n_b B features, as dense float64/int64 arrays."""

    def __init__(self, lo: int, hi: int, n_b: int, device: torch.device):
        self.lo, self.hi, self.n_b = lo, hi, n_b
        self.sums = torch.zeros((hi - lo) * n_b, dtype=torch.float64, device=device)
        self.counts = torch.zeros((hi - lo) * n_b, dtype=torch.int64, device=device)

    def add(self, keys: torch.Tensor, sums: torch.Tensor, counts: torch.Tensor) -> None:
        local = keys - self.lo * self.n_b  # unique: plain indexed add, deterministic
        self.sums[local] += sums
        self.counts[local] += counts

    @property
    def nbytes(self) -> int:
        return 16 * len(self.sums)

    def rows(self, n_b: int, lo: int, hi: int) -> PairBatch:
        a, b = (lo - self.lo) * n_b, (hi - self.lo) * n_b
        local = torch.nonzero(self.counts[a:b]).squeeze(1) + a
        return local + self.lo * n_b, self.sums[local], self.counts[local]

    def state_dict(self) -> dict[str, Any]:
        keys, sums, counts = self.rows(self.n_b, self.lo, self.hi)
        return {"keys": keys.cpu(), "sums": sums.cpu(), "counts": counts.cpu()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        device = self.sums.device
        self.add(*(state[k].to(device) for k in ("keys", "sums", "counts")))


def pair_correlations(
    keys: torch.Tensor,
    sums: torch.Tensor,
    n: int,
    a: Marginals,
    b: Marginals,
    n_b: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(i, j, corr) of co-active pairs; corr is NaN where either feature is constant."""
    device = keys.device
    i, j = keys // n_b, keys % n_b
    var_a, var_b = a.variance_sum(n).to(device), b.variance_sum(n).to(device)
    cov = sums - a.sum.to(device)[i] * b.sum.to(device)[j] / max(n, 1)
    denom = torch.sqrt(var_a[i] * var_b[j])
    corr = torch.where(denom > 0, cov / denom, torch.full_like(cov, float("nan")))
    return i, j, corr


def top_k_per_row(
    i: torch.Tensor,
    j: torch.Tensor,
    corr: torch.Tensor,
    counts: torch.Tensor,
    lo: int,
    hi: int,
    k: int,
) -> dict[str, torch.Tensor]:
    """Each A row's k highest positive correlations (ties: lower j first), from pairs sorted by
    (i, j). Returns ``idx`` [hi − lo, k] (-1: no match), ``corr``, ``count`` and ``n_positive``."""
    keep = corr > 0  # NaN compares False
    i, j, corr, counts = i[keep], j[keep], corr[keep], counts[keep]
    order = torch.argsort(-corr, stable=True)  # input order is (i, j): ties keep j ascending
    order = order[torch.argsort(i[order], stable=True)]
    i, j, corr, counts = i[order] - lo, j[order], corr[order], counts[order]
    per_row = torch.bincount(i, minlength=hi - lo)
    starts = torch.cumsum(per_row, 0) - per_row
    rank = torch.arange(len(i), device=i.device) - starts[i]
    top = rank < k
    out = {
        "idx": torch.full((hi - lo, k), -1, dtype=torch.int64, device=i.device),
        "corr": torch.zeros((hi - lo, k), dtype=torch.float64, device=i.device),
        "count": torch.zeros((hi - lo, k), dtype=torch.int64, device=i.device),
    }
    out["idx"][i[top], rank[top]] = j[top]
    out["corr"][i[top], rank[top]] = corr[top]
    out["count"][i[top], rank[top]] = counts[top]
    out["n_positive"] = per_row
    return out


def update_best_per_column(
    i: torch.Tensor,
    j: torch.Tensor,
    corr: torch.Tensor,
    best_idx: torch.Tensor,
    best_corr: torch.Tensor,
) -> None:
    """For each B feature keep its best positive A match (ties: lowest i). Rows must arrive in
    increasing i across calls, and pairs sorted by (i, j) within a call."""
    keep = corr > 0
    i, j, corr = i[keep], j[keep], corr[keep]
    order = torch.argsort(-corr, stable=True)
    order = order[torch.argsort(j[order], stable=True)]
    i, j, corr = i[order], j[order], corr[order]
    first = torch.ones_like(j, dtype=torch.bool)
    first[1:] = j[1:] != j[:-1]
    i, j, corr = i[first], j[first], corr[first]
    better = corr > best_corr[j]  # strict: an earlier (lower) i wins ties
    best_idx[j[better]] = i[better]
    best_corr[j[better]] = corr[better]


def row_slices(lo: int, hi: int, rows_per_slice: int) -> Iterator[tuple[int, int]]:
    for start in range(lo, hi, max(1, rows_per_slice)):
        yield start, min(hi, start + max(1, rows_per_slice))

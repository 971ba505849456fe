"""The report's statistics: the token baseline, top-activating tokens and the presence score.

Token baseline. For each feature f, predict its activation at token t by the mean of f over the
*training* tokens with the same token id, and score that on the held-out tokens (the fit's
split). Accumulated sparsely: per (token id, feature) sums over active entries only, plus per
token id counts, so memory is O(distinct active (token id, feature) pairs), never vocab × F.
With S[v, f] the sum of f over tokens with id v and c[v] their count, held-out

    SSE_f = Σ_h y² − 2 Σ_v S_h[v, f]·m[v, f] + Σ_v c_h[v]·m[v, f]²,   m[v, f] = S_t[v, f] / c_t[v]

(a token id never seen in training predicts the feature's global training mean) and
R²_f = 1 − SSE_f / SST_f, all from the accumulated sums.

Presence score of a feature in model B, from held-out R² of B's probe (best layer), of the
ceiling probe (A → A at the SAE's hook) and of the token baseline (floored at 0, the constant
predictor's score):

    presence = (R²_B − max(R²_token, 0)) / (R²_ceiling − max(R²_token, 0)), clipped to [0, 1]

defined only where the ceiling beats the token baseline by ``min_headroom``; elsewhere the score is
NaN and a status says why (see :data:`STATUS_ORDER`).
"""

from __future__ import annotations

import numpy as np

from pipeline.maths.lstsq import (
    STATUS_CONSTANT_HELD_OUT,
    STATUS_CONSTANT_TRAIN,
    STATUS_DEAD,
    STATUS_OK,
    STATUS_RARE,
)

SPLITS = ("train", "held_out")
_MERGE_AT = 1 << 22  # pending (key, sum) pairs before they are folded into the running sums

SCORED = "scored"
STATUS_ORDER = (SCORED, "dead", "too rare", "constant", "no ceiling", "no headroom")
"""Feature-level presence status, in the order the checks are made:
scored: a presence score exists; dead: never fires in training; too rare: fewer active training
tokens than the fit's ``min_active``; constant: no variance on train or held-out tokens (R²
undefined); no ceiling: the ceiling probe failed for another reason; no headroom: the ceiling's
R² does not exceed the token baseline's by ``min_headroom`` (A's residual stream explains the
feature no better than the current token does, so "beyond the token" has nothing to measure)."""
CLASSES = ("present", "partial", "absent", "unscored")


class TokenBaseline:
    """Sparse accumulator of per-(token id, feature) sums for train and held-out tokens."""

    def __init__(self, n_feat: int):
        self.n_feat = n_feat
        self.count = {s: np.zeros(0, np.int64) for s in SPLITS}  # [vocab seen] tokens per id
        self.keys = {s: np.zeros(0, np.int64) for s in SPLITS}  # sorted token_id * F + feature
        self.sums = {s: np.zeros(0, np.float64) for s in SPLITS}
        self.pending: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {s: [] for s in SPLITS}
        self.sum_y = {s: np.zeros(n_feat) for s in SPLITS}
        self.sum_yy = {s: np.zeros(n_feat) for s in SPLITS}
        self.n = dict.fromkeys(SPLITS, 0)

    def update(
        self,
        split: str,
        token_ids: np.ndarray,
        rows: np.ndarray,
        cols: np.ndarray,
        vals: np.ndarray,
    ) -> None:
        """Add counted tokens ``token_ids [n]`` and their features in COO form (``rows`` index
        into ``token_ids``; ``cols`` features; ``vals`` activations)."""
        token_ids = token_ids.astype(np.int64)
        counts = np.bincount(token_ids, minlength=len(self.count[split]))
        counts[: len(self.count[split])] += self.count[split]
        self.count[split] = counts
        self.n[split] += len(token_ids)
        vals = vals.astype(np.float64)
        self.sum_y[split] += np.bincount(cols, vals, self.n_feat)
        self.sum_yy[split] += np.bincount(cols, vals * vals, self.n_feat)
        keys = token_ids[rows] * self.n_feat + cols.astype(np.int64)
        self.pending[split].append(_reduce(keys, vals))
        if sum(len(k) for k, _ in self.pending[split]) > max(_MERGE_AT, len(self.keys[split])):
            self._merge(split)

    def _merge(self, split: str) -> None:
        parts = [(self.keys[split], self.sums[split]), *self.pending[split]]
        self.keys[split], self.sums[split] = _reduce(
            np.concatenate([k for k, _ in parts]), np.concatenate([s for _, s in parts])
        )
        self.pending[split] = []

    def r2_held_out(self) -> np.ndarray:
        """[F] float64: held-out R² of the per-token-id train mean; NaN where held-out y is
        constant (or no tokens are held out)."""
        for split in SPLITS:
            self._merge(split)
        n_feat = self.n_feat
        vocab = max(len(self.count["train"]), len(self.count["held_out"]))
        count_t = np.pad(self.count["train"], (0, vocab - len(self.count["train"])))
        count_h = np.pad(self.count["held_out"], (0, vocab - len(self.count["held_out"])))
        n_t, n_h = self.n["train"], self.n["held_out"]
        if n_h == 0 or n_t == 0:
            return np.full(n_feat, np.nan)
        global_mean = self.sum_y["train"] / n_t
        keys_t, sums_t = self.keys["train"], self.sums["train"]
        tok_t, feat_t = keys_t // n_feat, keys_t % n_feat
        mean_t = sums_t / count_t[tok_t]
        keys_h, sums_h = self.keys["held_out"], self.sums["held_out"]
        tok_h, feat_h = keys_h // n_feat, keys_h % n_feat
        pos = np.searchsorted(keys_t, keys_h)
        found = pos < len(keys_t)
        found[found] = keys_t[pos[found]] == keys_h[found]
        pred_h = np.zeros(len(keys_h))
        pred_h[found] = mean_t[pos[found]]
        unseen = count_t[tok_h] == 0  # this token id never occurs in training
        pred_h[unseen] = global_mean[feat_h[unseen]]
        cross = np.bincount(feat_h, sums_h * pred_h, n_feat)
        quad = np.bincount(feat_t, count_h[tok_t] * mean_t * mean_t, n_feat)
        quad += count_h[count_t == 0].sum() * global_mean * global_mean
        sse = self.sum_yy["held_out"] - 2 * cross + quad
        sst = self.sum_yy["held_out"] - self.sum_y["held_out"] ** 2 / n_h
        constant = sst <= 1e-12 * np.maximum(self.sum_yy["held_out"], 1e-300)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(constant, np.nan, 1 - sse / np.where(constant, 1, sst))


def _reduce(keys: np.ndarray, vals: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique keys and the sum of ``vals`` per key."""
    unique, inverse = np.unique(keys, return_inverse=True)
    return unique, np.bincount(inverse.reshape(-1), vals, len(unique))


class TopActivations:
    """Each feature's ``n_top`` largest activations and the global token index where they occur."""

    def __init__(self, n_feat: int, n_top: int):
        self.value = np.full((n_feat, n_top), -np.inf)
        self.token = np.full((n_feat, n_top), -1, np.int64)

    def update(self, token_index: np.ndarray, cols: np.ndarray, vals: np.ndarray) -> None:
        """Offer entries: ``token_index [nnz]`` global token index, ``cols`` feature, ``vals``."""
        n_top = self.value.shape[1]
        better = vals > self.value[cols, -1]  # beats the current n-th best of its feature
        if not better.any():
            return
        cols, vals, token_index = cols[better], vals[better].astype(np.float64), token_index[better]
        touched = np.unique(cols)
        old_v, old_t = self.value[touched].reshape(-1), self.token[touched].reshape(-1)
        all_c = np.concatenate([np.repeat(touched, n_top), cols])
        all_v = np.concatenate([old_v, vals])
        all_t = np.concatenate([old_t, token_index])
        order = np.lexsort((all_t, -all_v, all_c))  # by feature, value desc, then token
        all_c, all_v, all_t = all_c[order], all_v[order], all_t[order]
        start = np.searchsorted(all_c, all_c, side="left")
        rank = np.arange(len(all_c)) - start
        keep = rank < n_top
        self.value[all_c[keep], rank[keep]] = all_v[keep]
        self.token[all_c[keep], rank[keep]] = all_t[keep]


def feature_status(
    ceiling_status: np.ndarray,
    ceiling_r2: np.ndarray,
    token_r2: np.ndarray,
    min_headroom: float,
) -> np.ndarray:
    """[F] object: each feature's presence status (one of :data:`STATUS_ORDER`)."""
    status = np.full(len(ceiling_status), "no ceiling", dtype=object)
    status[ceiling_status == STATUS_DEAD] = "dead"
    status[ceiling_status == STATUS_RARE] = "too rare"
    constant = (ceiling_status == STATUS_CONSTANT_HELD_OUT) | (
        ceiling_status == STATUS_CONSTANT_TRAIN
    )
    status[constant] = "constant"
    ok = ceiling_status == STATUS_OK
    reference = np.maximum(np.nan_to_num(token_r2, nan=0.0), 0.0)
    headroom = ceiling_r2 - reference
    status[ok & ~(headroom >= min_headroom)] = "no headroom"
    status[ok & (headroom >= min_headroom)] = SCORED
    return status


def presence(
    r2: np.ndarray,
    fit_status: np.ndarray,
    ceiling_r2: np.ndarray,
    token_r2: np.ndarray,
    status: np.ndarray,
) -> tuple[np.ndarray, np.ndarray]:
    """(raw, clipped) presence scores [F]: NaN exactly where the feature is not scored (its
    ``status`` from :func:`feature_status` is not "scored", or this model's own fit failed)."""
    reference = np.maximum(np.nan_to_num(token_r2, nan=0.0), 0.0)
    scored = (status == SCORED) & (fit_status == STATUS_OK)
    raw = np.full(len(r2), np.nan)
    raw[scored] = (r2[scored] - reference[scored]) / (ceiling_r2[scored] - reference[scored])
    return raw, np.clip(raw, 0.0, 1.0)


def classify(score: np.ndarray, present_at: float, partial_at: float) -> np.ndarray:
    """[F] object: present (score ≥ present_at), partial (≥ partial_at), absent, or unscored (NaN)."""
    out = np.full(len(score), "unscored", dtype=object)
    finite = np.isfinite(score)
    out[finite & (score >= present_at)] = "present"
    out[finite & (score < present_at) & (score >= partial_at)] = "partial"
    out[finite & (score < partial_at)] = "absent"
    return out

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

import warnings

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
TOKEN_SHRINKAGE = (0.0, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0, 1000.0, 1e4, np.inf)
"""Grid of the token baseline's shrinkage k (in training tokens: an id seen c times keeps
c/(c + k) of its own mean), chosen per feature by GCV."""
NO_MARGIN = "no ceiling margin"
CLASSES = ("present", "partial", "absent", "undetermined", NO_MARGIN, "unscored")
"""A class is given only when the whole bootstrap interval of the presence score lies in its band;
an interval that straddles a threshold is "undetermined" (without replicates, the point decides).
"no ceiling margin": the ceiling does not beat the token baseline in more than (1 − confidence)/2
of the resamples, so presence has no interval to give (not "undetermined": the data say nothing
about B there, and more of B would not help; see :func:`presence_interval`)."""


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

    def predictor(self, shrink: bool = True) -> TokenPredictor:
        """The token-id predictor from the training sums (after all updates): per-id means shrunk
        toward the global mean (``shrink``), or raw (``shrink=False``).

        Shrinkage is ridge on a one-hot token code around the global mean, m_v = μ + a_v(ȳ_v − μ)
        with a_v = c_v/(c_v + k), its k chosen per feature like the probes' λ: by GCV on the
        training tokens over :data:`TOKEN_SHRINKAGE` (0 = raw means, ∞ = the global mean). For
        this smoother, RSS(k) = SSW + Σ_v c_v(1 − a_v)²(ȳ_v − μ)² and
        df(k) = Σ_v a_v + Σ_v c_v(1 − a_v)/n (the hat matrix's trace); both are sums over the
        pairs seen active plus per-count groups of ids, never vocab × F.
        """
        for split in SPLITS:
            self._merge(split)
        n_feat, n_t = self.n_feat, self.n["train"]
        keys, sums, count = self.keys["train"], self.sums["train"], self.count["train"]
        global_mean = self.sum_y["train"] / max(n_t, 1)
        k = np.zeros(n_feat)
        if shrink and n_t > 0:
            k = self._gcv_shrinkage(keys, sums, count, global_mean)
        return TokenPredictor(n_feat, keys, sums, count, global_mean, k)

    def _gcv_shrinkage(
        self, keys: np.ndarray, sums: np.ndarray, count: np.ndarray, mu: np.ndarray
    ) -> np.ndarray:
        """[F]: the k of :data:`TOKEN_SHRINKAGE` with the least GCV per feature (see predictor)."""
        n_feat, n = self.n_feat, self.n["train"]
        tok, feat = keys // n_feat, keys % n_feat
        c_pair = count[tok].astype(np.float64)
        mean_pair = sums / c_pair  # ȳ_v at the pairs seen active
        seen = count[count > 0].astype(np.float64)
        distinct, per_count = np.unique(seen, return_counts=True)  # ids grouped by count
        # SSW = Σ y² − Σ_v c_v ȳ_v²  (ids where f never fired have ȳ_v = 0)
        within = self.sum_yy["train"] - np.bincount(feat, c_pair * mean_pair**2, n_feat)
        best = np.full(n_feat, np.inf)
        choice = np.zeros(n_feat)
        for k in TOKEN_SHRINKAGE:
            rest_pair = (1 - TokenPredictor._weight(c_pair, k)) ** 2
            rest_ids = (1 - TokenPredictor._weight(distinct, k)) ** 2
            # Σ_v c_v(1−a_v)²(ȳ_v − μ)² = Σ_pairs c(1−a)²(ȳ² − 2μȳ) + μ² Σ_ids c(1−a)²
            pairs = np.bincount(
                feat, c_pair * rest_pair * (mean_pair**2 - 2 * mu[feat] * mean_pair), n_feat
            )
            rss = np.maximum(within, 0.0) + pairs + mu**2 * (per_count * distinct * rest_ids).sum()
            a_ids = TokenPredictor._weight(distinct, k)
            df = (per_count * a_ids).sum() + (per_count * distinct * (1 - a_ids)).sum() / n
            gcv = rss / n / (1 - df / n) ** 2 if df < n else np.full(n_feat, np.inf)
            better = gcv < best
            best[better], choice[better] = gcv[better], k
        return choice

    def r2_held_out(self, shrink: bool = True) -> np.ndarray:
        """[F] float64: held-out R² of :meth:`predictor`; NaN where held-out y is constant (or no
        tokens are held out)."""
        predictor = self.predictor(shrink)
        n_h = self.n["held_out"]
        if n_h == 0 or self.n["train"] == 0:
            return np.full(self.n_feat, np.nan)
        keys_h, sums_h = self.keys["held_out"], self.sums["held_out"]
        pred_h = predictor.lookup(keys_h // self.n_feat, keys_h % self.n_feat)
        cross = np.bincount(keys_h % self.n_feat, sums_h * pred_h, self.n_feat)
        quad = predictor.quad(self.count["held_out"].astype(np.float64)[:, None])[:, 0]
        sse = self.sum_yy["held_out"] - 2 * cross + quad
        sst = self.sum_yy["held_out"] - self.sum_y["held_out"] ** 2 / n_h
        constant = sst <= 1e-12 * np.maximum(self.sum_yy["held_out"], 1e-300)
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(constant, np.nan, 1 - sse / np.where(constant, 1, sst))


class TokenPredictor:
    """A feature's prediction from the current token id alone, from training sums: with c_v the
    training tokens of id v, S[v, f] the feature's sum over them (``sums`` at sorted
    ``keys = v·F + f``; absent pairs are 0), μ_f the global mean and ``k [F]`` the shrinkage,

        m[v, f] = μ_f + a·(S[v, f]/c_v − μ_f),    a = c_v / (c_v + k_f)

    (k = 0: the raw per-id mean; k = ∞: the global mean; an id never seen in training: μ_f).
    Equal to ridge on a one-hot token code with penalty k around μ (tested against sklearn)."""

    def __init__(
        self,
        n_feat: int,
        keys: np.ndarray,
        sums: np.ndarray,
        count: np.ndarray,
        global_mean: np.ndarray,
        k: np.ndarray,
    ):
        self.n_feat, self.keys, self.sums, self.count = n_feat, keys, sums, count
        self.global_mean, self.k = global_mean, k

    def _count_of(self, token_ids: np.ndarray) -> np.ndarray:
        seen = token_ids < len(self.count)
        out = np.zeros(len(token_ids))
        out[seen] = self.count[token_ids[seen]]
        return out

    @staticmethod
    def _weight(count: np.ndarray, k: np.ndarray) -> np.ndarray:
        """a = c/(c + k), 0 where c = 0 (broadcasting)."""
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(count > 0, count / (count + k), 0.0)

    def lookup(self, token_ids: np.ndarray, features: np.ndarray) -> np.ndarray:
        """[n] float64: m[v, f] for (token id, feature) pairs given as two [n] int arrays."""
        token_ids = token_ids.astype(np.int64)
        keys = token_ids * self.n_feat + features
        pos = np.searchsorted(self.keys, keys)
        found = pos < len(self.keys)
        found[found] = self.keys[pos[found]] == keys[found]
        sums = np.zeros(len(keys))
        sums[found] = self.sums[pos[found]]
        count = self._count_of(token_ids)
        mu = self.global_mean[features]
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = np.where(count > 0, sums / count, mu)
        return mu + self._weight(count, self.k[features]) * (mean - mu)

    def quad(self, weighted_count: np.ndarray) -> np.ndarray:
        """[F, R] = Σ_v C[v, r]·m[v, f]² for per-id token weights ``weighted_count [vocab, R]``.

        Split as Σ_v C[v]·(μ(1 − a_v))² (every id, grouped by its training count: at most
        √(2·n_train) distinct values, so O(F·√n) work, never vocab × F) plus, over the pairs seen
        active in training, C[v]·(m² − (μ(1 − a))²)."""
        vocab = max(len(weighted_count), len(self.count))
        weighted = np.pad(weighted_count, ((0, vocab - len(weighted_count)), (0, 0)))
        count = np.pad(self.count, (0, vocab - len(self.count))).astype(np.float64)
        distinct, group = np.unique(count, return_inverse=True)
        by_count = np.zeros((len(distinct), weighted.shape[1]))
        _scatter_add(by_count, group.reshape(-1), np.ascontiguousarray(weighted))
        out = np.empty((self.n_feat, weighted.shape[1]))
        step = max(1, (1 << 22) // max(len(distinct), 1))
        for start in range(0, self.n_feat, step):
            part = slice(start, start + step)
            rest = (1 - self._weight(distinct[None, :], self.k[part, None])) ** 2  # [Fb, U]
            out[part] = (rest @ by_count) * (self.global_mean[part] ** 2)[:, None]
        tok, feat = self.keys // self.n_feat, self.keys % self.n_feat
        m = self.lookup(tok, feat)
        base = self.global_mean[feat] * (1 - self._weight(count[tok], self.k[feat]))
        step = max(1, (1 << 22) // weighted.shape[1])
        for start in range(0, len(self.keys), step):
            part = slice(start, start + step)
            extra = weighted[tok[part]] * (m[part] ** 2 - base[part] ** 2)[:, None]
            _scatter_add(out, feat[part], extra)
        return out


class TokenBaselineReplicates:
    """Held-out R² of a :class:`TokenPredictor`, for the sample and for bootstrap replicates of
    held-out sequences (the fits' Poisson weights, pipeline/maths/evaluate.py), from one pass
    over the held-out tokens and their sparse features (no activations).

    Per replicate r (0: the sample, weight 1), with w the token's weight and m its prediction:
    ``SSE = Σ w·y² − 2 Σ w·y·m + Σ_v C[v, r]·Σ_f m[v, f]²`` (``C``: weighted count of token id v),
    so only active entries and per-id counts are touched: O(nnz·R) per chunk, memory
    O(F·R + vocab·R).
    """

    def __init__(self, predictor: TokenPredictor, n_boot: int):
        self.predictor, self.n_boot = predictor, n_boot
        shape = (predictor.n_feat, n_boot + 1)
        self.n_weighted = np.zeros(n_boot + 1)
        self.sum_y, self.sum_yy, self.cross = np.zeros(shape), np.zeros(shape), np.zeros(shape)
        self.count = np.zeros((0, n_boot + 1))  # [vocab seen, R+1] weighted tokens per id

    def update(
        self,
        token_ids: np.ndarray,
        rows: np.ndarray,
        cols: np.ndarray,
        vals: np.ndarray,
        weights: np.ndarray,
    ) -> None:
        """Held-out tokens ``token_ids [n]``, their features in COO form (``rows`` into
        token_ids) and their replicate weights ``weights [n, n_boot]``."""
        token_ids = token_ids.astype(np.int64)
        w = np.concatenate([np.ones((len(token_ids), 1)), weights.astype(np.float64)], axis=1)
        self.n_weighted += w.sum(0)
        vocab = max(len(self.count), int(token_ids.max(initial=-1)) + 1)
        if vocab > len(self.count):
            self.count = np.pad(self.count, ((0, vocab - len(self.count)), (0, 0)))
        _scatter_add(self.count, token_ids, w)
        vals = vals.astype(np.float64)
        m = self.predictor.lookup(token_ids[rows], cols)
        w_entry = w[rows]  # [nnz, R+1]
        for target, value in (
            (self.sum_y, vals),
            (self.sum_yy, vals * vals),
            (self.cross, vals * m),
        ):
            _scatter_add(target, cols, w_entry * value[:, None])

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        """(``r2 [F]``, ``r2_boot [F, n_boot]``), NaN where y is constant on the (resampled)
        held-out tokens."""
        quad = self.predictor.quad(self.count)
        sse = self.sum_yy - 2 * self.cross + quad
        sst = self.sum_yy - self.sum_y**2 / np.maximum(self.n_weighted, 1e-300)
        constant = sst <= 1e-12 * np.maximum(self.sum_yy, 1e-300)
        with np.errstate(divide="ignore", invalid="ignore"):
            r2 = np.where(constant, np.nan, 1 - sse / np.where(constant, 1, sst))
        return r2[:, 0], r2[:, 1:]


def _scatter_add(target: np.ndarray, index: np.ndarray, values: np.ndarray) -> None:
    """``target[index[i]] += values[i]`` with repeated indices summed, in place (``target`` a
    C-contiguous float64 [rows, R], ``values`` [n, R]): torch's index_add, far faster than
    ``np.add.at``."""
    import torch

    torch.from_numpy(target).index_add_(
        0, torch.from_numpy(np.ascontiguousarray(index, dtype=np.int64)), torch.from_numpy(values)
    )


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


def token_control(
    candidates: list[tuple[str, np.ndarray, np.ndarray | None]],
) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    """The token baseline from its candidates ``(source, r2 [F], replicates [F, R] or None)``:
    the per-id mean first, then each token-control fit (pipeline/controls.py). Returns
    ``(r2 [F], replicates [F, R] or None, source [F] object)``: per feature the largest
    held-out R² (NaN where none is defined), in each bootstrap replicate the largest of the
    candidates' replicates, and the candidate that gave the point value (the first on ties).

    A maximum over the scored tokens, not a choice made on training statistics: it can only
    raise the baseline, so presence can only be lower (the conservative side), and it needs no
    pass over the training tokens (which a segmented run no longer holds). With one candidate
    it is that candidate."""
    r2 = np.stack([np.asarray(c[1], np.float64) for c in candidates])  # [C, F]
    filled = np.where(np.isnan(r2), -np.inf, r2)
    best = np.argmax(filled, axis=0)
    point = np.take_along_axis(filled, best[None], 0)[0]
    point[~np.isfinite(point)] = np.nan
    source = np.asarray([c[0] for c in candidates], dtype=object)[best]
    source[np.isnan(point)] = ""
    replicates = None
    if all(c[2] is not None for c in candidates):
        boots = [np.asarray(c[2], np.float64) for c in candidates]
        with warnings.catch_warnings():  # a replicate undefined in every candidate stays NaN
            warnings.simplefilter("ignore", RuntimeWarning)
            replicates = np.fmax.reduce(np.stack(boots), axis=0)
    return point, replicates, source


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


def percentile_interval(replicates: np.ndarray, confidence: float) -> tuple[np.ndarray, np.ndarray]:
    """Percentile bootstrap interval ``(low [F], high [F])`` from ``replicates [F, R]``: NaN rows
    give NaN; a row with more than (1 − confidence)/2 of its replicates NaN (undefined in that
    resample) gives the uninformative (−inf, inf)."""
    tail = (1 - confidence) / 2
    out = np.full((2, len(replicates)), np.nan)
    if replicates.shape[1] == 0:
        return out[0], out[1]
    undefined = np.isnan(replicates).mean(1)
    some = undefined < 1
    with warnings.catch_warnings():  # all-NaN rows are masked out anyway
        warnings.simplefilter("ignore", RuntimeWarning)
        out[:, some] = np.nanpercentile(replicates[some], [100 * tail, 100 * (1 - tail)], axis=1)
    wide = some & (undefined > tail)
    out[0, wide], out[1, wide] = -np.inf, np.inf
    return out[0], out[1]


def presence_replicates(
    r2: np.ndarray, ceiling_r2: np.ndarray, token_r2: np.ndarray | None, scored: np.ndarray
) -> np.ndarray:
    """[F, R] clipped presence per bootstrap replicate, from replicate-aligned ``r2``,
    ``ceiling_r2`` and ``token_r2`` [F, R] (None: no token baseline); NaN where the feature is not
    ``scored`` [F] or where, in that resample, the ceiling does not beat the token (no headroom)."""
    reference = 0 * r2 if token_r2 is None else np.maximum(np.nan_to_num(token_r2, nan=0.0), 0.0)
    headroom = ceiling_r2 - reference
    with np.errstate(divide="ignore", invalid="ignore"):
        raw = (r2 - reference) / headroom
    raw = np.where((headroom > 0) & scored[:, None], raw, np.nan)
    return np.clip(raw, 0.0, 1.0)


def presence_interval(
    r2: np.ndarray,
    ceiling_r2: np.ndarray,
    token_r2: np.ndarray | None,
    scored: np.ndarray,
    confidence: float,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """``(low, high, informative, no_margin)`` [F] of the presence score from replicate-aligned
    ``r2``, ``ceiling_r2`` and ``token_r2`` [F, R] (see :func:`presence_replicates`).

    ``low``/``high``: the percentile interval, clipped to [0, 1]; NaN where it is not
    ``informative``: where more than (1 − confidence)/2 of the resamples leave presence undefined
    (the interval would be (−∞, ∞), stored before as [0, 1], which reads as "anything from absent
    to present"). ``no_margin``: the scored features for which that is because the ceiling fails
    to beat the token baseline in those resamples (class :data:`NO_MARGIN`); the rest of the
    uninformative ones are undefined for another reason (too few firing tokens in a resample) and
    stay "undetermined"."""
    tail = (1 - confidence) / 2
    replicates = presence_replicates(r2, ceiling_r2, token_r2, scored)
    low, high = percentile_interval(replicates, confidence)
    reference = 0 * r2 if token_r2 is None else np.maximum(np.nan_to_num(token_r2, nan=0.0), 0.0)
    with np.errstate(invalid="ignore"):
        short = ~(ceiling_r2 - reference > 0)  # the ceiling does not beat the token (or NaN)
    margin_fails = short.mean(1) > tail if r2.shape[1] else np.zeros(len(r2), bool)
    informative = np.isfinite(low) & np.isfinite(high)
    no_margin = scored & ~informative & margin_fails
    low = np.where(informative, np.clip(low, 0, 1), np.nan)
    high = np.where(informative, np.clip(high, 0, 1), np.nan)
    return low, high, informative, no_margin


def classify_interval(
    score: np.ndarray,
    low: np.ndarray,
    high: np.ndarray,
    present_at: float,
    partial_at: float,
    informative: np.ndarray | None = None,
    no_margin: np.ndarray | None = None,
) -> np.ndarray:
    """[F] object: the class of :func:`classify` where the interval [low, high] lies in one band,
    "undetermined" where it straddles a threshold; the point ``score`` alone where the interval is
    NaN (no replicates); "unscored" where the score is NaN. With ``informative`` and
    ``no_margin`` [F] (from :func:`presence_interval`): :data:`NO_MARGIN` where ``no_margin``,
    "undetermined" where the interval is not ``informative`` for another reason."""
    point = classify(score, present_at, partial_at)
    if informative is not None:
        lost = np.isfinite(score) & ~informative
        out = classify_interval(score, low, high, present_at, partial_at)
        out[lost] = "undetermined"
        out[lost & no_margin] = NO_MARGIN
        return out
    has_interval = np.isfinite(score) & ~np.isnan(low) & ~np.isnan(high)
    low_class = classify(np.where(has_interval, np.clip(low, 0, 1), np.nan), present_at, partial_at)
    high_class = classify(
        np.where(has_interval, np.clip(high, 0, 1), np.nan), present_at, partial_at
    )
    out = point.copy()
    out[has_interval] = np.where(
        low_class[has_interval] == high_class[has_interval],
        low_class[has_interval],
        "undetermined",
    )
    return out

"""Scores of solved probes on test tokens, streamed, with bootstrap replicates over test sequences.

The ridge solve (pipeline/maths/lstsq.py) scores a probe's raw linear prediction from statistics
alone. A feature is a ReLU output: ≥ 0 and mostly 0. Two of its scores need the predictions
themselves, so :class:`ProbeScores` takes one pass over the test tokens with the solved probes:

* **R² of the clipped prediction** ``max(x·w + b, 0)``: the probe read as the feature is;
* **firing AUROC**: P(prediction on a token where the feature fires > on one where it does not),
  ties counting ½, from per-feature histograms of the prediction (``n_bins`` bins of equal
  width on ``z/(1+|z|)``, z = (p − μ)/σ with μ, σ the feature's train mean and std: bins 0.016σ
  wide at the mean, 0.25σ at 3σ, 1.9σ at 10σ), so memory is O(F·n_bins), never O(F·n_tok).
  Binning counts pairs within a bin as ties (tested within 0.01 of exact AUROC);

and, to check the statistics, R² of the raw prediction and its Pearson r.
:class:`PredictionScores` gives the same scores to any predictor of all F features at once (the
affine-map baseline: A's SAE read on B's mapped activations, pipeline/maths/stitch.py).

Per row block and feature block, predictions ``P = x·Wᵀ + b [rows, F_block]`` are one GEMM in
``compute_dtype``; Y is scattered dense for that block only; every sum is float64, shifted by
the feature's train mean (so SST = Σ(y−c)² − (Σ(y−c))²/n has no catastrophic cancellation).
Extra device memory is O(``_BLOCK_ELEMS``) besides the probes and the accumulators.

Bootstrap (``n_boot`` = R > 0). Each test *sequence* gets R Poisson(1) weights (the same for
every fit and for the token baseline: :func:`bootstrap_weights` depends only on the seed, the
chunk and its sequences), so replicate r of every fit is the same resample of sequences and
scores can be combined per replicate (presence). Split by document, the weights are per
*document* (every sequence of a document shares its draw, keyed by the document id): replicates
resample documents, the units that are independent. The weighted sums ``Σ w·(y−c)``, ``Σ w·(y−c)²``,
``Σ w·(y−p)²``, ``Σ w·(y−p⁺)²`` are summed per sequence first, then one
[R, n_seq] × [n_seq, F_block] float64 GEMM each (O(n_seq·F·R) per chunk, not O(n_tok·F·R)):
memory 32·F·R bytes (0.64 GB at F = 10⁵, R = 200), besides the AUROC histograms' 16·n_bins
bytes per feature (2 GB at F = 10⁶, n_bins = 128).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from pipeline.errors import XprobeError
from pipeline.lazy import torch
from pipeline.maths.split import document_uniform

_BLOCK_ELEMS = 1 << 22  # elements of one [rows, F_block] float64 scratch block (32 MiB)
_POISSON_CDF = np.cumsum(np.exp(-1.0) / np.cumprod(np.r_[1.0, np.arange(1.0, 30.0)]))
"""P(X <= k), k = 0..29, of X ~ Poisson(1) (P(X > 29) < 1e-31)."""


def bootstrap_weights(
    seed: int, chunk: int, n_seq: int, n_boot: int, doc_ids: np.ndarray | None = None
) -> np.ndarray:
    """[n_seq, n_boot] uint8 Poisson(1) weights of the sequences of one chunk, replicate-aligned:
    the same arguments always give the same weights.

    ``doc_ids`` None: one weight per sequence, drawn per (seed, chunk). ``doc_ids [n_seq]`` (the
    chunk's sequences' documents, pipeline/maths/split.py): one weight per *document*, keyed by
    (seed, document id, replicate) alone, so every sequence of a document gets the same weight in
    every chunk and every fit (``chunk`` is then unused): replicates resample whole documents."""
    if doc_ids is None:
        rng = np.random.default_rng([seed, chunk])
        return np.minimum(rng.poisson(1.0, size=(n_seq, n_boot)), 255).astype(np.uint8)
    doc_ids = np.asarray(doc_ids)
    if doc_ids.shape != (n_seq,):
        raise XprobeError(f"doc_ids has shape {doc_ids.shape}; expected one per sequence ({n_seq})")
    docs, inverse = np.unique(doc_ids, return_inverse=True)
    u = document_uniform(seed, docs, 1 + np.arange(n_boot))  # [n_docs, n_boot]
    weights = np.searchsorted(_POISSON_CDF, u, side="right")  # inverse CDF of Poisson(1)
    return np.minimum(weights, 255).astype(np.uint8)[inverse.reshape(-1)]


class ProbeScores:
    """Test-token accumulators of F solved probes (one hook of one fit), on ``device``.

    ``direction [F, d]``, ``intercept [F]``: the probes; ``center [F]``, ``scale [F]``: the
    features' train mean and standard deviation (the sums' shift and the AUROC histogram's
    unit; ``scale`` 0 is treated as 1).
    """

    def __init__(
        self,
        direction: torch.Tensor,
        intercept: torch.Tensor,
        center: torch.Tensor,
        scale: torch.Tensor,
        device: torch.device,
        compute_dtype: torch.dtype | None = None,
        n_boot: int = 0,
        n_bins: int = 128,
        feature_block: int = 16384,
    ) -> None:
        compute_dtype = torch.float32 if compute_dtype is None else compute_dtype
        n_feat, d = direction.shape
        if intercept.shape != (n_feat,):
            raise XprobeError("intercept, center and scale must be [F] like direction's rows")
        self._setup(n_feat, d, center, scale, device, compute_dtype, n_boot, n_bins, feature_block)
        self.weight = direction.to(self.device, compute_dtype)  # [F, d]
        self.bias = intercept.to(self.device, torch.float64)

    def _predict(self, x: torch.Tensor, block: slice) -> torch.Tensor:
        """Predictions ``[rows, F_block]`` float64 of the features in ``block`` for ``x``."""
        return (x @ self.weight[block].T).to(torch.float64) + self.bias[block]

    def _setup(
        self,
        n_feat: int,
        d: int,
        center: torch.Tensor,
        scale: torch.Tensor,
        device: torch.device,
        compute_dtype: torch.dtype,
        n_boot: int,
        n_bins: int,
        feature_block: int,
    ) -> None:
        if not center.shape == scale.shape == (n_feat,):
            raise XprobeError("intercept, center and scale must be [F] like direction's rows")
        if n_boot < 0 or n_bins < 2 or feature_block < 1:
            raise XprobeError(
                f"need n_boot >= 0, n_bins >= 2, feature_block >= 1; got {n_boot}, {n_bins}, "
                f"{feature_block}"
            )
        self.n_feat, self.d, self.n_boot, self.n_bins = n_feat, d, n_boot, n_bins
        self.device, self.compute_dtype = torch.device(device), compute_dtype
        self.feature_block = feature_block
        self.block_elems = _BLOCK_ELEMS
        f64 = {"dtype": torch.float64, "device": self.device}
        self.center = center.to(**f64)
        self.scale = torch.where(scale > 0, scale, torch.ones_like(scale)).to(**f64)
        self.n = 0
        # replicate 0 is the sample itself (weight 1); 1..R are the bootstrap replicates
        self.n_weighted = torch.zeros(n_boot + 1, **f64)  # [R+1] Σ w
        self.sum_y = torch.zeros(n_boot + 1, n_feat, **f64)  # Σ w(y−c)
        self.sum_yy = torch.zeros(n_boot + 1, n_feat, **f64)  # Σ w(y−c)²
        self.sse = torch.zeros(n_boot + 1, n_feat, **f64)  # Σ w(y−p)²
        self.sse_clipped = torch.zeros(n_boot + 1, n_feat, **f64)  # Σ w(y−max(p,0))²
        self.sum_p = torch.zeros(n_feat, **f64)  # Σ (p−c)
        self.sum_pp = torch.zeros(n_feat, **f64)  # Σ (p−c)²
        self.sum_py = torch.zeros(n_feat, **f64)  # Σ (p−c)(y−c)
        self.hist_all = torch.zeros(n_feat * n_bins, dtype=torch.int64, device=self.device)
        self.hist_firing = torch.zeros(n_feat * n_bins, dtype=torch.int64, device=self.device)

    def update(
        self,
        x: torch.Tensor,
        rows: torch.Tensor,
        cols: torch.Tensor,
        vals: torch.Tensor,
        weights: torch.Tensor | None = None,
        groups: torch.Tensor | None = None,
    ) -> None:
        """Add test tokens ``x [n, d]`` with targets in COO form (``rows`` into x, ``cols``
        feature, ``vals``; each (row, col) at most once) and, with ``n_boot`` > 0, the replicate
        weights of their sequences: ``weights [n_groups, n_boot]`` and ``groups [n]`` (int64, the
        row of ``weights`` of each token; None: one row per token). Per-token sums are first
        summed per sequence, so the replicate GEMMs cost O(n_groups·F·R), not O(n·F·R)."""
        if x.ndim != 2 or x.shape[1] != self.d:
            raise XprobeError(f"x has shape {tuple(x.shape)}; expected [n_tok, {self.d}]")
        n = x.shape[0]
        if groups is None:
            groups = torch.arange(n)
        if self.n_boot and (
            weights is None
            or weights.ndim != 2
            or weights.shape[1] != self.n_boot
            or groups.shape != (n,)
            or (n and int(groups.max()) >= len(weights))
        ):
            raise XprobeError(
                f"weights must be [n_groups, {self.n_boot}] with groups [n_tok] indexing its rows"
            )
        if n == 0:
            return
        x = x.to(self.device)
        rows, cols = rows.to(self.device, torch.int64), cols.to(self.device, torch.int64)
        vals = vals.to(self.device, torch.float64)
        groups = groups.to(self.device, torch.int64)
        n_groups = int(groups.max()) + 1
        replicate = torch.ones(n_groups, self.n_boot + 1, dtype=torch.float64, device=self.device)
        if self.n_boot:
            replicate[:, 1:] = weights[:n_groups].to(self.device, torch.float64)
        self.n += n
        self.n_weighted += replicate.T @ torch.bincount(groups, minlength=n_groups).double()
        step_f = min(self.feature_block, self.n_feat)
        step_r = max(1, self.block_elems // step_f)
        for start in range(0, n, step_r):
            stop = min(start + step_r, n)
            keep = (rows >= start) & (rows < stop)
            r, c, v = rows[keep] - start, cols[keep], vals[keep]
            xb = x[start:stop].to(self.compute_dtype)
            g = groups[start:stop]
            low, high = int(g.min()), int(g.max()) + 1  # the sequences of this row block
            for first in range(0, self.n_feat, step_f):
                last = min(first + step_f, self.n_feat)
                inside = (c >= first) & (c < last)
                y = torch.zeros(stop - start, last - first, dtype=torch.float64, device=self.device)
                y[r[inside], c[inside] - first] = v[inside]
                self._add_block(xb, y, g - low, replicate[low:high], first, last)

    def _add_block(
        self,
        x: torch.Tensor,
        y: torch.Tensor,
        groups: torch.Tensor,
        replicate: torch.Tensor,
        first: int,
        last: int,
    ) -> None:
        """Sums of one [rows, F_block] block: ``x [rows, d]``, dense ``y``, each row's group
        ``groups [rows]`` and the groups' weights ``replicate [n_groups, R+1]``."""
        block = slice(first, last)
        pred = self._predict(x, block)
        firing = y != 0
        yc, pc = y - self.center[block], pred - self.center[block]
        w = replicate.T  # [R+1, n_groups]
        for total, per_token in (
            (self.sum_y, yc),
            (self.sum_yy, yc * yc),
            (self.sse, (y - pred).square()),
            (self.sse_clipped, (y - pred.clamp(min=0)).square()),
        ):
            per_group = torch.zeros(
                len(replicate), last - first, dtype=torch.float64, device=y.device
            )
            total[:, block] += w @ per_group.index_add_(0, groups, per_token)
        self.sum_p[block] += pc.sum(0)
        self.sum_pp[block] += (pc * pc).sum(0)
        self.sum_py[block] += (pc * yc).sum(0)
        z = (pc / self.scale[block]).float()
        squashed = z / (1 + z.abs())  # in (-1, 1), monotone: ranks, hence AUROC, unchanged
        bins = ((squashed + 1) * (self.n_bins / 2)).floor().clamp(0, self.n_bins - 1).long()
        flat = bins + torch.arange(first, last, device=self.device)[None, :] * self.n_bins
        size = (last - first) * self.n_bins
        offset = first * self.n_bins
        flat = flat - offset
        self.hist_all[offset : offset + size] += torch.bincount(flat.reshape(-1), minlength=size)
        self.hist_firing[offset : offset + size] += torch.bincount(flat[firing], minlength=size)

    def result(self) -> dict[str, np.ndarray]:
        """Per-feature scores, float64 numpy: ``r2``, ``r2_clipped``, ``pearson``, ``auroc`` [F];
        ``n_firing`` [F] int64; with ``n_boot`` > 0 also ``r2_boot``, ``r2_clipped_boot``
        [F, n_boot]. NaN where undefined: R² and r when y is constant on the (resampled) test
        tokens, r when the prediction is constant, AUROC when the feature never or always fires."""
        n = self.n_weighted[:, None]
        safe_n = torch.where(n > 0, n, torch.ones_like(n))
        sst = self.sum_yy - self.sum_y.square() / safe_n  # [R+1, F]
        constant = sst <= 1e-12 * self.sum_yy.clamp(min=1e-300)
        nan = torch.full_like(sst, torch.nan)
        safe_sst = torch.where(constant, torch.ones_like(sst), sst)
        r2 = torch.where(constant, nan, 1 - self.sse / safe_sst)
        r2_clipped = torch.where(constant, nan, 1 - self.sse_clipped / safe_sst)
        n0 = max(self.n, 1)
        cov = self.sum_py - self.sum_p * self.sum_y[0] / n0
        var_p = self.sum_pp - self.sum_p.square() / n0
        spread = torch.sqrt(var_p.clamp(min=0) * sst[0].clamp(min=0))
        pearson = torch.where(spread > 0, cov / torch.where(spread > 0, spread, 1.0), torch.nan)
        hist_all = self.hist_all.view(self.n_feat, self.n_bins).to(torch.float64)
        hist_fire = self.hist_firing.view(self.n_feat, self.n_bins).to(torch.float64)
        hist_rest = hist_all - hist_fire
        below = torch.cumsum(hist_rest, 1) - hist_rest  # non-firing tokens in lower bins
        pairs = hist_fire.sum(1) * hist_rest.sum(1)
        wins = (hist_fire * (below + 0.5 * hist_rest)).sum(1)
        auroc = torch.where(pairs > 0, wins / torch.where(pairs > 0, pairs, 1.0), torch.nan)
        out = {
            "r2": r2[0],
            "r2_clipped": r2_clipped[0],
            "pearson": pearson,
            "auroc": auroc,
        }
        out = {k: v.cpu().numpy() for k, v in out.items()}
        out["n_firing"] = hist_fire.sum(1).to(torch.int64).cpu().numpy()
        if self.n_boot:
            out["r2_boot"] = r2[1:].T.cpu().numpy()
            out["r2_clipped_boot"] = r2_clipped[1:].T.cpu().numpy()
        return out


class PredictionScores(ProbeScores):
    """:class:`ProbeScores` of any predictor ``predict(x [rows, d]) -> [rows, F]`` (e.g. A's SAE
    encoder applied to B's activations mapped into A's residual stream): the same scores, the
    same bootstrap. ``predict`` is called once per row block, with all F features at once:
    ``block_rows`` rows (default: 2²²/F, at least 1), so the scratch is O(block_rows·F) elements;
    a wide SAE on a GPU wants more rows per call than 2²²/F (each call reads all of W_enc).
    ``x`` is given in ``compute_dtype``."""

    def __init__(
        self,
        predict: Callable[[torch.Tensor], torch.Tensor],
        n_feat: int,
        d: int,
        center: torch.Tensor,
        scale: torch.Tensor,
        device: torch.device,
        compute_dtype: torch.dtype | None = None,
        n_boot: int = 0,
        n_bins: int = 128,
        block_rows: int | None = None,
    ) -> None:
        compute_dtype = torch.float32 if compute_dtype is None else compute_dtype
        self._setup(n_feat, d, center, scale, device, compute_dtype, n_boot, n_bins, n_feat)
        if block_rows is not None:
            if block_rows < 1:
                raise XprobeError(f"block_rows must be >= 1, got {block_rows}")
            self.block_elems = block_rows * n_feat
        self.predict = predict

    def _predict(self, x: torch.Tensor, block: slice) -> torch.Tensor:
        pred = self.predict(x)
        if pred.shape != (x.shape[0], self.n_feat):
            raise XprobeError(
                f"predict returned shape {tuple(pred.shape)}; expected [{x.shape[0]}, {self.n_feat}]"
            )
        return pred[:, block].to(self.device, torch.float64)

"""Streaming ridge / least-squares probes for many sparse targets at once, from sufficient statistics.

For one (layer, split), :class:`SufficientStats` accumulates, chunk by chunk, the centred sums

    n, mean_x [d], mean_y [n_feat], cxx [d, d], cyx [n_feat, d], syy [n_feat], n_active [n_feat]

of activations x [n_tok, d] and targets y [n_tok, n_feat] given sparsely in COO form.
:func:`solve_ridge` fits ``y ≈ x·w + b`` for every feature and every λ of a grid from these
statistics alone, picks λ per feature by generalized cross-validation on the *training*
statistics (so the held-out tokens that score a probe never choose it), scores the chosen probe
on held-out statistics (no second pass over the data) and returns directions, intercepts and
scores. Memory is independent of n_tok; nothing of size [n_tok, n_feat] is ever built.

GCV (Golub, Heath & Wahba 1979). With s_i the eigenvalues of the centred train XᵀX, the ridge
fit with an unpenalised intercept has hat-matrix trace ``df(λ) = 1 + Σ_i s_i / (s_i + λ)`` (the
same for every feature) and

    GCV_f(λ) = RSS_f(λ) / n / (1 − df(λ)/n)²,     r2_gcv_f = 1 − n·GCV_f(λ) / SST_f

where RSS_f(λ) is the training residual sum of squares, itself a function of the statistics.
GCV is leave-one-out cross-validation with every token's leverage replaced by the mean
leverage df/n (which needs no per-token pass); ``r2_gcv`` estimates out-of-sample R² from
training tokens alone, so it also picks the best hook. Tokens of one sequence are correlated,
so GCV, like token-level leave-one-out, is optimistic when df/n is not small; with millions of
training tokens and d in the thousands df/n is below 10⁻², and the held-out R² is the score.

Precision. All running statistics are float64. Per chunk, the mean of x is summed in float64
and x is centred in float64, one row block at a time; only the d×d product ``xcᵀ xc`` runs in
``compute_dtype`` (float32 by default: tensor cores are not used, and TF32 must stay off, which
is torch's default; pass float64 for reference-exact statistics), its blocks summed in float64.
The cross term is a float64 sparse × dense product (``torch.sparse.mm``) costing O(nnz·d), and
the y sums are O(nnz) scatters. Chunks and accumulators are merged with Chan's parallel formula
in float64, so ``XᵀX − n·μμᵀ`` is never formed. On CUDA, scatters use atomics: results are
reproducible to float64 round-off, not bit for bit.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.errors import XprobeError
from pipeline.lazy import torch

STATUS_OK = 0
STATUS_DEAD = 1  # never active in train
STATUS_RARE = 2  # active in train on fewer than min_active tokens
STATUS_CONSTANT_HELD_OUT = 3  # zero variance on held-out tokens: held-out R² undefined
STATUS_CONSTANT_TRAIN = 4  # active but zero variance on train tokens: train R² undefined
STATUS_NAMES = {
    STATUS_OK: "ok",
    STATUS_DEAD: "dead",
    STATUS_RARE: "too rare",
    STATUS_CONSTANT_HELD_OUT: "constant in held-out",
    STATUS_CONSTANT_TRAIN: "constant in train",
}

_BLOCK_ELEMS = 1 << 24  # elements of one float64 scratch block (128 MiB)
_FIELDS = ("mean_x", "mean_y", "cxx", "cyx", "syy", "n_active")


class SufficientStats:
    """Centred first and second moments of (x, y) for one (layer, split), in float64 on ``device``.

    Attributes: ``n`` (tokens seen), ``mean_x [d]``, ``mean_y [n_feat]``,
    ``cxx [d, d] = Σ (x-μx)(x-μx)ᵀ``, ``cyx [n_feat, d] = Σ (y-μy)(x-μx)ᵀ``,
    ``syy [n_feat] = Σ (y-μy)²`` and ``n_active [n_feat]`` (int64: tokens where y != 0).
    """

    def __init__(
        self,
        d: int,
        n_feat: int,
        device: torch.device,
        compute_dtype: torch.dtype | None = None,
    ) -> None:
        compute_dtype = torch.float32 if compute_dtype is None else compute_dtype
        if compute_dtype not in (torch.float32, torch.float64):
            raise XprobeError(
                f"compute_dtype {compute_dtype} is not supported for the x·xᵀ product: "
                "use torch.float32 or torch.float64"
            )
        self.d, self.n_feat = d, n_feat
        self.device, self.compute_dtype = torch.device(device), compute_dtype
        f64 = {"dtype": torch.float64, "device": self.device}
        self.n = 0
        self.mean_x = torch.zeros(d, **f64)
        self.mean_y = torch.zeros(n_feat, **f64)
        self.cxx = torch.zeros(d, d, **f64)
        self.cyx = torch.zeros(n_feat, d, **f64)  # row f: feature f's cross term
        self.syy = torch.zeros(n_feat, **f64)
        self.n_active = torch.zeros(n_feat, dtype=torch.int64, device=self.device)

    def update(
        self, x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor
    ) -> None:
        """Add one chunk: ``x [n, d]`` (any float dtype) and its targets Y [n, n_feat] in COO form.

        ``rows [nnz]`` (int64, index into x), ``cols [nnz]`` (int64, feature) and ``vals [nnz]``
        list the stored entries of Y; absent entries are 0. Each (row, col) pair appears at most
        once. Explicit zeros are allowed and do not count as active. Cost: O(n·d²) for the x
        product, O(nnz·d) for the cross term, plus one in-place rank-1 update of ``cyx``
        (O(d·n_feat), memory-bound) for the merge.
        """
        if x.ndim != 2 or x.shape[1] != self.d:
            raise XprobeError(f"x has shape {tuple(x.shape)}; expected [n_tok, {self.d}]")
        if not rows.shape == cols.shape == vals.shape or rows.ndim != 1:
            raise XprobeError("rows, cols and vals must be 1-D tensors of the same length")
        n_b = x.shape[0]
        if n_b == 0:
            return
        x = x.to(self.device)
        rows, cols = rows.to(self.device, torch.int64), cols.to(self.device, torch.int64)
        vals = vals.to(self.device, torch.float64)

        mean_x = self._chunk_mean_x(x)
        cxx = self._chunk_products(x, mean_x, rows, cols, vals)

        mean_y = torch.zeros_like(self.mean_y).index_add_(0, cols, vals) / n_b
        stored = torch.bincount(cols, minlength=self.n_feat)
        deviation = vals - mean_y[cols]
        syy = torch.zeros_like(self.syy).index_add_(0, cols, deviation * deviation)
        syy += (n_b - stored) * mean_y * mean_y  # the absent entries, each (0 - m_y)²
        n_active = torch.bincount(cols[vals != 0], minlength=self.n_feat)
        self._absorb(n_b, mean_x, mean_y, cxx, None, syy, n_active)

    def update_dense(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """Add one chunk with dense targets: ``x [n, d]`` and ``y [n, n_feat]`` (e.g. another
        model's residual stream, for an affine map between two models). Both are centred on the
        chunk's means in float64; ``xcᵀxc`` and ``ycᵀxc`` run in compute_dtype per row block,
        summed in float64, like :meth:`update`'s x product. Cost O(n·d·(d + n_feat))."""
        if x.ndim != 2 or x.shape[1] != self.d:
            raise XprobeError(f"x has shape {tuple(x.shape)}; expected [n_tok, {self.d}]")
        if y.shape != (x.shape[0], self.n_feat):
            raise XprobeError(
                f"y has shape {tuple(y.shape)}; expected [{x.shape[0]}, {self.n_feat}]"
            )
        n_b = x.shape[0]
        if n_b == 0:
            return
        x, y = x.to(self.device), y.to(self.device)
        mean_x = self._chunk_mean_x(x)
        mean_y = y.sum(0, dtype=torch.float64) / n_b
        f64 = {"dtype": torch.float64, "device": self.device}
        cxx = torch.zeros(self.d, self.d, **f64)
        cyx = torch.zeros(self.n_feat, self.d, **f64)
        syy = torch.zeros(self.n_feat, **f64)
        step = max(1, _BLOCK_ELEMS // max(self.d, self.n_feat))
        for start in range(0, n_b, step):
            low_x = self._centred(x[start : start + step], mean_x)
            low_y = self._centred(y[start : start + step], mean_y)
            cxx += (low_x.T @ low_x).to(torch.float64)
            cyx += (low_y.T @ low_x).to(torch.float64)
            syy += (low_y * low_y).sum(0).to(torch.float64)  # per block, like the GEMMs
        n_active = (y != 0).sum(0).to(torch.int64)
        self._absorb(n_b, mean_x, mean_y, cxx, cyx, syy, n_active)

    def merge(self, other: SufficientStats) -> None:
        """Add another accumulator's statistics into this one (Chan's formula, float64)."""
        if (other.d, other.n_feat) != (self.d, self.n_feat):
            raise XprobeError(
                f"cannot merge statistics of shape (d={other.d}, n_feat={other.n_feat}) into "
                f"(d={self.d}, n_feat={self.n_feat})"
            )
        if other.n == 0:
            return
        dev = self.device
        self._absorb(
            other.n,
            other.mean_x.to(dev),
            other.mean_y.to(dev),
            other.cxx.to(dev),
            other.cyx.to(dev),
            other.syy.to(dev),
            other.n_active.to(dev),
        )

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Independent CPU copies of all statistics (``n`` as a 0-d int64 tensor)."""
        state = {"n": torch.tensor(self.n, dtype=torch.int64)}
        for name in _FIELDS:
            state[name] = getattr(self, name).to("cpu", copy=True)
        return state

    @classmethod
    def from_state_dict(
        cls,
        state: Mapping[str, torch.Tensor | np.ndarray],
        device: torch.device,
        compute_dtype: torch.dtype | None = None,
    ) -> SufficientStats:
        """Rebuild an accumulator from :meth:`state_dict` output (torch or numpy values), exactly."""
        n_feat, d = torch.as_tensor(state["cyx"]).shape
        stats = cls(d, n_feat, device, compute_dtype)
        stats.n = int(state["n"])
        for name in _FIELDS:
            value = torch.as_tensor(state[name]).to(stats.device, copy=True)
            expected = getattr(stats, name)
            if value.shape != expected.shape or value.dtype != expected.dtype:
                raise XprobeError(
                    f"state '{name}' has shape {tuple(value.shape)} and dtype {value.dtype}; "
                    f"expected {tuple(expected.shape)} and {expected.dtype}"
                )
            setattr(stats, name, value)
        return stats

    def _add_cross(
        self,
        xc: torch.Tensor,
        rows: torch.Tensor,
        cols: torch.Tensor,
        vals: torch.Tensor,
    ) -> None:
        """``cyx += Yᵀ xc`` for one row block ``xc [n, d]`` (float64, centred on the chunk mean).

        Σ_t (y_t - m_y)(x_t - m_x)ᵀ = Σ_t y_t (x_t - m_x)ᵀ since the centred x sums to zero, so
        only stored entries of Y contribute. The block's active features are renumbered
        0..n_active-1 and taken in groups whose [group, d] float64 product fits one scratch
        block; each group is one sparse × dense product (MKL / cuSPARSE) added to its rows of
        ``cyx`` by a row-wise ``index_add_``. Cost O(nnz·d + n_active·d): in proportion to the
        active features, never to n_feat.
        """
        if cols.numel() == 0:
            return
        n_rows, d = xc.shape
        features, local = torch.unique(cols, return_inverse=True)
        width = max(1, _BLOCK_ELEMS // d)
        for first in range(0, features.numel(), width):
            last = min(first + width, features.numel())
            if first == 0 and last == features.numel():
                r, c, v = rows, local, vals
            else:
                keep = (local >= first) & (local < last)
                r, c, v = rows[keep], local[keep] - first, vals[keep]
            with warnings.catch_warnings():  # "sparse invariant checks are disabled"
                warnings.simplefilter("ignore", UserWarning)
                y_t = torch.sparse_coo_tensor(torch.stack([c, r]), v, (last - first, n_rows))
            self.cyx.index_add_(0, features[first:last], torch.sparse.mm(y_t, xc))

    def _centred(self, block: torch.Tensor, mean: torch.Tensor) -> torch.Tensor:
        """``block − mean`` in compute_dtype. Input already in compute_dtype is centred there
        (one op; ``mean`` rounded to it): the product that follows runs in that dtype anyway,
        and the float64 round trip cost three times the GEMMs (see ``make bench``'s
        single_layer_model). Other input is centred in float64 first."""
        if block.dtype == self.compute_dtype:
            return block - mean.to(self.compute_dtype)
        return (block.to(torch.float64) - mean).to(self.compute_dtype)

    def _chunk_mean_x(self, x: torch.Tensor) -> torch.Tensor:
        """Mean of ``x [n, d]``, summed in float64."""
        return x.sum(0, dtype=torch.float64) / x.shape[0]

    def _chunk_products(
        self,
        x: torch.Tensor,
        mean_x: torch.Tensor,
        rows: torch.Tensor,
        cols: torch.Tensor,
        vals: torch.Tensor,
    ) -> torch.Tensor:
        """One pass over row blocks of x, centred in float64: returns ``Σ (x - m)(x - m)ᵀ [d, d]``
        (product in compute_dtype, summed in float64) and adds the cross term into ``cyx``."""
        step = max(1, _BLOCK_ELEMS // self.d)
        cxx = torch.zeros(self.d, self.d, dtype=torch.float64, device=self.device)
        for start in range(0, x.shape[0], step):
            stop = min(start + step, x.shape[0])
            xc = x[start:stop].to(torch.float64) - mean_x
            low = xc.to(self.compute_dtype)
            cxx += (low.T @ low).to(torch.float64)
            if start == 0 and stop == x.shape[0]:
                self._add_cross(xc, rows, cols, vals)
            else:
                keep = (rows >= start) & (rows < stop)
                self._add_cross(xc, rows[keep] - start, cols[keep], vals[keep])
        return cxx

    def _absorb(
        self,
        n_b: int,
        mean_x: torch.Tensor,
        mean_y: torch.Tensor,
        cxx: torch.Tensor,
        cyx: torch.Tensor | None,
        syy: torch.Tensor,
        n_active: torch.Tensor,
    ) -> None:
        """Chan's merge of a block b's centred statistics (``cyx=None``: already added in place)."""
        n_a, n = self.n, self.n + n_b
        dx, dy = mean_x - self.mean_x, mean_y - self.mean_y
        weight = n_a * n_b / n
        self.mean_x += dx * (n_b / n)
        self.mean_y += dy * (n_b / n)
        self.cxx += cxx
        self.cxx.addr_(dx, dx, alpha=weight)
        if cyx is not None:
            self.cyx += cyx
        self.cyx.addr_(dy, dx, alpha=weight)  # in place: no [n_feat, d] temporary
        self.syy += syy + weight * dy * dy
        self.n_active += n_active
        self.n = n


@dataclass(frozen=True)
class _Basis:
    """What every feature block shares: the eigenbasis of train cxx and the λ grid in it."""

    eigvals: torch.Tensor  # [d] eigenvalues of train cxx, those below tolerance set to 0
    eigvecs: torch.Tensor  # [d, d] V
    inverse: torch.Tensor  # [d, L] 1/(s + λ), 0 where s + λ == 0 (pseudo-inverse at λ = 0)
    df: torch.Tensor  # [L] hat-matrix trace 1 + Σ s/(s + λ) of the fit with an intercept
    mean_x: torch.Tensor  # [d] Vᵀ μx (train)
    held_cxx: torch.Tensor | None  # [d, d] Vᵀ cxx_h V
    held_mean_x: torch.Tensor | None  # [d] Vᵀ μx_h


def solve_ridge(
    train: SufficientStats,
    held_out: SufficientStats | None,
    lambdas: Sequence[float],
    feature_block: int = 16384,
    min_active: int = 10,
    direction_dtype: torch.dtype | None = None,
) -> dict[str, np.ndarray]:
    """Centred ridge for all features, λ chosen per feature by GCV on the training statistics.

    For each λ, ``w(λ) = (cxx + λI)⁺ cyxᵀ`` and ``b = μy − μxᵀw``: the same solution as
    ``sklearn.linear_model.Ridge(alpha=λ, fit_intercept=True)``; λ = 0 is least squares with
    the minimum-norm solution when columns are collinear (eigenvalues of cxx below
    ``s_max·d·eps64`` count as zero). λ minimises GCV (module docstring) over the grid, from
    ``train`` alone; ``held_out`` only scores the chosen probe, so its scores are unbiased.
    Features are processed ``feature_block`` at a time: extra device memory is O(d·block).

    Returns numpy arrays: ``direction [F, d]`` (``direction_dtype``: float32, the default, or float64),
    ``intercept [F]``, ``lam [F]`` (λ chosen), ``r2_train [F]``, ``r2_gcv [F]`` (GCV estimate
    of out-of-sample R² at the chosen λ; -inf where df(λ) ≥ n), ``r2_held_out [F]``,
    ``pearson_held_out [F]`` (float64), ``n_active_train [F]``, ``n_active_held_out [F]``
    (int64), ``status [F]`` (int8, ``STATUS_*``), ``lambdas [L]``, ``df [L]`` (hat-matrix
    trace at each λ, intercept included) and ``mean_r2_held_out [L]`` (held-out R² at each λ
    averaged over ok features: a diagnostic, never used to choose). Features whose status is
    not ok get a zero direction, the train mean of y as intercept, λ = 0 and scores 0; scores
    that need held-out data are 0 without it. No NaN.
    """
    direction_dtype = torch.float32 if direction_dtype is None else direction_dtype
    if direction_dtype not in (torch.float32, torch.float64):
        raise XprobeError(
            f"direction_dtype must be torch.float32 or torch.float64, not {direction_dtype}"
        )
    grid = _check_inputs(train, held_out, lambdas, feature_block)
    basis = _eigenbasis(train, held_out, grid)
    n_feat, d = train.n_feat, train.d
    direction = torch.zeros(n_feat, d, dtype=direction_dtype)
    out = {
        "intercept": np.zeros(n_feat),
        "lam": np.zeros(n_feat),
        "r2_train": np.zeros(n_feat),
        "r2_gcv": np.zeros(n_feat),
        "r2_held_out": np.zeros(n_feat),
        "pearson_held_out": np.zeros(n_feat),
        "n_active_train": train.n_active.cpu().numpy(),
        "n_active_held_out": np.zeros(n_feat, dtype=np.int64),
        "status": np.zeros(n_feat, dtype=np.int8),
        "lambdas": grid.cpu().numpy(),
        "df": basis.df.cpu().numpy(),
    }
    if held_out is not None:
        out["n_active_held_out"] = held_out.n_active.cpu().numpy()
    r2_sum = torch.zeros_like(grid)
    n_ok = 0
    for start in range(0, n_feat, feature_block):
        block = slice(start, min(start + feature_block, n_feat))
        result, r2_per_lambda = _solve_block(train, held_out, basis, grid, block, min_active)
        ok = result["status"] == STATUS_OK
        r2_sum += r2_per_lambda[:, ok].sum(1)
        n_ok += int(ok.sum())
        direction[block] = result.pop("direction").T.to("cpu", direction_dtype)
        for name, value in result.items():
            out[name][block] = value.cpu().numpy()
    out["direction"] = direction.numpy()
    out["mean_r2_held_out"] = (r2_sum / max(n_ok, 1)).cpu().numpy()
    return out


def _check_inputs(
    train: SufficientStats,
    held_out: SufficientStats | None,
    lambdas: Sequence[float],
    feature_block: int,
) -> torch.Tensor:
    """Validate the solver's inputs; return the λ grid as a float64 tensor [L] on train's device."""
    if train.n == 0:
        raise XprobeError("no training tokens were accumulated: update the statistics first")
    if held_out is not None:
        if (held_out.d, held_out.n_feat) != (train.d, train.n_feat):
            raise XprobeError("held-out and train statistics have different d or n_feat")
        if held_out.n == 0:
            raise XprobeError("held-out statistics are empty: pass held_out=None or add data")
        if held_out.device != train.device:
            raise XprobeError("held-out and train statistics must live on the same device")
    grid = torch.tensor(list(lambdas), dtype=torch.float64, device=train.device)
    if grid.numel() == 0 or not bool(torch.isfinite(grid).all()) or bool((grid < 0).any()):
        raise XprobeError(f"lambdas must be a non-empty list of finite values >= 0, got {lambdas}")
    if feature_block < 1:
        raise XprobeError(f"feature_block must be >= 1, got {feature_block}")
    return grid


def _eigenbasis(
    train: SufficientStats, held_out: SufficientStats | None, grid: torch.Tensor
) -> _Basis:
    """Eigendecompose train cxx once (float64) and express everything shared in that basis."""
    eigvals, eigvecs = torch.linalg.eigh(train.cxx)
    tolerance = eigvals[-1].clamp(min=0) * train.d * torch.finfo(torch.float64).eps
    eigvals = torch.where(eigvals > tolerance, eigvals, torch.zeros_like(eigvals))
    denominator = eigvals[:, None] + grid[None, :]
    safe = torch.where(denominator > 0, denominator, torch.ones_like(denominator))
    inverse = torch.where(denominator > 0, 1.0 / safe, torch.zeros_like(denominator))
    held_cxx = held_mean_x = None
    if held_out is not None:
        held_cxx = eigvecs.T @ held_out.cxx @ eigvecs
        held_mean_x = eigvecs.T @ held_out.mean_x
    df = 1 + (eigvals[:, None] * inverse).sum(0)
    return _Basis(eigvals, eigvecs, inverse, df, eigvecs.T @ train.mean_x, held_cxx, held_mean_x)


def _solve_block(
    train: SufficientStats,
    held_out: SufficientStats | None,
    basis: _Basis,
    grid: torch.Tensor,
    block: slice,
    min_active: int,
) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Fit the features in ``block`` (B of them) for every λ and keep the GCV best.

    Works in the eigenbasis: ``z = Vᵀw = diag(1/(s+λ)) Vᵀ cyxᵀ``, so the training residual is
    ``RSS = syy − 2 zᵀ(Vᵀcyxᵀ) + zᵀ diag(s) z``. Returns per-feature tensors (``direction`` as
    [d, B]) and the held-out R² of every λ, [L, B] (zeros without held-out).
    """
    proj = basis.eigvecs.T @ train.cyx[block].T  # [d, B]
    mean_y, syy = train.mean_y[block], train.syy[block]
    n_active = train.n_active[block]
    status = torch.full_like(n_active, STATUS_OK, dtype=torch.int8)
    n_lambdas, width = grid.numel(), proj.shape[1]
    r2_per_lambda = torch.zeros(n_lambdas, width, dtype=torch.float64, device=proj.device)
    rss = torch.empty_like(r2_per_lambda)
    for i in range(n_lambdas):
        z = basis.inverse[:, i : i + 1] * proj
        rss[i] = syy - 2 * (z * proj).sum(0) + (basis.eigvals[:, None] * z * z).sum(0)
    rss.clamp_(min=0)
    slack = 1 - basis.df / train.n  # [L]; GCV = RSS / n / slack²
    gcv_r2 = torch.where(
        (slack > 0)[:, None],
        1 - rss / (_nonzero(slack * slack)[:, None] * _nonzero(syy)),
        torch.full_like(rss, -torch.inf),
    )
    choice = gcv_r2.argmax(0)
    chosen = choice[None, :]

    if held_out is not None:
        held_proj = basis.eigvecs.T @ held_out.cyx[block].T  # [d, B]
        held_syy = held_out.syy[block]
        status[held_syy <= 0] = STATUS_CONSTANT_HELD_OUT
        sse = torch.empty_like(r2_per_lambda)
        cross = torch.empty_like(r2_per_lambda)  # wᵀ cyx_hᵀ
        quad = torch.empty_like(r2_per_lambda)  # wᵀ cxx_h w
        for i in range(n_lambdas):
            z = basis.inverse[:, i : i + 1] * proj
            cross[i] = (z * held_proj).sum(0)
            quad[i] = ((basis.held_cxx @ z) * z).sum(0)
            # μy_h − b − μx_hᵀw with b = μy − μxᵀw
            offset = held_out.mean_y[block] - mean_y + (basis.mean_x - basis.held_mean_x) @ z
            sse[i] = held_syy - 2 * cross[i] + quad[i] + held_out.n * offset * offset
        r2_per_lambda = 1 - sse / _nonzero(held_syy)
        cross, quad = cross.gather(0, chosen)[0], quad.gather(0, chosen)[0].clamp(min=0)
        spread = torch.sqrt(quad * held_syy)
        pearson = torch.where(spread > 0, cross / _nonzero(spread), torch.zeros_like(spread))

    status[syy <= 0] = STATUS_CONSTANT_TRAIN
    status[n_active < min_active] = STATUS_RARE
    status[n_active == 0] = STATUS_DEAD
    ok = status == STATUS_OK

    z = basis.inverse[:, choice] * proj * ok
    zeros = torch.zeros_like(syy)
    result = {
        "direction": basis.eigvecs @ z,
        "intercept": mean_y - basis.mean_x @ z,
        "lam": torch.where(ok, grid[choice], zeros),
        "r2_train": torch.where(ok, 1 - rss.gather(0, chosen)[0] / _nonzero(syy), zeros),
        "r2_gcv": torch.where(ok, gcv_r2.gather(0, chosen)[0], zeros),
        "status": status,
    }
    if held_out is not None:
        result["r2_held_out"] = torch.where(ok, r2_per_lambda.gather(0, chosen)[0], zeros)
        result["pearson_held_out"] = torch.where(ok, pearson, zeros)
    return result, r2_per_lambda


def _nonzero(values: torch.Tensor) -> torch.Tensor:
    """``values`` with zeros replaced by ones, for divisions whose result is masked anyway."""
    return torch.where(values != 0, values, torch.ones_like(values))


def write_directions(
    stats: SufficientStats,
    ok: torch.Tensor | np.ndarray,
    feature_block: int = 16384,
) -> dict[str, np.ndarray]:
    """B's write direction per feature: the least-squares slope of x on y_f, with an intercept.

    Regressing every coordinate of x on the feature's activation alone gives the slope
    ``write_direction[f] = cyx[f] / syy[f]`` [d]: how far (and which way) B's residual moves per
    unit of activation, the decoder row of an SAE whose encoder row is the probe. Its scale:
    ``write_norm[f] = ‖write_direction[f]‖`` and ``write_r2[f] = ‖cyx[f]‖² / (syy[f]·tr cxx)``,
    the share of x's total variance that the line through the feature explains. From the
    statistics alone (``stats``: train). ``ok [F]`` bool picks the features to compute; the
    others (and any with ``syy == 0``) get zeros. Extra memory O(d·feature_block).

    Returns numpy arrays ``write_direction [F, d]`` float32, ``write_norm [F]`` and
    ``write_r2 [F]`` float64.
    """
    if feature_block < 1:
        raise XprobeError(f"feature_block must be >= 1, got {feature_block}")
    ok = torch.as_tensor(ok, device=stats.device).to(torch.bool)
    if ok.shape != (stats.n_feat,):
        raise XprobeError(f"ok has shape {tuple(ok.shape)}; expected [{stats.n_feat}]")
    total = float(torch.trace(stats.cxx))
    direction = np.zeros((stats.n_feat, stats.d), dtype=np.float32)
    norm, r2 = np.zeros(stats.n_feat), np.zeros(stats.n_feat)
    for start in range(0, stats.n_feat, feature_block):
        block = slice(start, min(start + feature_block, stats.n_feat))
        syy = stats.syy[block]
        keep = ok[block] & (syy > 0)
        slope = stats.cyx[block] / _nonzero(syy)[:, None] * keep[:, None]  # [B, d]
        squared = (stats.cyx[block] ** 2).sum(1)  # ‖cyx_f‖²
        direction[block] = slope.to("cpu", torch.float32).numpy()
        norm[block] = slope.norm(dim=1).cpu().numpy()
        explained = torch.where(keep, squared / _nonzero(syy * total), torch.zeros_like(syy))
        r2[block] = (explained if total > 0 else torch.zeros_like(syy)).cpu().numpy()
    return {"write_direction": direction, "write_norm": norm, "write_r2": r2}


def r2_from_stats(
    stats: SufficientStats,
    direction: np.ndarray | torch.Tensor,
    intercept: np.ndarray | torch.Tensor,
    feature_block: int = 16384,
) -> np.ndarray:
    """R² ``[F]`` of given probes ``y ≈ x·w + b`` on the tokens summarised by ``stats`` (e.g. the
    held-out tokens of one token class), from the statistics alone, in float64:

        SSE = syy − 2·w·cyx + wᵀ cxx w + n·(μy − μx·w − b)²,   R² = 1 − SSE / syy

    ``direction [F, d]``, ``intercept [F]``. NaN where y is constant on these tokens (syy = 0,
    no tokens included): R² is undefined there.
    """
    dev = stats.device
    out = np.full(stats.n_feat, np.nan)
    if stats.n == 0:
        return out
    direction = torch.as_tensor(direction)
    intercept = torch.as_tensor(intercept)
    for start in range(0, stats.n_feat, feature_block):
        block = slice(start, min(start + feature_block, stats.n_feat))
        w = direction[block].to(dev, torch.float64)  # [B, d]
        b = intercept[block].to(dev, torch.float64)
        quad = ((w @ stats.cxx) * w).sum(1)
        cross = (w * stats.cyx[block]).sum(1)
        bias = stats.mean_y[block] - w @ stats.mean_x - b
        syy = stats.syy[block]
        sse = syy - 2 * cross + quad + stats.n * bias * bias
        r2 = torch.where(syy > 0, 1 - sse / torch.where(syy > 0, syy, 1), torch.nan)
        out[block] = r2.cpu().numpy()
    return out

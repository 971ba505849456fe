"""The seed's single-layer model: per SAE feature, ``ŷ_f(x_B) = σ_A(w_fᵀ x_B + c_f)``, with σ_A A's
SAE's own activation (ReLU, JumpReLU with A's thresholds, TopK across all features with A's k:
whatever the SAE's ``encode`` applies after its ``hook_sae_acts_pre``, run through its own code).

Closed form. A's SAE pre-activation is affine in A's residual as the SAE reads it: ``z = a·E + e``
(``E [d_A, F]``, ``e [F]``, read off the SAE itself: pipeline/probes/sae_map.py), so the ridge
regression of every feature's pre-activation on B's residual needs only dense statistics that do
not grow with F: the centred ``Σ x_B x_Bᵀ`` and ``Σ a x_Bᵀ`` (``map`` statistics, the same as
the affine map's) and ``Σ a aᵀ`` (once per fit). Per feature block,

    cyx_z = Eᵀ · Σ (a−μa)(x−μx)ᵀ      [F_block, d_B]
    μz = μa·E + e,    Σ (z−μz)² = diag(Eᵀ Σ(a−μa)(a−μa)ᵀ E)

and :func:`pipeline.maths.lstsq.solve_ridge` solves them (λ per feature by GCV on the training
statistics, as for the linear probe). For A → A at the SAE's hook the least-squares solution is
``E`` itself: the ceiling is A's encoder, a self-check rather than an estimate. Held-out scoring
applies σ_A to ``x_B·Wᵀ + c`` for all features of a row block at once (pipeline/probes/score.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.errors import XprobeError
from pipeline.lazy import torch
from pipeline.maths.lstsq import SufficientStats, solve_ridge
from pipeline.probes.sae_map import SaeThroughMap

A_STATS = "@sae_input"
"""Key of the fit-wide statistics of A's residual (``Σ a aᵀ`` on training tokens) beside the
hooks' in a fit's statistics."""


class SaeActivation:
    """σ_A: A's SAE's activation applied to given pre-activations ``[rows, F]``, through the
    SAE's own ``encode`` (its ``hook_sae_acts_pre`` output replaced by the given values), and
    A's pre-activation as an affine function of A's residual (``E``, ``e``)."""

    def __init__(self, through: SaeThroughMap):
        self.through, self.sae = through, through.sae
        if getattr(self.sae, "hook_sae_acts_pre", None) is None:
            raise XprobeError(
                f"the SAE ({type(self.sae).__name__}) has no hook_sae_acts_pre: the single-layer "
                'model needs A\'s pre-activation; fit with predictor = "linear"'
            )
        affine = through.affine_preactivation()
        if affine is None:
            raise XprobeError(
                f"the pre-activation of the SAE ({type(self.sae).__name__}) is not an affine "
                "function of its input (input normalisation?): the closed-form single-layer "
                'model needs it to be; fit with predictor = "linear"'
            )
        self.enc, self.enc_bias = affine  # [d_A, F] float32, [F] float64
        self._check()

    def apply(self, pre: torch.Tensor) -> torch.Tensor:
        """``[rows, F]`` float64: σ_A of the pre-activations ``pre [rows, F]``."""
        sae = self.sae
        device = sae.W_enc.device
        value = pre.to(device, sae.dtype)
        zeros = torch.zeros(pre.shape[0], int(sae.cfg.d_in), dtype=sae.dtype, device=device)
        handle = sae.hook_sae_acts_pre.register_forward_hook(lambda _m, _i, _o: value)
        try:
            with torch.no_grad():
                out = sae.encode(zeros)
        finally:
            handle.remove()
        out = out.to_dense() if out.is_sparse else out
        return out.to(torch.float64)

    def _check(self) -> None:
        """σ_A(a·E + e) must be A's own encoding of a (random a): else refuse, naming the class."""
        generator = torch.Generator().manual_seed(1)
        d_a = int(self.sae.cfg.d_in)
        a = torch.randn(8, d_a, generator=generator, dtype=torch.float64) * 3
        device = self.sae.W_enc.device
        with torch.no_grad():
            own = self.sae.encode(self.through.prepare(a.to(device)))
            own = (own.to_dense() if own.is_sparse else own).to(torch.float64)
        pre = (a.to(device, torch.float32) @ self.enc).to(torch.float64) + self.enc_bias
        mine = self.apply(pre)
        scale = float(own.abs().max().clamp(min=1.0))
        if float((mine - own).abs().max()) > 1e-3 * scale:
            raise XprobeError(
                f"the SAE class {type(self.sae).__name__} does not apply its activation to its "
                "hook_sae_acts_pre output alone (e.g. a gated SAE's separate magnitude path): the "
                'single-layer model cannot use it; fit with predictor = "linear"'
            )

    def predictor(
        self, direction: np.ndarray, intercept: np.ndarray, device: torch.device, dtype: torch.dtype
    ) -> Any:
        """``predict(x [rows, d_B]) -> [rows, F]`` float64: ``σ_A(x·Wᵀ + c)``, the GEMM in
        ``dtype`` (the fit's compute dtype), the intercept added in float64."""
        w = torch.from_numpy(np.ascontiguousarray(direction)).to(device, dtype)
        c = torch.from_numpy(np.asarray(intercept, dtype=np.float64)).to(device)

        def predict(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                pre = (x.to(device, dtype) @ w.T).to(torch.float64) + c
                return self.apply(pre).to(device)

        return predict


class _CrossBlocks:
    """``cyx_z[block] = E[:, block]ᵀ · Σ(a−μa)(x−μx)ᵀ`` [F_block, d_B], computed per block."""

    def __init__(self, enc: torch.Tensor, cross: torch.Tensor):
        self.enc, self.cross = enc, cross  # [d_A, F], [d_A, d_B]

    def __getitem__(self, block: slice) -> torch.Tensor:
        e = self.enc[:, block].to(self.cross.device, torch.float64)
        return e.T @ self.cross


class PreactivationTargets:
    """Training statistics of B's residual against A's pre-activations ``z = a·E + e``, in the
    shape :func:`solve_ridge` reads (``cxx``, ``mean_x``, ``mean_y``, ``syy``, ``n_active``,
    ``cyx[block]``); ``n_active`` is the post-activation's (the features' firing counts), so
    a feature is "dead" or "too rare" exactly as for the linear probe."""

    def __init__(
        self,
        mapped: SufficientStats,
        a_stats: SufficientStats,
        enc: torch.Tensor,
        enc_bias: torch.Tensor,
        n_active: torch.Tensor,
        feature_block: int,
    ):
        dev = mapped.device
        self.n, self.d, self.n_feat, self.device = mapped.n, mapped.d, enc.shape[1], dev
        self.cxx, self.mean_x = mapped.cxx, mapped.mean_x
        self.mean_y = torch.empty(self.n_feat, dtype=torch.float64, device=dev)
        self.syy = torch.empty_like(self.mean_y)
        for start in range(0, self.n_feat, feature_block):
            block = slice(start, min(start + feature_block, self.n_feat))
            e = enc[:, block].to(dev, torch.float64)
            self.mean_y[block] = a_stats.mean_x @ e + enc_bias[block].to(dev)
            self.syy[block] = ((a_stats.cxx @ e) * e).sum(0).clamp(min=0)
        self.cyx = _CrossBlocks(enc, mapped.cyx)
        self.n_active = n_active.to(dev)


def solve_encoder(
    mapped: SufficientStats,
    a_stats: SufficientStats,
    activation: SaeActivation,
    n_active: torch.Tensor,
    lambdas: list[float],
    feature_block: int,
    min_active: int,
) -> dict[str, np.ndarray]:
    """Every feature's ``w_f``, ``c_f`` (λ by GCV on the training statistics of the
    pre-activation): ``direction [F, d_B]``, ``intercept``, ``lam``, ``r2_train`` and ``r2_gcv``
    (of the pre-activation, training tokens), ``status``."""
    targets = PreactivationTargets(
        mapped, a_stats, activation.enc, activation.enc_bias, n_active, feature_block
    )
    out = solve_ridge(
        targets,  # type: ignore[arg-type]  (duck-typed statistics)
        None,
        lambdas,
        feature_block=feature_block,
        min_active=min_active,
    )
    keep = ("direction", "intercept", "lam", "r2_train", "r2_gcv", "status", "df", "lambdas")
    return {k: out[k] for k in keep}

"""A's SAE read on B's activations through an affine map (the affine-map baseline), and the
SAE pieces the fit reads from the features' provenance: its decoder rows (Latent Scaling) and its
pre-activation as an affine function of its input.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.errors import XprobeError
from pipeline.lazy import torch
from pipeline.probes.inputs import FitInputs


def sae_through_map(fit: FitInputs) -> SaeThroughMap:
    """A's SAE (the features' own, in their encode dtype, on this fit's device) for the map."""
    from pipeline.inputs.sae import load_sae_of

    info = fit.store.info(fit.feats)
    sae = load_sae_of(fit.store, fit.feats, device=str(fit.device))
    dtype = getattr(torch, str(info.get("encode_dtype", "float32")))
    centered = info.get("sae_input", "raw") == "centered"
    return SaeThroughMap(sae.to(dtype=dtype), centered)


def sae_decoder(fit: FitInputs, d: int) -> torch.Tensor | None:
    """A's decoder rows ``W_dec [F, d]`` (float64, on this fit's device) when the SAE the
    features were computed with loads and writes in B's width d; else None (no baseline)."""
    from pipeline.inputs.sae import load_sae_of

    try:
        sae = load_sae_of(fit.store, fit.feats)
    except XprobeError:  # a shared cache may not come with its SAE: no baseline, no failure
        return None
    w_dec = sae.W_dec.detach()
    if w_dec.shape[1] != d:
        return None
    return w_dec.to(fit.device, torch.float64)


class SaeThroughMap:
    """A's SAE read on B's activations through an affine map: ``encode(x·Mᵀ + c)``, the mapped
    activations centred over d_A first where the features stage centred A's (``centered``)."""

    def __init__(self, sae: Any, centered: bool):
        self.sae, self.centered = sae, centered

    def prepare(self, y: torch.Tensor) -> torch.Tensor:
        """The SAE's input from A-space activations ``y [rows, d_A]``."""
        y = y.to(self.sae.W_enc.device, self.sae.dtype)
        return y - y.mean(dim=1, keepdim=True) if self.centered else y

    def predictor(
        self, weight: np.ndarray, bias: np.ndarray, device: torch.device, dtype: torch.dtype
    ) -> Any:
        """``predict(x [rows, d_B]) -> [rows, F]`` float64 on ``device``: the map's GEMM in
        ``dtype`` (the fit's compute dtype), its bias added in float64, then the SAE."""
        m = torch.from_numpy(np.ascontiguousarray(weight)).to(device, dtype)
        c = torch.from_numpy(np.asarray(bias)).to(device, torch.float64)

        def predict(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                y = (x.to(device, dtype) @ m.T).to(torch.float64) + c
                feats = self.sae.encode(self.prepare(y))
                feats = feats.to_dense() if feats.is_sparse else feats
                return feats.to(device, torch.float64)

        return predict

    def affine_preactivation(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(E [d_A, F] float32, e [F] float64)`` with the SAE's pre-activation (its ``hook_sae_acts_pre``,
        after ``prepare``) equal to ``y·E + e``, read off at y = 0 and the unit vectors and checked
        at a random y; None where the SAE has no such hook or its pre-activation is not affine.
        E is as large as W_enc; it holds differences of the SAE's own (float32 or narrower)
        outputs, so float64 would add memory, not precision."""
        sae = self.sae
        hook = getattr(sae, "hook_sae_acts_pre", None)
        if hook is None:
            return None
        d_a = int(sae.cfg.d_in)
        device = sae.W_enc.device
        generator = torch.Generator().manual_seed(0)
        probe = torch.randn(1, d_a, generator=generator, dtype=torch.float64)
        inputs = torch.cat([torch.zeros(1, d_a, dtype=torch.float64), probe]).to(device)
        captured: list[torch.Tensor] = []
        handle = hook.register_forward_hook(lambda _m, _i, out: captured.append(out.detach()))
        try:
            with torch.no_grad():
                sae.encode(self.prepare(inputs))
                pre = captured[-1].to(torch.float64)
                e, at_probe = pre[0], pre[1]
                enc = torch.empty(d_a, pre.shape[1], dtype=torch.float32, device=device)
                step = max(1, (1 << 22) // max(pre.shape[1], 1))
                eye = torch.eye(d_a, dtype=torch.float64, device=device)
                for start in range(0, d_a, step):
                    sae.encode(self.prepare(eye[start : start + step]))
                    enc[start : start + step] = captured[-1].to(torch.float64) - e
        finally:
            handle.remove()
        expected = (probe.to(device, torch.float32)[0] @ enc).to(torch.float64) + e
        tolerance = 1e-3 * float(expected.abs().max().clamp(min=1.0))
        if float((expected - at_probe).abs().max()) > tolerance:
            return None
        return enc, e

"""Tiny sae-lens SAEs with seeded random weights, saved with ``save_model`` for ``SAE.load_from_disk``."""

from __future__ import annotations

from pathlib import Path

import torch


def save_standard_sae(
    out: Path,
    d_in: int = 64,
    d_sae: int = 256,
    hook: str = "blocks.0.hook_resid_post",
    seed: int = 0,
    bias: float = -1.0,
    enc_scale: float = 4.0,
) -> Path:
    """A StandardSAE (ReLU) whose negative encoder bias keeps L0 moderate (tens of features) on the
    test GPT-2's residual stream (|x| ~ 0.25, so pre-activations have std ~ enc_scale * 0.25)."""
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(seed)
    sae = StandardSAE(
        StandardSAEConfig(d_in=d_in, d_sae=d_sae, metadata=SAEMetadata(hook_name=hook))
    )
    with torch.no_grad():
        sae.W_enc.copy_(enc_scale * torch.randn(d_in, d_sae))
        sae.W_dec.copy_(torch.randn(d_sae, d_in) / (enc_scale * d_sae))
        sae.b_enc.fill_(bias)
        sae.b_dec.copy_(0.01 * torch.randn(d_in))
    sae.save_model(str(out))
    return out


def save_topk_sae(
    out: Path,
    d_in: int = 64,
    d_sae: int = 256,
    k: int = 8,
    hook: str = "blocks.0.hook_resid_post",
    seed: int = 1,
) -> Path:
    """A TopK SAE with random weights: exactly ``k`` features fire on every token."""
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(seed)
    sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k, metadata=SAEMetadata(hook_name=hook)))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_in, d_sae) / d_in**0.5)
        sae.W_dec.copy_(sae.W_enc.T.clone())
        sae.b_enc.fill_(0.0)
    sae.save_model(str(out))
    return out


def save_jumprelu_sae(
    out: Path,
    d_in: int = 64,
    d_sae: int = 256,
    hook: str = "blocks.0.hook_resid_post",
    seed: int = 2,
) -> Path:
    """A JumpReLU SAE: pre-activations of std ~1 on the test residual stream, thresholds ~1.5."""
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(seed)
    sae = JumpReLUSAE(
        JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae, metadata=SAEMetadata(hook_name=hook))
    )
    with torch.no_grad():
        sae.W_enc.copy_(4.0 * torch.randn(d_in, d_sae))
        sae.W_dec.copy_(torch.randn(d_sae, d_in) / (4.0 * d_sae))
        sae.b_enc.fill_(0.0)
        sae.threshold.copy_(1.0 + torch.rand(d_sae))
        sae.b_dec.copy_(0.01 * torch.randn(d_in))
    sae.save_model(str(out))
    return out


def save_gated_sae(
    out: Path,
    d_in: int = 64,
    d_sae: int = 256,
    hook: str = "blocks.0.hook_resid_post",
    seed: int = 3,
) -> Path:
    """A gated SAE (gate and magnitude paths share W_enc; r_mag rescales the magnitude path)."""
    from sae_lens import GatedSAE, GatedSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(seed)
    sae = GatedSAE(GatedSAEConfig(d_in=d_in, d_sae=d_sae, metadata=SAEMetadata(hook_name=hook)))
    with torch.no_grad():
        sae.W_enc.copy_(4.0 * torch.randn(d_in, d_sae))
        sae.W_dec.copy_(torch.randn(d_sae, d_in) / (4.0 * d_sae))
        sae.b_gate.fill_(-1.0)
        sae.r_mag.copy_(0.1 * torch.randn(d_sae))
        sae.b_mag.copy_(0.1 * torch.randn(d_sae))
        sae.b_dec.copy_(0.01 * torch.randn(d_in))
    sae.save_model(str(out))
    return out

"""Device and dtype defaults shared by the stages that run models, SAEs and the fitter."""

from __future__ import annotations


def resolve_device(device: str) -> str:
    """``auto`` -> cuda > mps > cpu; anything else is returned as given."""
    import torch

    if device != "auto":
        return device
    if torch.cuda.is_available():
        return "cuda"
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def resolve_dtype(dtype: str, device: str) -> str:
    """``auto`` -> bfloat16 on CUDA, float32 elsewhere."""
    if dtype != "auto":
        return dtype
    return "bfloat16" if device.startswith("cuda") else "float32"

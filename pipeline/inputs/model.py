"""Model loading for what runs a model outside the activations stage (the export's splice):
finding an HF causal LM's decoder blocks, whatever the architecture names them."""

from __future__ import annotations

from typing import Any

from pipeline.errors import XprobeError


def find_blocks(model: Any, n_layers: int) -> Any:
    """The decoder blocks of an HF model (``model.layers``, ``transformer.h``...), found generically."""
    import torch

    for path in (
        "model.layers",
        "transformer.h",
        "gpt_neox.layers",
        "model.decoder.layers",
        "transformer.layers",
        "model.language_model.layers",
    ):
        node = model
        for part in path.split("."):
            node = getattr(node, part, None)
        if isinstance(node, torch.nn.ModuleList) and len(node) == n_layers:
            return node
    for _, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n_layers:
            return module
    raise XprobeError(f"cannot find the {n_layers} decoder blocks of {type(model).__name__}")

"""The one SAE loader: a sae-lens release + id, or a local folder saved by sae-lens.

Every stage that needs an SAE comes here: the features stage (to encode), the report (encoder
rows for the ceiling's cosine) and the match stage (decoder rows for SVCCA), the latter two from
what a features unit's provenance records.
"""

from __future__ import annotations

from typing import Any

from pipeline.errors import XprobeError


def load_sae(
    sae: str | None = None,
    sae_id: str | None = None,
    sae_path: str | None = None,
    device: str = "cpu",
    dtype: str | None = None,
) -> Any:
    """The SAE ``SAE.load_from_disk(sae_path)`` or ``SAE.from_pretrained(sae, sae_id)``, in eval
    mode on ``device``, in ``dtype`` (None: a folder's own dtype; float32 for a release)."""
    from sae_lens import SAE

    if (sae_path is None) == (sae is None):
        raise XprobeError("give either sae (a sae-lens release, with sae_id) or sae_path")
    if sae is not None and sae_id is None:
        raise XprobeError(f"the SAE release {sae!r} needs an sae_id")
    try:
        if sae_path is not None:
            loaded = SAE.load_from_disk(sae_path, device=device, dtype=dtype)
        else:
            loaded = SAE.from_pretrained(sae, sae_id, device=device, dtype=dtype or "float32")
    except (OSError, ValueError, KeyError, TypeError) as e:
        what = sae_path or f"{sae} / {sae_id}"
        raise XprobeError(f"cannot load the SAE {what}: {e}") from None
    return loaded.eval()


def load_sae_of(store: Any, feats_unit: str, device: str = "cpu") -> Any:
    """The SAE a features unit was computed with, from what its provenance records."""
    config = store.info(feats_unit).get("config", {})
    return load_sae(
        sae=config.get("sae"),
        sae_id=config.get("sae_id"),
        sae_path=config.get("sae_path"),
        device=device,
    )


# Model families by the norm their blocks use (transformers ``model_type``). TransformerLens's
# ``center_writing_weights`` only applies to LayerNorm models (it skips RMSNorm ones).
LAYERNORM_MODELS = frozenset(
    "gpt2 gpt_neo gpt_neox gptj opt bloom phi falcon stablelm codegen gpt_bigcode mpt".split()
)
RMSNORM_MODELS = frozenset(
    "llama mistral mixtral gemma gemma2 gemma3 gemma3_text qwen2 qwen2_moe qwen3 qwen3_moe "
    "olmo olmo2 phi3 granite".split()
)


def sae_input_transform(metadata: Any, model_type: str | None, requested: str) -> tuple[str, str]:
    """What the SAE expects done to the stored (raw HF) residual stream before ``encode``:
    ``("raw" | "centered", why)``.

    Many sae-lens releases (the classic GPT-2 residual SAEs among them) were trained on
    ``HookedTransformer`` activations with its default weight processing. Of that processing only
    ``center_writing_weights`` changes the residual stream: every weight and bias writing to it is
    centred over d_model, so each position's residual is the raw one minus its mean over d_model
    (LayerNorm models only; TransformerLens skips RMSNorm models). The SAE's metadata says what was
    used (``model_class_name``, ``model_from_pretrained_kwargs``; TransformerLens's default is
    ``center_writing_weights = True``). ``requested``: the config's ``sae_input`` (``auto`` reads
    the metadata; ``raw`` / ``centered`` overrule it).
    """
    if requested != "auto":
        return requested, "set by sae_input in the config"
    get = metadata.get if hasattr(metadata, "get") else lambda k, d=None: getattr(metadata, k, d)
    kwargs = get("model_from_pretrained_kwargs", None)
    class_name = get("model_class_name", None)
    if kwargs is None:
        return "raw", "the SAE's metadata does not say how its training activations were processed"
    if class_name not in (None, "HookedTransformer"):
        return "raw", f"trained on {class_name} activations"
    if not kwargs.get("center_writing_weights", True):
        return "raw", "trained with center_writing_weights = False"
    if model_type in RMSNORM_MODELS:
        return "raw", (
            f"trained with center_writing_weights, which TransformerLens skips for {model_type} "
            "(RMSNorm)"
        )
    if model_type in LAYERNORM_MODELS:
        return "centered", (
            "trained on TransformerLens activations with center_writing_weights: each position's "
            "residual is centred over d_model"
        )
    raise XprobeError(
        "the SAE was trained on TransformerLens activations with center_writing_weights, which "
        "centres the residual stream of LayerNorm models, and xprobe does not know whether "
        f'model type {model_type!r} uses LayerNorm: set sae_input = "centered" (LayerNorm) or '
        '"raw" (RMSNorm) in the features config'
    )

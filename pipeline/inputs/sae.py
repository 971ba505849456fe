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

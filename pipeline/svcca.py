"""SVCCA (Raghu et al. 2017) between paired vectors, e.g. the decoder directions of matched SAE
features, as in Lan et al. 2024: rotation-invariant, so it compares feature geometry across models
whose residual bases (and widths) differ. A random-pairing baseline says what chance gives.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.errors import XprobeError
from pipeline.store import Store


def _reduce(z: np.ndarray, keep_variance: float) -> np.ndarray:
    """An orthonormal basis [m, k] of the centred rows' top singular directions holding
    ``keep_variance`` of their variance (the "SV" step)."""
    z = z - z.mean(0)
    u, s, _ = np.linalg.svd(z, full_matrices=False)
    energy = np.cumsum(s**2) / max(float((s**2).sum()), 1e-300)
    k = int(np.searchsorted(energy, keep_variance - 1e-12) + 1)
    return u[:, : min(k, len(s))]


def canonical_correlations(x: np.ndarray, y: np.ndarray, keep_variance: float = 0.99) -> np.ndarray:
    """SVCCA's canonical correlations (descending) between paired rows ``x`` [m, d_x], ``y`` [m, d_y]."""
    qx = _reduce(np.asarray(x, dtype=np.float64), keep_variance)
    qy = _reduce(np.asarray(y, dtype=np.float64), keep_variance)
    return np.clip(np.linalg.svd(qx.T @ qy, compute_uv=False), 0.0, 1.0)


def svcca(
    x: np.ndarray,
    y: np.ndarray,
    keep_variance: float = 0.99,
    n_random: int = 20,
    seed: int = 0,
) -> dict[str, Any]:
    """Mean SVCCA correlation of paired rows, beside the same with the pairing shuffled ``n_random``
    times (``p_value``: share of shuffles at least as high, with the usual +1 correction)."""
    if len(x) != len(y):
        raise ValueError(f"x has {len(x)} rows, y has {len(y)}: they must be paired")
    rho = canonical_correlations(x, y, keep_variance)
    rng = np.random.default_rng(seed)
    shuffled = np.array(
        [
            canonical_correlations(x, y[rng.permutation(len(y))], keep_variance).mean()
            for _ in range(n_random)
        ]
    )
    return {
        "svcca": float(rho.mean()),
        "n_pairs": len(x),
        "n_components": len(rho),
        "random_mean": float(shuffled.mean()) if n_random else None,
        "random_std": float(shuffled.std()) if n_random else None,
        "p_value": float((1 + (shuffled >= rho.mean()).sum()) / (n_random + 1)),
    }


def load_decoder(store: Store, feats_unit: str) -> np.ndarray:
    """``W_dec`` [n_feat, d_model] of the SAE a features unit was computed with, loaded with
    sae-lens from what its provenance records (a local folder, or a release and id)."""
    from sae_lens import SAE

    cfg = store.info(feats_unit).get("config", {})
    try:
        if cfg.get("sae_path"):
            sae = SAE.load_from_disk(cfg["sae_path"], device="cpu")
        else:
            sae = SAE.from_pretrained(cfg["sae"], cfg["sae_id"], device="cpu")
    except (OSError, ValueError, KeyError, TypeError) as e:
        what = cfg.get("sae_path") or f"{cfg.get('sae')} / {cfg.get('sae_id')}"
        raise XprobeError(
            f"cannot load the SAE of {feats_unit} ({what}, from its provenance) for SVCCA: {e}. "
            "Make it available there, or set svcca = false."
        ) from None
    return sae.W_dec.detach().float().cpu().numpy()

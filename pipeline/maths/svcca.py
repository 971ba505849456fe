"""SVCCA (Raghu et al. 2017) between paired vectors, e.g. the decoder directions of matched SAE
features, as in Lan et al. 2024: rotation-invariant, so it compares feature geometry across models
whose residual bases (and widths) differ. A random-pairing baseline says what chance gives.
"""

from __future__ import annotations

from typing import Any

import numpy as np


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

"""The held-out split, by sequence: shared by the fit (which trains on it) and the report (whose
token baseline must be scored on exactly the fit's held-out tokens)."""

from __future__ import annotations

import numpy as np

from pipeline.errors import XprobeError


def held_out_sequences(n_seq: int, fraction: float, seed: int) -> np.ndarray:
    """[n_seq] bool: which sequences are held out. Same (n_seq, fraction, seed), same split."""
    if not 0.0 <= fraction < 1.0:
        raise XprobeError(f"held_out_fraction must be in [0, 1), got {fraction}")
    return np.random.default_rng(seed).random(n_seq) < fraction

"""The demo's ground truth for "absent": which SAE features the ablated and erased models B lose,
the LEACE eraser that removes them, and which frequency-matched features are kept by construction
(their headroom survives the eraser). In-sample readout statistics over cached activations.

Used by ``pipeline/demo/build.py``.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from pipeline.demo.lm import block_output, leace_eraser


@torch.no_grad()
def linear_r2(x: torch.Tensor, sae: Any, acts: torch.Tensor) -> np.ndarray:
    """[n_feat]: in-sample R² of a linear readout (with intercept) from ``x`` [n, d] of each
    feature of ``sae.encode(acts)``; ``x`` may be ``acts`` itself or a transform of it."""
    n = len(x)
    mean = x.double().mean(0)
    xtx = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
    xty = torch.zeros(x.shape[1], sae.cfg.d_sae, dtype=torch.float64)
    sum_y = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
    sum_yy = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
    for start in range(0, n, 8192):
        xc = x[start : start + 8192].double() - mean
        y = sae.encode(acts[start : start + 8192]).double()
        xtx += xc.T @ xc
        xty += xc.T @ y
        sum_y += y.sum(0)
        sum_yy += (y * y).sum(0)
    sst = (sum_yy - sum_y**2 / n).clamp_min(1e-12)
    return ((xty * (torch.linalg.pinv(xtx, hermitian=True) @ xty)).sum(0) / sst).numpy()


@torch.no_grad()
def token_r2(sae: Any, acts: torch.Tensor, ids: torch.Tensor, vocab_size: int) -> np.ndarray:
    """[n_feat]: in-sample R² of the per-token-id mean of each feature of ``sae.encode(acts)``."""
    n = len(acts)
    per_token = torch.zeros(vocab_size, sae.cfg.d_sae, dtype=torch.float64)
    sum_y = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
    sum_yy = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
    for start in range(0, n, 8192):
        y = sae.encode(acts[start : start + 8192]).double()
        per_token.index_add_(0, ids[start : start + 8192].long(), y)
        sum_y += y.sum(0)
        sum_yy += (y * y).sum(0)
    sst = (sum_yy - sum_y**2 / n).clamp_min(1e-12)
    count = torch.bincount(ids.long(), minlength=vocab_size).double().clamp_min(1)
    return (((per_token**2 / count[:, None]).sum(0) - sum_y**2 / n) / sst).numpy()


@torch.no_grad()
def fit_eraser(
    sae: Any, acts: torch.Tensor, features: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The LEACE eraser ``(M, c)`` of ``features`` of ``sae.encode(acts)`` from ``acts``."""
    z = torch.cat([sae.encode(x)[:, features] for x in acts.split(8192)])
    return leace_eraser(acts, z)


def survival(
    sae: Any,
    acts: torch.Tensor,
    eraser: tuple[torch.Tensor, torch.Tensor],
    room: np.ndarray,
    token: np.ndarray,
) -> np.ndarray:
    """[n_feat]: the share of each feature's headroom ``room`` (in-sample R² from ``acts`` beyond
    ``token``, the token baseline's R² floored at 0) that is left after ``eraser``: <= 0 for the
    erased features, near 1 for features it leaves alone (NaN where there is no headroom to
    keep). What the presence score measures, in-sample."""
    m, c = eraser
    after = linear_r2((acts.double() @ m.T + c).float(), sae, acts) - token
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(room > 1e-6, after / room, np.nan)


def ablation_band(
    frequency: np.ndarray, room: np.ndarray, band: tuple[float, float], min_headroom: float
) -> np.ndarray:
    """Features firing on a share of tokens within ``band`` with at least ``min_headroom`` of
    in-sample R² beyond the token (``room``: the only ones a presence score can judge)."""
    lo, hi = band
    return np.flatnonzero((frequency >= lo) & (frequency <= hi) & (room >= min_headroom))


def choose_ablated(band: np.ndarray, n: int, seed: int) -> list[int]:
    """``n`` features of ``band`` drawn at random."""
    if len(band) < 2 * n:
        raise RuntimeError(f"only {len(band)} SAE features in the frequency band with headroom")
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(band, n, replace=False).tolist())


def match_kept(frequency: np.ndarray, candidates: np.ndarray, ablated: list[int]) -> list[int]:
    """For each ablated feature, the unchosen candidate nearest in log frequency."""
    pool = [int(f) for f in candidates if f not in set(ablated)]
    if len(pool) < len(ablated):
        raise RuntimeError(f"only {len(pool)} candidates for {len(ablated)} kept features")
    kept = []
    for f in ablated:
        best = min(pool, key=lambda g: abs(math.log(frequency[g]) - math.log(frequency[f])))
        kept.append(best)
        pool.remove(best)
    return sorted(kept)


def rounded(v: float) -> float:
    return round(float(v), 4)


@torch.no_grad()
def held_out_share(
    reference: torch.nn.Module, model: torch.nn.Module, sae: Any, seqs: torch.Tensor, layer: int
) -> np.ndarray:
    """[n_feat]: on ``seqs`` (not trained on), the in-sample linear R² of each feature of ``sae``
    (encoded from the reference's residual) from ``model``'s residual, over that from the
    reference's own: how much of each feature ``model`` kept."""
    ref = torch.cat([block_output(reference, s, layer)[:, 1:] for s in seqs.split(32)]).flatten(
        0, 1
    )
    got = torch.cat([block_output(model, s, layer)[:, 1:] for s in seqs.split(32)]).flatten(0, 1)
    before = linear_r2(ref, sae, ref)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(before > 1e-6, linear_r2(got, sae, ref) / before, np.nan)

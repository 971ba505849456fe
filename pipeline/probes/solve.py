"""How a fit is solved: every hook's probes from its training statistics alone (λ by GCV, see
pipeline/maths/lstsq.py), B's write directions, the Latent Scaling baseline and the affine map
(pipeline/maths/stitch.py). No held-out token is read here.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.errors import XprobeError
from pipeline.lazy import torch
from pipeline.maths.lstsq import STATUS_OK, SufficientStats, solve_ridge, write_directions
from pipeline.maths.stitch import linear_r2_through_map, solve_map
from pipeline.probes.config import FitConfig
from pipeline.probes.encoder import SaeActivation, solve_encoder
from pipeline.probes.sae_map import SaeThroughMap

Solved = tuple[dict[str, Any], dict[str, Any] | None]
"""One hook's arrays (what is written) and the map's solve (None without the affine map)."""


LINEAR_KEYS = ("direction", "intercept", "lam", "r2_train", "r2_gcv", "r2_held_out")
LINEAR_KEYS += ("pearson_held_out", "mean_r2_held_out", "df")
"""The linear probe's arrays that the single-layer model's take over (stored as ``linear_*``)."""


def solve_hook(
    cfg: FitConfig,
    stats: dict[str, SufficientStats],
    decoder: torch.Tensor | None,
    through: SaeThroughMap | None,
    activation: SaeActivation | None = None,
    a_stats: SufficientStats | None = None,
) -> Solved:
    """One hook's probes from its training statistics (λ by GCV), write directions, the
    Latent Scaling baseline and the affine map (``through``: A's SAE; its solve is returned
    beside the arrays). With ``activation`` (σ_A) and ``a_stats`` (A's residual), the
    single-layer model takes the headline names and the linear probe's become ``linear_*``."""
    train, held = stats["train"], stats["held_out"]
    if train.n == 0:
        raise XprobeError("no training tokens: the corpus is too small for this held_out_fraction")
    scale = float(torch.trace(train.cxx)) / train.cxx.shape[0]
    lambdas = [lam * scale for lam in cfg.lambdas]
    result = solve_ridge(
        train,
        held if held.n > 0 else None,
        lambdas,
        feature_block=cfg.feature_block,
        min_active=cfg.min_active,
    )
    # B's write direction (decoder row) per feature, beside the probe (encoder row)
    ok = np.asarray(result["status"]) == STATUS_OK
    result.update(write_directions(train, ok, cfg.feature_block))
    mapped = None
    if through is not None:
        mapped = solve_map(stats["map"], cfg.lambdas, cfg.feature_block)
        result.update(map_arrays(cfg, mapped, train, through, ok))
    if decoder is not None:
        result["latent_scale"] = latent_scale(train, decoder, cfg.feature_block)
    if activation is not None and a_stats is not None:
        enc = solve_encoder(
            stats["map"],
            a_stats,
            activation,
            train.n_active,
            lambdas,
            cfg.feature_block,
            cfg.min_active,
        )
        for key in LINEAR_KEYS:
            result[f"linear_{key}"] = result.pop(key)
        status = np.asarray(result["status"])
        result["status"] = np.where(status != STATUS_OK, status, enc.pop("status"))
        enc.pop("lambdas")
        result.update(enc)
        zeros = np.zeros(len(status))  # the held-out pass's scores replace these (no held-out: 0)
        result["r2_held_out"], result["pearson_held_out"] = zeros, zeros.copy()
    return result, mapped


def map_arrays(
    cfg: FitConfig,
    mapped: dict[str, np.ndarray],
    train: SufficientStats,
    through: SaeThroughMap,
    ok: np.ndarray,
) -> dict[str, np.ndarray]:
    """The map as stored (``map_weight [d_A, d_B]`` float32, ``map_bias``, ``map_lam``,
    ``map_r2_train`` [d_A]) and, where the SAE's pre-activation is affine, the training R² of
    that pre-activation read through the map (``map_r2_linear_train [F]``, NaN where the
    probe's status is not ok)."""
    out = {
        "map_weight": mapped["weight"].astype(np.float32),
        "map_bias": mapped["bias"],
        "map_lam": mapped["lam"],
        "map_r2_train": mapped["r2_train"],
    }
    affine = through.affine_preactivation()
    if affine is not None:
        enc_weight, enc_bias = affine
        r2 = linear_r2_through_map(
            train, mapped["weight"], mapped["bias"], enc_weight, enc_bias, cfg.feature_block
        )
        out["map_r2_linear_train"] = np.where(ok, r2, np.nan)
    return out


def latent_scale(train: SufficientStats, decoder: torch.Tensor, feature_block: int) -> np.ndarray:
    """Latent Scaling (Minder et al. 2025) [F]: the least-squares scale β_f of A's decoder row d_f
    fitted to B's training activations x where the feature fires,
    ``β_f = argmin_β Σ_t ‖x_t − β·y_tf·d_f‖² = d_f·Σ_t y_tf x_t / (‖d_f‖² Σ_t y_tf²)``, from the
    statistics (``Σ y x = cyx + n μy μx``, ``Σ y² = syy + n μy²``); NaN where the feature never
    fires or its decoder row is zero. ``decoder [F, d]``."""
    out = np.full(train.n_feat, np.nan)
    for start in range(0, train.n_feat, feature_block):
        block = slice(start, min(start + feature_block, train.n_feat))
        mean_y = train.mean_y[block]
        cross = train.cyx[block] + train.n * mean_y[:, None] * train.mean_x[None, :]
        rows = decoder[block]
        numerator = (cross * rows).sum(1)
        denominator = rows.square().sum(1) * (train.syy[block] + train.n * mean_y.square())
        beta = torch.where(denominator > 0, numerator / denominator.clamp(min=1e-300), torch.nan)
        out[block] = beta.cpu().numpy()
    return out

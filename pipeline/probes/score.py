"""How a fit is scored: one pass over the held-out tokens with the solved probes of one or
several hooks: R² of the prediction clipped at 0, firing AUROC, and bootstrap replicates of R²
(raw and clipped) over held-out sequences (pipeline/maths/evaluate.py); with the affine map, the
same scores of A's SAE read through it. In a segmented run each chunk is asked of the fit's
``provider`` first (it may have been evicted after accumulation).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.inputs.chat import TOKEN_CLASSES
from pipeline.lazy import torch
from pipeline.maths.evaluate import PredictionScores, ProbeScores, bootstrap_weights
from pipeline.maths.lstsq import STATUS_OK
from pipeline.probes.encoder import SaeActivation
from pipeline.probes.inputs import FitInputs
from pipeline.probes.sae_map import SaeThroughMap
from pipeline.probes.solve import Solved
from pipeline.store.sparse import select_rows

_BOOT = {"r2_boot": "r2_held_out_boot", "r2_clipped_boot": "r2_clipped_held_out_boot"}
_NAMED = {"r2_clipped": "r2_clipped_held_out", "auroc": "auroc_held_out", **_BOOT}
_MAP_NAMED = {
    "r2": "map_r2_held_out",
    "auroc": "map_auroc_held_out",
    "r2_boot": "map_r2_held_out_boot",
}
_LINEAR_NAMED = {key: f"linear_{name}" for key, name in _NAMED.items()}
_SAE_NAMED = {"r2": "r2_held_out", "pearson": "pearson_held_out", **_NAMED}


def held_out_scores(
    fit: FitInputs,
    solved: dict[str, Solved],
    stats: dict,
    through: SaeThroughMap | None = None,
    activation: SaeActivation | None = None,
) -> dict[str, dict[str, np.ndarray]]:
    """Scores of the hooks in ``solved`` (hook -> (arrays, map solve)) from one pass over the
    held-out tokens, per hook, named as written. NaN where the probe's status is not ok. With
    the affine map (its solve, and ``through``: A's SAE), the same scores of
    ``sae.encode(x·Mᵀ + c)`` on the same tokens: ``map_*``. Hooks without held-out tokens are
    left out. With ``activation`` (σ_A), the single-layer model ``σ_A(x·Wᵀ + c)`` is scored
    under the headline names (and per token class, ``r2_held_out_<class>``) and the linear
    probe as ``linear_*``."""
    cfg = fit.cfg
    tokens = fit.store.info(fit.tokens)
    ctx, chunk_seqs, n_seq = tokens["ctx"], tokens["chunk_seqs"], tokens["n_seq"]
    held = fit.held_out_mask()
    hooks = [h for h in solved if stats[h]["held_out"].n > 0]
    if not hooks:
        return {}
    scorers: dict[str, Any] = {}
    map_scorers: dict[str, Any] = {}
    sae_scorers: dict[str, Any] = {}
    class_scorers: dict[tuple[str, str], Any] = {}
    linear = "linear_" if activation is not None else ""
    for hook in hooks:
        train = stats[hook]["train"]
        result, mapped = solved[hook]
        spread = torch.sqrt(train.syy.cpu() / train.n)
        if activation is not None:
            predict = activation.predictor(
                result["direction"], result["intercept"], fit.device, fit.dtype
            )
            for key, n_boot in [(hook, cfg.n_bootstrap), *(((hook, c), 0) for c in cfg.classes)]:
                scorer = PredictionScores(
                    predict,
                    train.n_feat,
                    train.d,
                    train.mean_y.cpu(),
                    spread,
                    fit.device,
                    fit.dtype,
                    n_boot=n_boot,
                )
                (sae_scorers if key == hook else class_scorers)[key] = scorer
        scorers[hook] = ProbeScores(
            torch.from_numpy(np.ascontiguousarray(result[f"{linear}direction"])),
            torch.from_numpy(result[f"{linear}intercept"]),
            train.mean_y.cpu(),
            spread,
            fit.device,
            fit.dtype,
            n_boot=cfg.n_bootstrap,
            feature_block=cfg.feature_block,
        )
        if mapped is not None and through is not None:
            map_scorers[hook] = PredictionScores(
                through.predictor(mapped["weight"], mapped["bias"], fit.device, fit.dtype),
                train.n_feat,
                train.d,
                train.mean_y.cpu(),
                spread,
                fit.device,
                fit.dtype,
                n_boot=cfg.n_bootstrap,
            )
    for index in range(tokens["n_chunks"]):
        first = index * chunk_seqs
        n_seqs = min(chunk_seqs, n_seq - first)
        if not bool(held[first : first + n_seqs].any()):
            continue
        if fit.provider is not None:
            fit.provider(index)
        mask = fit.counted(index)
        local_seq = torch.arange(len(mask)) // ctx
        keep = mask & held[first + local_seq]
        rows, cols, vals = select_rows(*fit.read(fit.feats, index), keep)
        docs = fit.documents()
        chunk_docs = None if docs is None else docs[first : first + n_seqs]
        weights = torch.from_numpy(
            bootstrap_weights(cfg.split_seed, index, n_seqs, cfg.n_bootstrap, chunk_docs)
        )
        groups = local_seq[keep]
        classes = fit.token_classes(index)[keep] if class_scorers else None
        for hook in hooks:
            x = fit.read(fit.acts[hook], index)[keep]
            for scores in (scorers, map_scorers, sae_scorers):
                if hook in scores:
                    scores[hook].update(x, rows, cols, vals, weights, groups=groups)
            for c in cfg.classes if classes is not None else ():
                in_class = classes == TOKEN_CLASSES.index(c)
                _update_class(class_scorers[(hook, c)], x, rows, cols, vals, in_class)
    written: dict[str, dict[str, np.ndarray]] = {}
    for hook in hooks:
        bad = solved[hook][0]["status"] != STATUS_OK
        named = _LINEAR_NAMED if linear else _NAMED
        written[hook] = _named(scorers[hook].result(), named, set(_BOOT), bad)
        if hook in sae_scorers:
            written[hook].update(_named(sae_scorers[hook].result(), _SAE_NAMED, set(_BOOT), bad))
            for name in ("r2_held_out", "pearson_held_out"):  # 0 where not ok, as the solve's
                written[hook][name] = np.where(bad, 0.0, written[hook][name])
            for c in cfg.classes:
                scored = class_scorers[(hook, c)].result()
                written[hook][f"r2_held_out_{c}"] = np.where(bad, 0.0, scored["r2"])
        if hook in map_scorers:  # encode is >= 0 (ReLU, TopK, JumpReLU): clipped R² is R²
            scored = map_scorers[hook].result()
            written[hook].update(_named(scored, _MAP_NAMED, {"r2_boot"}, bad))
    return written


def _update_class(
    scorer: Any,
    x: torch.Tensor,
    rows: torch.Tensor,
    cols: torch.Tensor,
    vals: torch.Tensor,
    in_class: torch.Tensor,
) -> None:
    """Add the rows of one token class to ``scorer`` (no bootstrap)."""
    if not bool(in_class.any()):
        return
    renumber = torch.cumsum(in_class.to(torch.int64), 0) - 1
    keep = in_class[rows]
    scorer.update(x[in_class], renumber[rows[keep]], cols[keep], vals[keep])


def _named(
    out: dict[str, np.ndarray], names: dict[str, str], boot: set[str], bad: np.ndarray
) -> dict[str, np.ndarray]:
    """A scorer's results under their stored names: bootstrap replicates float32, the rest
    float64, NaN where the probe's status is not ok."""
    written = {}
    for key, name in names.items():
        if key in out:
            value = out[key].astype(np.float32 if key in boot else np.float64)
            value[bad] = np.nan
            written[name] = value
    return written

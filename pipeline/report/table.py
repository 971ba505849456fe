"""The report's per-feature table: one row per feature of A's SAE.

Columns from the features' stats, the ceiling fit (and the cosine of each of its directions with the
SAE's encoder row, cached in ``report/<name>/encoder_cosine`` [F]), each fit of a model B (R² at
its best hook, presence score, class), the direct transfer and the SAE matches. Part of the report
stage (stages/report.py), not a stage.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.config import fingerprint
from pipeline.maths.lstsq import STATUS_NAMES, STATUS_OK
from pipeline.maths.presence import classify, feature_status, presence
from pipeline.report.matches import match_table
from pipeline.store import Store
from pipeline.store.layout import probes_unit, safe_name

if TYPE_CHECKING:
    from pipeline.report.model import Report, Role


def _probe(store: Store, fit: str, hook: str, key: str) -> np.ndarray:
    return store.array(f"{probes_unit(fit)}/{hook}/{key}")[:]


def cached_cosine(report: Report, ceiling: Role) -> tuple[np.ndarray | None, str]:
    """:func:`encoder_cosine`, kept in ``report/<name>/encoder_cosine`` until the ceiling fit
    or the features change (loading sae-lens alone takes seconds)."""
    store, path = report.store, f"{report.unit}/encoder_cosine"
    cinfo = store.info(probes_unit(ceiling.fit))
    finfo = store.info(report.feats)
    key = fingerprint(  # what the cosine was computed from, by content (lineage fingerprints)
        [cinfo.get("content_fingerprint") or cinfo["created"], finfo.get("content_fingerprint")]
    )
    if store.has(path) and store.array(path).attrs.get("xprobe", {}).get("cosine_key") == key:
        return store.array(path)[:], ""
    cosine, why = encoder_cosine(report, ceiling)
    if cosine is not None and report.writable and store.has(report.unit):
        prov = {**store.info(report.unit), "cosine_key": key}
        if store.has(path):
            store.delete(path)
        store.create_array(path, cosine.shape, cosine.shape, cosine.dtype, prov)[...] = cosine
    return cosine, why


def encoder_cosine(report: Report, ceiling: Role) -> tuple[np.ndarray | None, str]:
    """Cosine of each ceiling direction with the SAE's encoder row W_enc[:, f] ([F] or None)."""
    from pipeline.inputs.sae import load_sae_of

    try:
        sae = load_sae_of(report.store, report.feats)
    except Exception as e:  # a shared cache may not come with its SAE: report, don't fail
        return None, f"SAE not loadable ({type(e).__name__}: {e})"
    w_enc = sae.W_enc.detach()  # [d_in, F], converted a block at a time (F may be 10⁶)
    direction = report.store.array(f"{probes_unit(ceiling.fit)}/{ceiling.hooks[0]}/direction")
    out = np.full(w_enc.shape[1], np.nan)
    step = direction.chunks[0]
    for start in range(0, direction.shape[0], step):
        d = direction[start : start + step].astype(np.float64)
        e = w_enc[:, start : start + step].T.double().cpu().numpy()
        norm = np.linalg.norm(d, axis=1) * np.linalg.norm(e, axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            out[start : start + step] = np.where(norm > 0, (d * e).sum(1) / norm, np.nan)
    return out, ""


def token_classes_of(store: Store, fit: str) -> list[str]:
    """The token classes a fit scored (``classes`` in its config; chat corpora)."""
    return list(store.info(probes_unit(fit))["config"].get("classes") or [])


def class_columns(
    report: Report, role: Role, best: np.ndarray, own: np.ndarray, ceiling_status: np.ndarray
) -> dict[str, np.ndarray]:
    """Per token class scored by both this fit and the ceiling (``classes``): B's held-out R² on
    that class at its best hook (``<fit>_r2_<class>``), the ceiling's (``ceiling_r2_<class>``)
    and presence on that class, ``<fit>_presence_<class>`` = clip(R²_B / R²_ceiling, 0, 1) on
    the class's held-out tokens (no token baseline: the report's is not split by class), NaN
    where the ceiling's R² on the class is below ``min_headroom`` or either is undefined."""
    store, ceiling = report.store, report.roles[0]
    shared = [
        c for c in token_classes_of(store, role.fit) if c in token_classes_of(store, ceiling.fit)
    ]
    cols: dict[str, np.ndarray] = {}
    for c in shared:
        key = f"r2_held_out_{c}"
        r2_hooks = np.stack([_probe(store, role.fit, h, key) for h in role.hooks])
        r2 = np.take_along_axis(r2_hooks, best[None], 0)[0]
        ceiling_r2 = _probe(store, ceiling.fit, ceiling.hooks[0], key)
        zero = np.zeros(len(r2))
        status = feature_status(ceiling_status, ceiling_r2, zero, report.cfg.min_headroom)
        cols[f"ceiling_r2_{c}"] = ceiling_r2
        cols[f"{role.label}_r2_{c}"] = r2
        cols[f"{role.label}_presence_{c}"] = presence(r2, own, ceiling_r2, zero, status)[1]
    return cols


def feature_table(report: Report, scan: dict[str, np.ndarray]) -> tuple[Any, dict[str, Any]]:
    """The table (a pandas DataFrame, one row per feature) and notes for the page."""
    import pandas as pd

    cfg, store = report.cfg, report.store
    stats = f"{report.feats}/stats"
    n_feat = len(scan["token_r2"])
    ceiling = report.roles[0]
    ceiling_r2 = _probe(store, ceiling.fit, ceiling.hooks[0], "r2_held_out")
    ceiling_status = _probe(store, ceiling.fit, ceiling.hooks[0], "status")
    token_r2 = scan["token_r2"]
    status = feature_status(ceiling_status, ceiling_r2, token_r2, cfg.min_headroom)
    cols: dict[str, Any] = {
        "feature": np.arange(n_feat),
        "status": status,
        "frequency": store.array(f"{stats}/frequency")[:],
        "count": store.array(f"{stats}/count")[:],
        "max_activation": store.array(f"{stats}/max")[:],
        "token_r2": token_r2 if cfg.token_baseline else np.full(n_feat, np.nan),
        "ceiling_r2": ceiling_r2,
        "ceiling_fit_status": [STATUS_NAMES[int(s)] for s in ceiling_status],
    }
    notes: dict[str, Any] = {}
    if cfg.encoder_cosine:
        cosine, why = cached_cosine(report, ceiling)
        if cosine is not None:
            cols["encoder_cosine"] = np.where(ceiling_status == STATUS_OK, cosine, np.nan)
        else:
            notes["encoder_cosine"] = why
    transfer = store.info(report.feats).get("transfer") or {}
    for role in report.roles[1:]:
        r2_hooks = np.stack([_probe(store, role.fit, h, "r2_held_out") for h in role.hooks])
        fit_status = np.stack([_probe(store, role.fit, h, "status") for h in role.hooks])
        best = store.array(f"{probes_unit(role.fit)}/best_hook")[:].astype(np.int64)
        r2 = np.take_along_axis(r2_hooks, best[None], 0)[0]
        own = np.take_along_axis(fit_status, best[None], 0)[0]
        raw, score = presence(
            r2, own, ceiling_r2, token_r2 if cfg.token_baseline else 0 * r2, status
        )
        p = role.label
        cols[f"{p}_r2"] = r2
        cols[f"{p}_best_hook"] = np.asarray(role.hooks, dtype=object)[best]
        cols[f"{p}_fit_status"] = [STATUS_NAMES[int(s)] for s in own]
        cols[f"{p}_presence"] = score
        cols[f"{p}_presence_raw"] = raw
        cols[f"{p}_class"] = classify(score, cfg.present_at, cfg.partial_at)
        if len(role.hooks) > 1:
            for hook, values in zip(role.hooks, r2_hooks, strict=True):
                cols[f"{p}_r2@{hook}"] = values
        cols.update(class_columns(report, role, best, own, ceiling_status))
        b_name = safe_name(role.model)
        if store.has(f"{report.feats}/transfer/{b_name}/corr"):
            cols[f"{p}_transfer_corr"] = store.array(f"{report.feats}/transfer/{b_name}/corr")[:]
            notes.setdefault("transfer", {})[p] = next(
                (v for k, v in transfer.items() if safe_name(k) == b_name), {}
            )
    for m in report.match_roles:
        matched = match_table(store, m.name)
        cols[f"{m.name}_best_match"] = matched["best_match"].to_numpy()
        cols[f"{m.name}_best_corr"] = matched["best_corr"].to_numpy()
        cols[f"{m.name}_mutual"] = matched["mutual"].to_numpy()
    df = pd.DataFrame(cols)
    for col in ["status", *(c for c in df.columns if c.endswith("_class"))]:
        df[col] = df[col].astype(str)
    return df, notes

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
from pipeline.errors import XprobeError
from pipeline.maths.lstsq import STATUS_NAMES, STATUS_OK
from pipeline.maths.presence import (
    SCORED,
    classify_interval,
    feature_status,
    percentile_interval,
    presence,
    presence_interval,
    token_control,
)
from pipeline.report.matches import match_table
from pipeline.store import Store
from pipeline.store.layout import probes_unit, safe_name

if TYPE_CHECKING:
    from pipeline.report.model import Report, Role


def _probe(store: Store, fit: str, hook: str, key: str) -> np.ndarray:
    path = f"{probes_unit(fit)}/{hook}/{key}"
    if not store.has(path):
        raise XprobeError(
            f"{path} is missing: fit {fit!r} was written by an older xprobe; rerun it "
            f"(xprobe fit --force)"
        )
    return store.array(path)[:]


def _at_best(store: Store, role: Role, key: str, best: np.ndarray) -> np.ndarray:
    """``probes/<fit>/<hook>/<key>`` [F] or [F, R] at each feature's ``best`` hook index [F]."""
    if len(role.hooks) == 1:
        return _probe(store, role.fit, role.hooks[0], key)
    stacked = np.stack([_probe(store, role.fit, h, key) for h in role.hooks])
    index = best.reshape((1, -1) + (1,) * (stacked.ndim - 2))
    return np.take_along_axis(stacked, index, 0)[0]


def cached_cosines(report: Report) -> tuple[dict[str, np.ndarray], str]:
    """:func:`direction_cosines`, kept in ``report/<name>/cosines [n_columns, F]`` until a fit or
    the features change (loading sae-lens alone takes seconds)."""
    store, path = report.store, f"{report.unit}/cosines"

    def identity(info: dict[str, Any]) -> str:  # by content (lineage), else by creation
        return info.get("content_fingerprint") or f"{info['config_fingerprint']}@{info['created']}"

    parts = [identity(store.info(report.feats))]
    for role in report.roles:
        parts += [role.label, identity(store.info(probes_unit(role.fit)))]
    key = fingerprint(parts)
    if store.has(path):
        attrs = store.array(path).attrs.get("xprobe", {})
        if attrs.get("cosine_key") == key:
            values = store.array(path)[:]
            return dict(zip(attrs["columns"], values, strict=True)), ""
    cosines, why = direction_cosines(report)
    if cosines and report.writable and store.has(report.unit):
        prov = {**store.info(report.unit), "cosine_key": key, "columns": list(cosines)}
        if store.has(path):
            store.delete(path)
        value = np.stack(list(cosines.values()))
        store.create_array(path, value.shape, value.shape, value.dtype, prov)[...] = value
    return cosines, why


def direction_cosines(report: Report) -> tuple[dict[str, np.ndarray], str]:
    """Cosine of each fit's probe direction (at its best hook) with the SAE's encoder row
    ``W_enc[:, f]`` and decoder row ``W_dec[f]``, for every fit whose width is the SAE's d_in
    (same basis assumed: A itself or a finetune of A): columns ``encoder_cosine`` and
    ``decoder_cosine`` for the ceiling, ``<label>_encoder_cosine`` and ``<label>_decoder_cosine``
    per B, [F] each (NaN where the direction is zero). Empty, with the reason, if the SAE cannot
    be loaded."""
    from pipeline.inputs.sae import load_sae_of

    try:
        sae = load_sae_of(report.store, report.feats)
    except Exception as e:  # a shared cache may not come with its SAE: report, don't fail
        return {}, f"SAE not loadable ({type(e).__name__}: {e})"
    w_enc, w_dec = sae.W_enc.detach(), sae.W_dec.detach()  # [d_in, F], [F, d_in]
    out: dict[str, np.ndarray] = {}
    for role in report.roles:
        unit = probes_unit(role.fit)
        if int(report.store.info(unit)["d_model"]) != w_enc.shape[0]:
            continue  # another basis: cosines with A's SAE mean nothing
        best = (
            np.zeros(w_enc.shape[1], np.int64)
            if role.label == "ceiling"
            else report.store.array(f"{unit}/best_hook")[:].astype(np.int64)
        )
        prefix = "" if role.label == "ceiling" else f"{role.label}_"
        enc, dec = np.full(len(best), np.nan), np.full(len(best), np.nan)
        for index, hook in enumerate(role.hooks):
            direction = report.store.array(f"{unit}/{hook}/direction")
            step = direction.chunks[0]
            for start in range(0, direction.shape[0], step):
                rows = slice(start, start + step)
                here = best[rows] == index
                if not here.any():
                    continue
                d = direction[rows].astype(np.float64)
                for target, w in ((enc, w_enc[:, rows].T), (dec, w_dec[rows])):
                    e = w.double().cpu().numpy()
                    norm = np.linalg.norm(d, axis=1) * np.linalg.norm(e, axis=1)
                    with np.errstate(invalid="ignore", divide="ignore"):
                        cos = np.where(norm > 0, (d * e).sum(1) / norm, np.nan)
                    target[rows] = np.where(here, cos, target[rows])
        out[f"{prefix}encoder_cosine"], out[f"{prefix}decoder_cosine"] = enc, dec
    return out, ""


SAME_BASIS_COSINE = 0.2
"""Median cosine of B's probe directions with the ceiling's (the same feature, the identity map
from A's basis to B's) at or above which B is taken to be in A's basis. In another basis (a
rotation, another model) the cosines are ~N(0, 1/d): their median is ~0; B = A plus noise gives
~0.9."""
_BASIS_MIN_R2 = 0.25  # features that count: both probes fit with held-out R² at least this
_BASIS_SAMPLE = 4096  # features read to decide (evenly spaced among those that count)


def _directions(store: Store, role: Role, rows: np.ndarray, best: np.ndarray) -> np.ndarray:
    """[len(rows), d] float64: the probe directions of ``rows`` (sorted) at their ``best`` hook."""
    out = None
    for index, hook in enumerate(role.hooks):
        here = best[rows] == index
        if not here.any():
            continue
        part = store.array(f"{probes_unit(role.fit)}/{hook}/direction").oindex[rows[here], :]
        if out is None:
            out = np.zeros((len(rows), part.shape[1]))
        out[here] = part
    return out if out is not None else np.zeros((len(rows), 0))


def basis_of(
    report: Report, role: Role, best: np.ndarray, r2: np.ndarray, own: np.ndarray
) -> tuple[bool, str]:
    """Whether model B (``role``) is in A's basis, and why: the weight-space baselines (Latent
    Scaling, cosines with A's encoder and decoder rows) read A's SAE in B's coordinates and mean
    nothing otherwise. ``same_basis`` in [report] decides when it names the fit (true: every fit;
    false: none); else B's width must be A's and the identity map from A's basis must carry the
    ceiling's probe directions onto B's: median cosine of the two, over features both fit with
    held-out R² ≥ 0.25, at least :data:`SAME_BASIS_COSINE`."""
    store, ceiling, chosen = report.store, report.roles[0], report.cfg.same_basis
    if chosen is True or (isinstance(chosen, tuple) and role.fit in chosen):
        return True, "same_basis in [report]"
    if chosen is False:
        return False, "same_basis = false in [report]"
    d_a = int(store.info(probes_unit(ceiling.fit))["d_model"])
    d_b = int(store.info(probes_unit(role.fit))["d_model"])
    if d_a != d_b:
        return False, f"B's width {d_b} is not A's {d_a}: B is not in A's basis"
    ceiling_r2 = _probe(store, ceiling.fit, ceiling.hooks[0], "r2_held_out")
    ceiling_ok = _probe(store, ceiling.fit, ceiling.hooks[0], "status") == STATUS_OK
    with np.errstate(invalid="ignore"):
        counted = ceiling_ok & (own == STATUS_OK) & (ceiling_r2 >= _BASIS_MIN_R2)
        counted &= r2 >= _BASIS_MIN_R2
    rows = np.flatnonzero(counted)
    if len(rows) < 10:
        return False, (
            f"only {len(rows)} features fit well in both A and B: cannot tell whether B is in "
            "A's basis (set same_basis in [report] if it is)"
        )
    rows = rows[np.linspace(0, len(rows) - 1, min(len(rows), _BASIS_SAMPLE)).astype(np.int64)]
    a = _directions(store, ceiling, rows, np.zeros(len(best), np.int64))
    b = _directions(store, role, rows, best)
    norm = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    cos = float(np.median((a * b).sum(1) / np.where(norm > 0, norm, 1.0)))
    how = f"median cosine {cos:.2f} over {len(rows)} features"
    if cos >= SAME_BASIS_COSINE:
        return True, f"B's probe directions match the ceiling's ({how}): B is in A's basis"
    return False, (
        f"B's probe directions do not match the ceiling's ({how}, below {SAME_BASIS_COSINE:g}): "
        "B is not in A's basis"
    )


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


def linear_columns(report: Report, role: Role, label: str, best: np.ndarray) -> dict[str, Any]:
    """The linear probe beside the single-layer model (a fit with ``predictor = "sae"``):
    ``<label>_linear_r2`` (held-out R² of its raw prediction) and ``<label>_linear_r2_clipped``
    (of the prediction clipped at 0, with ``_lo``/``_hi``), at the model's best hook."""
    store = report.store
    if not all(store.has(f"{probes_unit(role.fit)}/{h}/linear_r2_held_out") for h in role.hooks):
        return {}
    cols = {
        f"{label}_linear_r2": _at_best(store, role, "linear_r2_held_out", best),
        f"{label}_linear_r2_clipped": _at_best(store, role, "linear_r2_clipped_held_out", best),
    }
    if report.n_boot:
        boot = _at_best(store, role, "linear_r2_clipped_held_out_boot", best)
        low, high = percentile_interval(boot, report.cfg.confidence)
        cols[f"{label}_linear_r2_clipped_lo"], cols[f"{label}_linear_r2_clipped_hi"] = low, high
    return cols


def token_columns(report: Report, scan: dict[str, np.ndarray]) -> dict[str, Any]:
    """The token baseline (``token_r2``, ``token_r2_boot``) and its table columns: per feature
    the best of the per-id mean (``token_r2_id``) and each token-control fit at its best hook
    (``token_r2_<fit>``); ``token_source`` names the one that gave ``token_r2`` ("token id" or
    the fit)."""
    cfg, store = report.cfg, report.store
    if not cfg.token_baseline:
        return {"token_r2": scan["token_r2"], "token_r2_boot": scan["token_r2_boot"]}
    n_boot = report.n_boot
    candidates = [("token id", scan["token_r2"], scan["token_r2_boot"] if n_boot else None)]
    for role in report.token_roles:
        best = store.array(f"{probes_unit(role.fit)}/best_hook")[:].astype(np.int64)
        r2 = _at_best(store, role, "r2_held_out", best)
        status = _at_best(store, role, "status", best)
        r2 = np.where(status == STATUS_OK, r2, np.nan)
        boot = _at_best(store, role, "r2_held_out_boot", best) if n_boot else None
        candidates.append((role.fit, r2, boot))
    r2, boot, source = token_control(candidates)
    out: dict[str, Any] = {"token_r2": r2, "token_r2_boot": boot}
    if report.token_roles:
        out["token_source"] = source
        out["token_r2_id"] = scan["token_r2"]
        for name, value, _ in candidates[1:]:
            out[f"token_r2_{name}"] = value
    return out


def feature_table(report: Report, scan: dict[str, np.ndarray]) -> tuple[Any, dict[str, Any]]:
    """The table (a pandas DataFrame, one row per feature) and notes for the page."""
    import pandas as pd

    cfg, store = report.cfg, report.store
    stats = f"{report.feats}/stats"
    n_feat = len(scan["token_r2"])
    ceiling = report.roles[0]
    ceiling_r2 = _probe(store, ceiling.fit, ceiling.hooks[0], "r2_held_out")
    ceiling_status = _probe(store, ceiling.fit, ceiling.hooks[0], "status")
    token = token_columns(report, scan)
    token_r2, token_boot = token.pop("token_r2"), token.pop("token_r2_boot")
    status = feature_status(ceiling_status, ceiling_r2, token_r2, cfg.min_headroom)
    level = cfg.confidence
    ceiling_best = np.zeros(n_feat, np.int64)
    ceiling_boot = (
        _at_best(store, ceiling, "r2_held_out_boot", ceiling_best) if report.n_boot else None
    )
    token_boot = token_boot if cfg.token_baseline and report.n_boot else None
    cols: dict[str, Any] = {
        "feature": np.arange(n_feat),
        "status": status,
        "frequency": store.array(f"{stats}/frequency")[:],
        "count": store.array(f"{stats}/count")[:],
        "max_activation": store.array(f"{stats}/max")[:],
        "token_r2": token_r2 if cfg.token_baseline else np.full(n_feat, np.nan),
        **token,
        "ceiling_r2": ceiling_r2,
        "ceiling_fit_status": [STATUS_NAMES[int(s)] for s in ceiling_status],
        "ceiling_r2_clipped": _at_best(store, ceiling, "r2_clipped_held_out", ceiling_best),
        "ceiling_auroc": _at_best(store, ceiling, "auroc_held_out", ceiling_best),
    }
    cols.update(linear_columns(report, ceiling, "ceiling", ceiling_best))
    if store.has(f"{probes_unit(ceiling.fit)}/{ceiling.hooks[0]}/latent_scale"):
        cols["ceiling_latent_scale"] = _at_best(store, ceiling, "latent_scale", ceiling_best)
    if ceiling_boot is not None:
        cols["ceiling_r2_lo"], cols["ceiling_r2_hi"] = percentile_interval(ceiling_boot, level)
        clipped_boot = _at_best(store, ceiling, "r2_clipped_held_out_boot", ceiling_best)
        low, high = percentile_interval(clipped_boot, level)
        cols["ceiling_r2_clipped_lo"], cols["ceiling_r2_clipped_hi"] = low, high
    notes: dict[str, Any] = {}
    cosines: dict[str, np.ndarray] = {}
    if cfg.encoder_cosine:
        cosines, why = cached_cosines(report)
        if not cosines:
            notes["encoder_cosine"] = why
        for name in ("encoder_cosine", "decoder_cosine"):
            if name in cosines:
                cols[name] = np.where(ceiling_status == STATUS_OK, cosines[name], np.nan)
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
        cols[f"{p}_r2_clipped"] = _at_best(store, role, "r2_clipped_held_out", best)
        cols[f"{p}_auroc"] = _at_best(store, role, "auroc_held_out", best)
        low = high = np.full(n_feat, np.nan)
        if ceiling_boot is not None:
            r2_boot = _at_best(store, role, "r2_held_out_boot", best)
            cols[f"{p}_r2_lo"], cols[f"{p}_r2_hi"] = percentile_interval(r2_boot, level)
            clipped_boot = _at_best(store, role, "r2_clipped_held_out_boot", best)
            low, high = percentile_interval(clipped_boot, level)
            cols[f"{p}_r2_clipped_lo"], cols[f"{p}_r2_clipped_hi"] = low, high
            scored = (status == SCORED) & (own == STATUS_OK)
            low, high, informative, no_margin = presence_interval(
                r2_boot, ceiling_boot, token_boot, scored, level
            )
            cols[f"{p}_presence_lo"], cols[f"{p}_presence_hi"] = low, high
            # false where the interval says nothing (lo, hi NaN): class "no ceiling margin"
            # when the ceiling fails to beat the token baseline in too many resamples
            cols[f"{p}_presence_informative"] = informative | ~np.isfinite(score)
        else:
            informative = no_margin = None
        cols[f"{p}_presence"] = score
        cols[f"{p}_presence_raw"] = raw
        cols.update(linear_columns(report, role, p, best))
        cols[f"{p}_class"] = classify_interval(
            score, low, high, cfg.present_at, cfg.partial_at, informative, no_margin
        )
        same, why = basis_of(report, role, best, r2, own)
        cols[f"{p}_same_basis"] = np.full(n_feat, same)
        cols[f"{p}_basis_reason"] = np.full(n_feat, why, dtype=object)
        notes.setdefault("basis", {})[p] = (same, why)
        if all(store.has(f"{probes_unit(role.fit)}/{h}/latent_scale") for h in role.hooks):
            scale = _at_best(store, role, "latent_scale", best)
            cols[f"{p}_latent_scale"] = scale if same else np.full(n_feat, np.nan)
        if all(store.has(f"{probes_unit(role.fit)}/{h}/map_r2_held_out") for h in role.hooks):
            # the affine-map baseline (fit with affine_map): A's SAE read through a ridge map
            # from B's residual at the same (best) hook to A's, scored on the same test tokens
            cols[f"{p}_map_r2"] = _at_best(store, role, "map_r2_held_out", best)
            if ceiling_boot is not None:
                map_boot = _at_best(store, role, "map_r2_held_out_boot", best)
                cols[f"{p}_map_r2_lo"], cols[f"{p}_map_r2_hi"] = percentile_interval(
                    map_boot, level
                )
        for name in ("encoder_cosine", "decoder_cosine"):
            if f"{p}_{name}" in cosines:
                valid = (own == STATUS_OK) & same  # NaN out of A's basis (see _basis_reason)
                cols[f"{p}_{name}"] = np.where(valid, cosines[f"{p}_{name}"], np.nan)
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
    strings = ("_class", "_basis_reason")
    for col in ["status", *(c for c in df.columns if c.endswith(strings))]:
        df[col] = df[col].astype(str)
    return df, notes

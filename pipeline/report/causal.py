"""Causal agreement in the store: ``xprobe export --causal`` records its per-feature table in
``causal/<fit>/<hook>/*``, and the report shows it, one plot and one small table per fit.

The unit ``causal/<fit>`` is written by the export (not a stage of ``xprobe run``). Its lineage
names the fit's content fingerprint at the time; a fit recomputed to other bytes since makes the
recorded table stale (``xprobe status`` says so, and the report shows a note instead of the
numbers). The table itself comes from :func:`pipeline.export.causal.causal_agreement`; the models
and the SAE it used are the fit's inputs, so their changes reach it through the fit.
"""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.lineage import unit_input
from pipeline.store.io import provenance
from pipeline.store.layout import probes_unit, safe_name

COLUMNS = (
    "feature",
    "n_contexts",
    "alpha",
    "score",
    "cos_steer",
    "cos_null",
    "abs_cos_null",
    "z_steer",
    "dloss_probe",
    "dloss_write",
    "dloss_random",
)
"""The per-feature columns recorded (``group`` is recorded as the bool array ``top``)."""
MEASURES = COLUMNS[4:]
"""The columns measured per context (medians per feature): steering cosines and loss changes."""
GROUPS = (("top", "top by score"), ("other", "random others"))


def causal_unit(fit: str) -> str:
    return f"causal/{safe_name(fit)}"


def record_causal(store: Any, fit: str, hook: str, table: Any, settings: dict[str, Any]) -> str:
    """Write ``table`` (one row per feature: :data:`COLUMNS` and ``group``) as
    ``causal/<fit>/<hook>/*`` with the fit's content fingerprint as its lineage; the unit's other
    hooks are kept only if they were recorded against the same fit. Returns the unit."""
    unit = causal_unit(fit)
    fit_now = unit_input(store, probes_unit(fit))
    store.acquire_lock(unit, "export")
    try:
        if store.has_local(unit):
            recorded = (store.info(unit).get("lineage") or {}).get("fit") or {}
            if recorded.get("fingerprint") != fit_now.fingerprint:
                store.delete(unit)  # its other hooks were computed from another fit
        if not store.has_local(unit):
            prov = provenance("export", {"fit": fit}, lineage={"fit": fit_now.record()}, hooks={})
            store.create_unit(unit, prov)
        store.update_info(unit, complete=False)
        hooks = dict(store.info(unit).get("hooks") or {})
        hooks[hook] = json.loads(json.dumps(settings, default=str))
        if store.has_local(f"{unit}/{hook}"):
            store.delete(f"{unit}/{hook}")
        prov = store.info(unit)
        arrays = {c: table[c].to_numpy() for c in COLUMNS}
        arrays["top"] = (table["group"] == "top").to_numpy()
        for name, value in arrays.items():
            value = np.ascontiguousarray(value)
            path = f"{unit}/{hook}/{name}"
            chunks = (max(1, len(value)),)
            store.create_array(path, value.shape, chunks, value.dtype, prov)[...] = value
        store.mark_complete(unit, 1, hooks=hooks)
    finally:
        store.release_lock(unit)
    return unit


@dataclass
class Recorded:
    """One fit's recorded causal table at one hook; ``stale``: why it is not current, or None."""

    fit: str
    hook: str
    settings: dict[str, Any]
    table: Any  # pandas DataFrame: COLUMNS and group
    stale: str | None


def recorded_causal(store: Any, fit: str) -> list[Recorded]:
    """The causal tables recorded for ``fit``, one per hook (none: an empty list)."""
    import pandas as pd

    unit = causal_unit(fit)
    if not store.has(unit):
        return []
    info = store.info(unit)
    if not info.get("complete"):
        return []
    recorded = ((info.get("lineage") or {}).get("fit") or {}).get("fingerprint")
    now = unit_input(store, probes_unit(fit)).fingerprint
    stale = None
    if now is None:
        stale = f"the fit {fit!r} is no longer complete in the store"
    elif recorded != now:
        stale = f"the fit {fit!r} was recomputed since (content {recorded} then, {now} now)"
    out = []
    for hook, settings in sorted((info.get("hooks") or {}).items()):
        base = f"{unit}/{hook}"
        table = pd.DataFrame(
            {  # z_steer: NaN in tables recorded before it was measured
                c: store.array(f"{base}/{c}")[:] if store.has(f"{base}/{c}") else np.nan
                for c in COLUMNS
            }
        )
        top = store.array(f"{base}/top")[:]
        table.insert(1, "group", np.where(top, "top", "other"))
        out.append(Recorded(fit, hook, dict(settings), table, stale))
    return out


def group_medians(table: Any) -> list[tuple[str, int, Any]]:
    """(label, n, medians of the numeric columns) per group present, top first."""
    out = []
    for group, label in GROUPS:
        rows = table[table["group"] == group]
        if len(rows):
            out.append((label, len(rows), rows.median(numeric_only=True)))
    return out


def causal_section(report: Any) -> str:
    """The report's section on causal agreement: per fit of the report with a recorded table,
    its plot and its medians by group; a stale table only as a note. Empty if no fit has one."""
    from pipeline.report.plots import plot_causal

    parts = []
    for role in report.roles:
        for rec in recorded_causal(report.store, role.fit):
            name = html.escape(f"{role.fit} at {rec.hook}")
            if rec.stale is not None:
                parts.append(
                    f"<h3>{name}</h3><p class='caption'>The recorded causal agreement is stale "
                    f"and not shown: {html.escape(rec.stale)}. Rerun <code>xprobe export ... "
                    f"--fit {html.escape(role.fit)} --causal N</code> to record it again.</p>"
                )
                continue
            title = f"causal agreement: {role.fit} vs A ({rec.hook})"
            parts += [f"<h3>{name}</h3>", plot_causal(rec.table, title), _medians_table(rec)]
    if not parts:
        return ""
    return "\n".join(
        [
            "<h2>Causal agreement</h2>",
            '<p class="caption">Recorded by <code>xprobe export --causal N</code> (the unit '
            "causal/&lt;fit&gt; of the store): for the N features scored highest and N others drawn "
            "at random, on held-out contexts where the feature fires in A, the cosine over the "
            "vocabulary of the change in A's next-token log-probs when A's feature direction is "
            "added at the SAE's hook and the change in B's when B's write direction is added at "
            "B's hook (<i>cos steer</i>), against B steered along random directions of the same "
            "norm drawn within B's own activation covariance (<i>cos null</i>, and its magnitude "
            "<i>|null|</i>), and <i>z vs null</i>: (cos steer − cos null) in units of the null's "
            "spread (large: B's direction does what A's feature does; ~0: no better than pushing "
            "B anywhere it varies); and the change in B's loss "
            "when the probe, the write or a random direction is projected out of B's stream "
            "(<i>Δloss</i>). Per feature the median over its contexts; below, the median over "
            "features.</p>",
            *parts,
        ]
    )


def _medians_table(rec: Recorded) -> str:
    head = ("features", "n", "score", "cos steer", "cos null", "|null|", "z vs null")
    head += ("Δloss probe", "Δloss write", "Δloss random")
    rows = []
    for label, n, med in group_medians(rec.table):
        cells = [label, str(n), f"{med['score']:.2f}", f"{med['cos_steer']:.3f}"]
        cells += [f"{med['cos_null']:.3f}", f"{med['abs_cos_null']:.3f}", f"{med['z_steer']:.2f}"]
        cells += [f"{med[k]:.4f}" for k in ("dloss_probe", "dloss_write", "dloss_random")]
        rows.append("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    selection, contexts = rec.settings.get("selection") or {}, rec.settings.get("n_contexts")
    score = (
        f"presence in report {selection.get('report')!r}"
        if selection.get("by") == "presence"
        else "held-out R²"
    )
    caption = f"score: {score}; each feature's median over at most {contexts} contexts"
    return (
        '<table class="counts causal"><tr>'
        + "".join(f"<th>{html.escape(h)}</th>" for h in head)
        + "</tr>"
        + "".join(rows)
        + f'</table><p class="caption">{html.escape(caption)}</p>'
    )

"""Causal agreement in the store: ``xprobe export --causal`` records its per-feature table in
the unit ``causal/<fit>/<hook>`` (one per fit and hook), and the report shows it, one plot and
one small table per fit and hook.

The unit is written through the stage lifecycle by :mod:`pipeline.export.causal_unit` (the
export's causal stage, not a stage of ``xprobe run``): its config is the causal settings, its
lineage the fit's content fingerprint. A fit recomputed to other bytes since makes the recorded
table stale (``xprobe status`` says so, and the report shows a note instead of the numbers). The
table itself comes from :func:`pipeline.export.causal.causal_agreement`; the models and the SAE
it used are the fit's inputs, so their changes reach it through the fit. This module only reads.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline.lineage import staleness
from pipeline.store.layout import safe_name

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
TABLE_ORDER = ("feature", "group", "score", "n_contexts", "alpha", *MEASURES)
"""The columns of a causal table (``causal.csv``), in order."""


def causal_unit(fit: str, hook: str) -> str:
    """The unit holding the causal table of ``fit`` at B's ``hook``."""
    return f"causal/{safe_name(fit)}/{hook}"


def read_table(store: Any, unit: str) -> Any:
    """The causal table recorded in ``unit`` (pandas DataFrame, :data:`TABLE_ORDER`)."""
    import pandas as pd

    table = pd.DataFrame({c: store.array(f"{unit}/{c}")[:] for c in COLUMNS})
    top = store.array(f"{unit}/top")[:]
    table.insert(1, "group", np.where(top, "top", "other"))
    return table[list(TABLE_ORDER)]


@dataclass
class Recorded:
    """One fit's recorded causal table at one hook; ``stale``: why it is not current, or None."""

    fit: str
    hook: str
    settings: dict[str, Any]  # the unit's config: the causal settings (n, n_contexts, score, ...)
    table: Any  # pandas DataFrame: TABLE_ORDER
    stale: str | None


def recorded_causal(store: Any, fit: str) -> list[Recorded]:
    """The complete causal tables recorded for ``fit``, one per hook (none: an empty list). A
    unit that is not complete (a run killed while writing it) is not a table."""
    base = f"causal/{safe_name(fit)}"
    if not store.has(base):
        return []
    out = []
    for hook in sorted(name for name, _ in store.group(base).groups()):
        unit = causal_unit(fit, hook)
        info = store.group(unit).attrs.get("xprobe") or {}
        if not info.get("complete"):
            continue
        settings = dict(info.get("config") or {})
        out.append(Recorded(fit, hook, settings, read_table(store, unit), _stale(store, unit)))
    return out


def _stale(store: Any, unit: str) -> str | None:
    """Why the causal table in ``unit`` is not current (its fit changed), or None."""
    fit = ((store.info(unit).get("lineage") or {}).get("fit") or {}).get("ref", "")
    if not store.has(fit) or not (store.group(fit).attrs.get("xprobe") or {}).get("complete"):
        return f"the fit {fit} is no longer complete in the store"
    why = staleness(store, unit)
    if why is None:
        return None
    if why.via is not None:
        return f"the fit {fit} is itself stale ({why.via.reason()})"
    return f"the fit {fit} was recomputed since the table was measured"


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
            "causal/&lt;fit&gt;/&lt;hook&gt; of the store): for the N features scored highest and N others drawn "
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
    settings, contexts = rec.settings, rec.settings.get("n_contexts")
    score = (
        f"presence in report {settings.get('report')!r}"
        if settings.get("score") == "presence"
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

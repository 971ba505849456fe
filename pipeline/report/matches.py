"""Reading a match stage's results (``matches/<name>``) for tables and plots (e.g. the report).

table = match_table(store, "a-vs-b", presence=scores)  # one row per A feature
fig = best_corr_figure(table["best_corr"])              # histogram of best-match correlations
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.store import Store
from pipeline.store.layout import matches_unit


def match_table(store: Store, name: str, presence: Any = None) -> Any:
    """One row per A feature (a pandas DataFrame): ``feature``, ``best_match`` (B feature, -1: no
    positive match), ``best_corr``, ``n_coactive`` (tokens where both fire), ``mutual`` (the
    match's best A feature is this one), ``n_positive`` (positively correlated B features),
    ``count_a`` (tokens where the A feature fires), ``dead`` and, if ``presence`` [F_A] is given
    (e.g. the probe presence score), a ``presence`` column beside the match correlation."""
    import pandas as pd

    unit = matches_unit(name)
    read = lambda key: store.array(f"{unit}/{key}")[:]  # noqa: E731
    best = read("best_idx")
    table = pd.DataFrame(
        {
            "feature": np.arange(len(best), dtype=np.int64),
            "best_match": best,
            "best_corr": read("best_corr"),
            "n_coactive": read("top_n_coactive")[:, 0],
            "mutual": read("mutual"),
            "n_positive": read("n_positive"),
            "count_a": read("count_a"),
            "dead": read("count_a") == 0,
        }
    )
    if presence is not None:
        presence = np.asarray(presence)
        if presence.shape != (len(table),):
            raise ValueError(f"presence has shape {presence.shape}, expected ({len(table)},)")
        table.insert(3, "presence", presence)
    return table


def best_corr_figure(best_corr: Any, dead: Any = None, title: str | None = None) -> Any:
    """A matplotlib Figure: histogram of each live A feature's best-match correlation with B."""
    from matplotlib.figure import Figure  # no pyplot: no global backend or figure state

    values = np.asarray(best_corr, dtype=np.float64)
    if dead is not None:
        values = values[~np.asarray(dead, dtype=bool)]
    fig = Figure(figsize=(5, 3.2))
    ax = fig.subplots()
    ax.hist(values, bins=np.linspace(0, 1, 41), color="#4c72b0")
    if len(values):
        median = float(np.median(values))
        ax.axvline(median, color="k", linestyle="--", linewidth=1, label=f"median {median:.2f}")
        ax.legend(frameon=False)
    ax.set_xlabel("best-match Pearson correlation (A feature vs B's SAE)")
    ax.set_ylabel("A features")
    ax.set_title(title or f"{len(values)} live A features")
    fig.tight_layout()
    return fig


AGREEMENT = (
    "present & matched",
    "present & unmatched",
    "partial",
    "absent & matched",
    "absent & unmatched",
)
"""How the probes and the SAE matching agree on a scored feature, in display order."""
AGREEMENT_COLORS = dict(
    zip(AGREEMENT, ("#2a9d8f", "#e76f51", "#c9c9c9", "#8957e5", "#6b7785"), strict=True)
)


def agreement(probe_class: Any, best_corr: Any, match_at: float) -> np.ndarray:
    """[F] object: each feature's :data:`AGREEMENT` category from its probe class (``present``,
    ``partial``, ``absent``) and whether its best-match correlation is at least ``match_at``;
    ``unscored`` where the probe class is."""
    cls = np.asarray(probe_class, dtype=object)
    matched = np.asarray(best_corr, dtype=np.float64) >= match_at
    out = np.full(len(cls), "unscored", dtype=object)
    out[cls == "partial"] = "partial"
    for name in ("present", "absent"):
        out[(cls == name) & matched] = f"{name} & matched"
        out[(cls == name) & ~matched] = f"{name} & unmatched"
    return out


def presence_corr_figure(
    best_corr: Any,
    presence: Any,
    category: Any,
    thresholds: tuple[float, float, float],
    labels: tuple[str, str] = ("best-match correlation with B's SAE", "probe presence score"),
    title: str | None = None,
) -> Any:
    """A matplotlib Figure: one point per scored A feature, best-match correlation (x) against the
    probe presence score (y), coloured by :func:`agreement` category; ``thresholds`` are
    (match_at, partial_at, present_at), drawn as dotted lines."""
    from matplotlib.figure import Figure

    x = np.asarray(best_corr, dtype=np.float64)
    y = np.asarray(presence, dtype=np.float64)
    category = np.asarray(category, dtype=object)
    match_at, partial_at, present_at = thresholds
    fig = Figure(figsize=(5, 3.2))
    ax = fig.subplots()
    for name in AGREEMENT:
        sel = category == name
        if not sel.any():
            continue  # the counts table lists empty categories; the legend need not
        ax.scatter(
            x[sel],
            y[sel],
            s=14,
            color=AGREEMENT_COLORS[name],
            alpha=0.85,
            linewidths=0,
            label=f"{name} ({int(sel.sum())})",
        )
    grey = dict(color="#59636e", fontsize=7.5)
    ax.axvline(match_at, color="#59636e", linewidth=1, linestyle=":")
    ax.text(match_at, 0.02, f" matched ≥ {match_at:g}", transform=ax.get_xaxis_transform(), **grey)
    for level, name in ((partial_at, "partial"), (present_at, "present")):
        ax.axhline(level, color="#59636e", linewidth=1, linestyle=":")
        ax.text(0.0, level, f"{name} ≥ {level:g}", va="bottom", **grey)
    ax.set_xlim(-0.03, 1.03)
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel(labels[0])
    ax.set_ylabel(labels[1])
    if title:
        ax.set_title(title, fontsize=10)
    if len(x):
        ax.legend(frameon=False, fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)
    fig.tight_layout()
    return fig

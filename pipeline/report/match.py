"""SAE matches beside the probes: which fit of B a match stage result is compared with, the
agreement counts of the two methods and the report page's section on them.

A match (``matches/<name>/{best_idx,best_corr,mutual}`` [F], see stages/match.py) pairs each of A's
features with the feature of B's SAE whose activations correlate best with it. Part of the report
stage (stages/report.py, pipeline/report/html.py), not a stage.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.errors import XprobeError
from pipeline.report.cards import Contexts, feature_card
from pipeline.report.matches import AGREEMENT, agreement, best_corr_figure, presence_corr_figure
from pipeline.report.plots import png
from pipeline.store.layout import feats_unit, matches_unit, safe_name

if TYPE_CHECKING:
    from pipeline.report.model import Report, Role


@dataclass
class MatchRole:
    """One match stage result (A's SAE against B's SAE) and the fit of that B it is compared with."""

    name: str  # column prefix and matches/<name>
    unit: str
    role: Role  # the B fit it is paired with
    features_b: str  # feats/<corpus>/<sae> of B's SAE
    model_b: str | None  # the model B's SAE was run on (None: its features unit is not here)
    paired: str  # how the fit was chosen, for the reader
    info: dict[str, Any]  # the match unit's provenance (config, summary)


def pair_match(report: Report, spec: str, n_feat: int) -> MatchRole:
    """Check one entry of ``matches`` ("NAME" or "NAME:FIT") and pair it with a B fit."""
    store = report.store
    name, _, fit = (part.strip() for part in spec.partition(":"))
    unit = matches_unit(name)
    if not store.has(unit) or not store.info(unit).get("complete"):
        raise XprobeError(
            f"{unit} is not in the store or not complete; run the match stage "
            f'([[match]] with name = "{name}") before the report'
        )
    info = store.info(unit)
    config = info["config"]
    feats_a = feats_unit(config["corpus"], config["features_a"])
    if feats_a != report.feats or int(info["n_feat_a"]) != n_feat:
        raise XprobeError(
            f"{unit} matches the SAE features {feats_a} against B's SAE, but this report is "
            f"about {report.feats}: a match's features_a must be the report's features. Run a "
            f'match with features_a = "{report.cfg.features}" (corpus "{report.cfg.corpus}")'
        )
    feats_b = feats_unit(config.get("corpus_b") or config["corpus"], config["features_b"])
    model_b = store.info(feats_b).get("model") if store.has(feats_b) else None
    for feats in (feats_a, feats_b):
        if store.has(feats) and store.info(feats).get("created", "") > info.get("created", ""):
            raise XprobeError(
                f"{feats} was rewritten after {unit} was computed; rerun the match with "
                "--force so that it matches the current features"
            )
    candidates = [r for r in report.roles[1:] if r.label != "floor"]
    if fit:
        role = next((r for r in candidates if r.fit == fit), None)
        if role is None:
            raise XprobeError(
                f"matches entry {spec!r} names the fit {fit!r}, which is not one of the "
                f"report's fits of a model B: {[r.fit for r in candidates]}"
            )
        paired = "as configured"
    else:
        same = [r for r in candidates if model_b and safe_name(r.model) == safe_name(model_b)]
        if len(same) != 1:
            which = f"model {model_b!r}" if model_b else f"an unknown model ({feats_b} is not here)"
            found = (
                f"the fits {[r.fit for r in same]} all probe it"
                if same
                else "no fit in fits probes it"
            )
            raise XprobeError(
                f"{unit}: B's SAE ({feats_b}) was run on {which} and {found}; say which fit it "
                f'belongs to as "{name}:FIT" in matches (one of {[r.fit for r in candidates]})'
            )
        role = same[0]
        paired = f"its SAE was run on {model_b}, the model of that fit"
    return MatchRole(name, unit, role, feats_b, model_b, paired, info)


def agreement_counts(df: Any, m: MatchRole, match_at: float) -> dict[str, int]:
    """Scored features of ``m``'s B per :data:`AGREEMENT` category."""
    category = agreement(df[f"{m.role.label}_class"], df[f"{m.name}_best_corr"], match_at)
    return {c: int((category == c).sum()) for c in AGREEMENT}


def agreement_line(df: Any, m: MatchRole, match_at: float) -> str:
    counts = agreement_counts(df, m, match_at)
    return (
        f"SAE match {m.name} vs {m.role.fit} (matched: best corr ≥ {match_at:g}), "
        f"{sum(counts.values())} scored features:\n  "
        + ", ".join(f"{c} {n}" for c, n in counts.items())
    )


def _counts_table(report: Any, df: Any, m: Any) -> str:
    """Scored features by probe class (rows) and matched or not (columns)."""
    t = report.cfg.match_at
    cls = df[f"{m.role.label}_class"].to_numpy()
    matched = df[f"{m.name}_best_corr"].to_numpy() >= t
    head = (
        f"<tr><th>probe class ({html.escape(m.role.fit)})</th><th>matched (corr ≥ {t:g})</th>"
        f"<th>unmatched (corr &lt; {t:g})</th><th>all</th></tr>"
    )
    rows = []
    for name in ("present", "partial", "absent"):
        sel = cls == name
        cells = [int((sel & matched).sum()), int((sel & ~matched).sum())]
        disagree = {"present": 1, "absent": 0}.get(name)  # the cell where the methods disagree
        tds = "".join(
            f'<td class="hl">{n}</td>' if i == disagree else f"<td>{n}</td>"
            for i, n in enumerate(cells)
        )
        rows.append(f"<tr><th>{name}</th>{tds}<td>{int(sel.sum())}</td></tr>")
    return f'<table class="counts">{head}{"".join(rows)}</table>'


def match_section(report: Any, df: Any, scan: dict[str, np.ndarray]) -> str:
    """Probes vs SAE matching: per match, the best-match correlations, the presence score
    against them, the agreement counts and the features where the two disagree."""
    if not report.match_roles:
        return ""
    cfg = report.cfg
    t = cfg.match_at
    out = [
        "<h2>Probes vs SAE matching</h2>",
        '<p class="caption">A second answer to the same question, when B has its own SAE: each '
        "feature of A's SAE is matched to the feature of B's SAE whose activations correlate best "
        "with it on the same tokens (the match stage). A feature is <b>matched</b> when that "
        f"correlation is ≥ {t:g} (<code>match_at</code>), and <b>present</b>/<b>absent</b> by the "
        f"probe's presence score (≥ {cfg.present_at:g} / &lt; {cfg.partial_at:g}). The probe asks "
        "whether B's residual stream linearly encodes the feature in any direction; the match asks "
        "whether B's SAE learned one latent that fires on the same tokens. Present but unmatched "
        "suggests B has it but its SAE splits, merges or misses it; matched but absent suggests "
        "B's latent fires on the same tokens without B's residual stream predicting A's "
        "activation values.</p>",
    ]
    contexts = Contexts(report) if cfg.n_shown else None
    for m in report.match_roles:
        label, name = m.role.label, html.escape(m.name)
        corr = df[f"{m.name}_best_corr"].to_numpy()
        dead = report.store.array(f"{m.unit}/count_a")[:] == 0
        category = agreement(df[f"{label}_class"], corr, t)
        scored = category != "unscored"
        hist = best_corr_figure(
            corr, dead=dead, title=f"{m.name}: {int((~dead).sum())} live A features"
        )
        hist.axes[0].axvline(t, color="#59636e", linewidth=1, linestyle=":")
        scatter = presence_corr_figure(
            corr[scored],
            df[f"{label}_presence"].to_numpy()[scored],
            category[scored],
            (t, cfg.partial_at, cfg.present_at),
            labels=("best-match correlation with B's SAE", f"{m.role.fit} presence score (probe)"),
            title=f"{int(scored.sum())} features scored for {m.role.fit}",
        )
        out += [
            f"<h3>{name}: B's SAE {html.escape(m.features_b.rsplit('/', 1)[-1])} against the probes of "
            f"{html.escape(m.role.fit)}</h3>",
            f'<div class="cols"><div>{png(hist)}</div><div>{png(scatter)}</div></div>',
            '<p class="caption">Left: each live A feature\'s best-match correlation (0: no B '
            "feature correlates positively); dotted: match_at. Right: one point per feature "
            f"scored for {html.escape(m.role.fit)}; dotted: match_at ({t:g}) and the probe's "
            "partial and present thresholds. Shaded cells in the table: where the two methods "
            "disagree.</p>",
            _counts_table(report, df, m),
        ]
        if contexts is None:
            continue
        gap = df[f"{label}_presence"].to_numpy() - corr
        kinds = [
            ("present by the probe, unmatched", category == "present & unmatched", -gap),
            ("matched, absent by the probe", category == "absent & matched", gap),
        ]
        picked = []
        for title, sel, order in kinds:
            idx = np.nonzero(sel)[0]
            idx = idx[np.argsort(order[idx], kind="stable")][: cfg.n_shown]
            picked.append((title, int(sel.sum()), df.iloc[idx]))
        contexts.prepare([int(f) for _, _, rows in picked for f in rows["feature"]], scan)
        for title, total, rows in picked:
            if rows.empty:
                out.append(f"<p><b>{name}: {title}</b>: none.</p>")
                continue
            shown = (
                f"the {len(rows)} largest disagreements of {total}"
                if total > len(rows)
                else f"all {total}"
            )
            out.append(f"<h3>{name}: {title} ({shown})</h3>")
            out.extend(feature_card(report, r, m.role, scan, contexts) for _, r in rows.iterrows())
    return "\n".join(out)

"""The report stage's HTML page: one self-contained file, plots embedded as base64 PNG.

Only stages/report.py uses this module (it is the second half of that stage, not a stage). The
figures are in pipeline/report/plots.py, the feature cards with their contexts in
pipeline/report/cards.py and the section on SAE matches in pipeline/report/match.py.
"""

from __future__ import annotations

import html
from typing import Any

import numpy as np

from pipeline.maths.presence import STATUS_ORDER
from pipeline.report.browser import CSS as BROWSER_CSS
from pipeline.report.browser import feature_browser
from pipeline.report.cards import Contexts, feature_card
from pipeline.report.causal import causal_section
from pipeline.report.match import match_section
from pipeline.report.plots import (
    plot_baselines,
    plot_cosine,
    plot_layers,
    plot_presence,
    plot_scatter,
)
from pipeline.store.layout import acts_unit

CSS = """
body { font: 15px/1.45 system-ui, -apple-system, Segoe UI, sans-serif; color: #1f2328;
       max-width: 1180px; margin: 24px auto; padding: 0 20px; }
h1 { font-size: 24px; margin-bottom: 4px; } h2 { margin-top: 34px; border-bottom: 1px solid #d0d7de; }
h3 { margin: 22px 0 6px; } .sub { color: #59636e; margin-top: 0; }
table.facts td { padding: 2px 14px 2px 0; vertical-align: top; } table.facts td:first-child { color: #59636e; }
pre.summary { background: #f6f8fa; padding: 12px; border-radius: 6px; overflow-x: auto; font-size: 13px; }
img.plot { max-width: 100%; display: block; margin: 8px 0 2px; }
.caption { color: #59636e; font-size: 13px; margin-bottom: 18px; }
.feature { border: 1px solid #d0d7de; border-radius: 6px; padding: 8px 12px; margin: 10px 0; }
.feature .head { font-weight: 600; } .feature .scores { font-size: 13px; color: #424a53; margin: 2px 0 6px; }
.ctx { font: 12.5px/1.7 ui-monospace, SFMono-Regular, Menlo, monospace; white-space: pre;
       overflow-x: hidden; text-overflow: ellipsis; border-top: 1px dashed #eaeef2; padding: 1px 0; }
.ctx .act { color: #59636e; display: inline-block; width: 64px; text-align: right; margin-right: 10px; }
.ctx .tok { border-radius: 2px; } .ctx .peak { outline: 2px solid #bc4c00; font-weight: 700; }
.ctx .masked { color: #9aa4ad; } .ctx .ws { color: #9aa4ad; }
.badge { display: inline-block; padding: 0 7px; border-radius: 10px; color: #fff; font-size: 12px; }
.cols { display: grid; grid-template-columns: 1fr 1fr; gap: 0 24px; }
dl.defs dt { font-weight: 600; } dl.defs dd { margin: 0 0 6px 18px; color: #424a53; }
table.counts { border-collapse: collapse; margin: 6px 0 14px; font-size: 14px; }
table.counts th, table.counts td { border: 1px solid #d0d7de; padding: 3px 12px; text-align: right; }
table.counts th { background: #f6f8fa; font-weight: 600; } table.counts td.hl { background: #fff1e5; }
.panels { display: flex; flex-wrap: wrap; gap: 4px 12px; } img.panel { width: 360px; max-width: 100%; }
.feature .head a { color: inherit; }
@media (max-width: 900px) {
  body { margin: 12px auto; padding: 0 10px; font-size: 14px; }
  pre.summary { font-size: 9px; padding: 6px; } .cols { grid-template-columns: 1fr; }
  table.facts td { display: block; padding: 0; } table.facts td:first-child { margin-top: 6px; }
}
"""


def _bound(df: Any, label: str, side: str) -> np.ndarray:
    """The presence interval's ``lo``/``hi`` bound per row (the point score where the fits have
    no bootstrap, or the bound is not finite)."""
    point = df[f"{label}_presence"].to_numpy(dtype=float)
    col = f"{label}_presence_{side}"
    if col not in df:
        return point
    bound = df[col].to_numpy(dtype=float)
    return np.where(np.isfinite(bound), bound, point)


def _ranked(df: Any, label: str, token_baseline: bool) -> Any:
    """Scored features from most to least present: by the lower end of the presence interval
    (a feature whose interval is [0, 1] is not among the "most present", whatever its point
    score), then by the clipped presence score, ties (many features sit at 1 or at 0) broken by
    headroom, R²_ceiling − max(R²_token, 0), largest first: the features with the most to find
    beyond the token, found (or not). The unclipped score is not the order: it exceeds 1 mostly
    where the headroom is tiny."""
    scored = df[np.isfinite(df[f"{label}_presence"].to_numpy())]
    token = np.maximum(scored["token_r2"].to_numpy(), 0) if token_baseline else 0.0
    headroom = scored["ceiling_r2"].to_numpy() - token
    order = np.lexsort(
        (
            scored["feature"].to_numpy(),
            -headroom,
            -scored[f"{label}_presence"].to_numpy(),
            -_bound(scored, label, "lo"),
        )
    )
    return scored.iloc[order]


def _feature_sections(report: Any, df: Any, scan: dict[str, np.ndarray], contexts: Contexts) -> str:
    n = report.cfg.n_shown
    if n == 0:
        return ""
    out = [
        "<h2>Features, with their top-activating contexts</h2>",
        '<p class="caption">Each line: the activation, then the context; the activating token is '
        "outlined and every token is shaded by this feature's activation on it (hover for the "
        "value). Grey tokens are not counted (BOS, padding); ↵ is a newline.</p>",
    ]
    shown = []
    for role in report.roles[1:]:
        if role.label == "floor":
            continue
        ranked = _ranked(df, role.label, report.cfg.token_baseline)
        top = ranked.head(n)
        rest = ranked[~ranked["feature"].isin(top["feature"])]
        bottom = _ranked_least(rest, role.label, report.cfg.token_baseline).head(n)
        shown.append((role, top, bottom, len(ranked)))
    contexts.prepare([int(f) for _, t, b, _ in shown for f in (*t["feature"], *b["feature"])], scan)
    for role, top, bottom, n_scored in shown:
        name = html.escape(role.fit)
        if n_scored == 0:
            out.append(f"<h3>{name}</h3><p>No feature is scored for {name}.</p>")
            continue
        for title, rows in (
            (
                f"the {len(top)} most present (highest scores of {n_scored} scored; ties: most "
                "headroom first)",
                top,
            ),
            (f"the {len(bottom)} least present (lowest scores; ties: most headroom first)", bottom),
        ):
            if rows.empty:
                continue
            out.append(f"<h3>{name}: {title}</h3>")
            out.extend(feature_card(report, r, role, scan, contexts) for _, r in rows.iterrows())
    return "\n".join(out)


def _ranked_least(df: Any, label: str, token_baseline: bool) -> Any:
    """Scored features from least to most present: by the upper end of the presence interval,
    then the score, ties broken by headroom, largest first."""
    token = np.maximum(df["token_r2"].to_numpy(), 0) if token_baseline else 0.0
    headroom = df["ceiling_r2"].to_numpy() - token
    return df.iloc[
        np.lexsort(
            (
                df["feature"].to_numpy(),
                -headroom,
                df[f"{label}_presence"].to_numpy(),
                _bound(df, label, "hi"),
            )
        )
    ]


def _store_name(store: Any) -> str:
    """The store as the page names it: a local folder by its name only (the file is shared; an
    absolute path of the author's machine means nothing elsewhere), a URL as it is."""
    local = getattr(store, "local_path", None)
    return local.name if local is not None else str(store.url)


def _tokenizer_rows(store: Any, corpus: str, role: Any) -> list[tuple[str, str]]:
    """How the tokenizer of a role's model differs from the corpus tokenizer (ids the corpus
    uses mean the same in both, or the activations stage would have refused it)."""
    unit = acts_unit(corpus, role.model, role.hooks[0])
    differences = store.info(unit).get("tokenizer_differences") if store.has(unit) else None
    return [(f"{role.model}'s tokenizer", "; ".join(differences))] if differences else []


def _norm_rows(store: Any, corpus: str, model: str, hook: str) -> list[tuple[str, str]]:
    """The per-token residual norms the activations stage recorded for ``model`` at ``hook``."""
    from pipeline.maths.norms import describe

    unit = acts_unit(corpus, model, hook)
    norms = store.info(unit).get("norms") if store.has(unit) else None
    return [(f"{model}'s residual norms at {hook}", describe(norms))] if norms else []


def _exclusion_rows(report: Any, feats: dict[str, Any]) -> list[tuple[str, str]]:
    """Positions left out for their residual norm (``exclude_norm_above``), by the features stage
    (A's norm) and by each fit (B's norm), counted."""
    rows = []
    if feats.get("exclude_norm_above") is not None:
        rows.append(
            (
                "high-norm positions (A)",
                f"{feats.get('n_excluded', 0):,} counted positions whose residual norm exceeds "
                f"{feats['exclude_norm_above']:g} × the median ({feats.get('norm_threshold', 0):.4g}) "
                "have no features and are skipped by fits and this report",
            )
        )
    for role in report.roles:
        unit = f"probes/{role.fit}"
        info = report.store.info(unit) if report.store.has(unit) else {}
        if info.get("exclude_norm_above") is not None or info.get("n_excluded"):
            factor = info.get("exclude_norm_above")
            why = f" (B's norm above {factor:g} × its median, or A's)" if factor else ""
            rows.append(
                (
                    f"high-norm positions (fit {role.fit!r})",
                    f"{info.get('n_excluded', 0):,} counted positions skipped{why}",
                )
            )
    return rows


def _facts(report: Any, df: Any, notes: dict[str, Any]) -> str:
    store = report.store
    tokens = store.info(report.tokens)
    feats = store.info(report.feats)
    rows = [
        ("store", _store_name(store)),
        (
            "corpus",
            f"{report.cfg.corpus}: {tokens.get('n_counted', tokens['n_tok']):,} counted tokens, "
            f"{tokens['n_seq']:,} sequences of {tokens['ctx']}",
        ),
        (
            "held-out split",
            f"{report.split[0]:g} of {report.split_unit()} (seed {report.split[1]}), the fits' "
            "split",
        ),
        (
            "SAE",
            f"{report.cfg.features} on {feats['model']} at {feats['hook']}: {feats['n_feat']:,} features "
            f"({feats.get('sae_architecture', '?')}); {feats.get('n_dead', '?')} never "
            f"{'fires' if feats.get('n_dead') == 1 else 'fire'} on this corpus",
        ),
    ]
    rows += _norm_rows(store, report.cfg.corpus, feats["model"], feats["hook"])
    rows += _exclusion_rows(report, feats)
    for role in report.roles:
        what = {"ceiling": "ceiling (A → A)", "floor": "floor (random init)"}.get(role.label, "B")
        rows.append((what, f"fit {role.fit!r}: {role.model} at {', '.join(role.hooks)}"))
        rows += _tokenizer_rows(store, report.cfg.corpus, role)
        rows += _norm_rows(store, report.cfg.corpus, role.model, role.hooks[0])
    for label, (same, why) in (notes.get("basis") or {}).items():
        verdict = "yes" if same else "no: Latent Scaling and cosines with A's SAE left NaN"
        rows.append((f"{label} in A's basis", f"{verdict} ({why})"))
    for label, t in (notes.get("transfer") or {}).items():
        if t:
            rows.append(
                (
                    f"direct transfer to {label}",
                    f"mean cosine of A's and B's residuals {t.get('mean_cosine', np.nan):.3f}; the SAE's variance "
                    f"explained on A {t.get('explained_variance_a', np.nan):.3f}, on B {t.get('explained_variance_b', np.nan):.3f}; "
                    f"mean feature correlation {t.get('mean_corr', np.nan):.3f}",
                )
            )
    for m in report.match_roles:
        config, summary = m.info["config"], m.info.get("summary") or {}
        median = summary.get("median_best_corr")
        rows.append(
            (
                f"SAE match {m.name}",
                f"{config['features_a']} vs B's SAE {config['features_b']} "
                f"(on {m.model_b or '?'}, {m.info.get('n_feat_b', '?'):,} features), k = {config['k']}; "
                f"median best corr {median:.3f}, {summary.get('n_mutual', '?')} mutual; "
                f"compared with fit {m.role.fit!r} ({m.paired})"
                if median is not None
                else f"{config['features_a']} vs B's SAE {config['features_b']}; "
                f"compared with fit {m.role.fit!r} ({m.paired})",
            )
        )
    if "encoder_cosine" in notes:
        rows.append(("encoder cosine", html.escape(notes["encoder_cosine"])))
    rows = list(dict.fromkeys(rows))  # A's norms at the SAE's hook are also the ceiling's
    return (
        '<table class="facts">'
        + "".join(
            f"<tr><td>{html.escape(k)}</td><td>{html.escape(v) if k != 'encoder cosine' else v}</td></tr>"
            for k, v in rows
        )
        + "</table>"
    )


def render_html(
    report: Any, df: Any, scan: dict[str, np.ndarray], notes: dict[str, Any], summary: str
) -> str:
    cfg = report.cfg
    b_names = ", ".join(r.fit for r in report.roles[1:] if r.label != "floor")
    layers, which = plot_layers(report, df)
    token = "max(R²<sub>token</sub>, 0)" if cfg.token_baseline else "0"
    body = [
        f"<h1>Which features of {html.escape(cfg.features)} does {html.escape(b_names)} have?</h1>",
        f'<p class="sub">xprobe report <b>{html.escape(cfg.name)}</b>: held-out R² of a '
        "single-layer model per SAE feature (the feature's own activation applied to a linear "
        "read of each model's residual stream; linear probes for fits with predictor = "
        '"linear"), against controls.</p>',
        f'<pre class="summary">{html.escape(summary)}</pre>',
        "<details><summary>What was compared: store, corpus, SAE, models, norms</summary>",
        _facts(report, df, notes),
        "</details>",
        '<dl class="defs">'
        f"<dt>presence score</dt><dd>(R²<sub>B</sub> − {token}) / (R²<sub>ceiling</sub> − {token}), "
        "clipped to [0, 1]. R²<sub>B</sub> is B's held-out R² at its best layer; R²<sub>ceiling</sub> is "
        "A's own residual stream at the SAE's hook; R²<sub>token</sub> predicts the feature by its "
        "training mean given the current token id. 0: B explains no more than the token does; 1: as "
        "much as A itself.</dd>"
        "<dt>status (why a feature is not scored)</dt><dd>"
        + "; ".join(f"<b>{s}</b> {int((df['status'] == s).sum())}" for s in STATUS_ORDER)
        + ". <i>dead</i>: never fires on the fits' training tokens (this includes the features "
        "that never fire on the corpus at all, counted in the SAE line above)"
        + f". <i>no headroom</i>: R²<sub>ceiling</sub> − {token} &lt; {cfg.min_headroom:g}, so there is "
        "nothing beyond the token to measure. Unscored features have no presence score (empty, never 0).</dd>"
        "<dt>floor</dt><dd>a randomly initialised model with B's architecture: a feature it also "
        '"has" is not evidence of learned structure.</dd></dl>',
        "<h2>Presence score distribution</h2>",
        plot_presence(report, df),
        f'<p class="caption">Scored features only; dotted lines: partial ({cfg.partial_at:g}) and '
        f"present ({cfg.present_at:g}) thresholds.</p>",
        "<h2>Each model against the ceiling</h2>",
        plot_scatter(report, df),
        '<p class="caption">One point per feature the ceiling can fit, coloured by class; bars: '
        f"{cfg.confidence:.0%} bootstrap intervals over held-out sequences (when the fits have "
        "replicates); dotted: y = x. Points near the diagonal are features B has as well as A "
        "does.</p>",
        "<h2>By layer</h2>",
        layers,
        f'<p class="caption">Median held-out R² over {which}, per probed hook; bars: '
        f"{cfg.confidence:.0%} bootstrap interval of that median over held-out sequences (when "
        "the fits have replicates).</p>",
    ]
    if "encoder_cosine" in df:
        body += [
            "<h2>Calibration: ceiling directions vs the SAE encoder</h2>",
            plot_cosine(df),
            '<p class="caption">Cosine of each feature\'s A → A direction with its SAE '
            "encoder row: 1 up to round-off for the single-layer model, whose ceiling is A's "
            "encoder; the rest of this caption is about linear probes (predictor = "
            '"linear"). This is not a check that the SAE matches the stored activations (the '
            "features were encoded from those very activations; the ceiling's held-out R² is that "
            "check). Low cosines are expected, lowest for sparse features: the encoder reads the "
            "feature through a threshold (ReLU, TopK, JumpReLU) that zeroes its response wherever "
            "the feature is off, while a linear probe must also keep its prediction near 0 on all "
            "those tokens and so leans on other directions to cancel them. Near 1: the feature is "
            "close to linear in A's residual stream.</p>",
        ]
    baselines = plot_baselines(report, df)
    if baselines is not None:
        body += [
            "<h2>Standard baselines</h2>",
            baselines,
            '<p class="caption">Scored features of each model B in A\'s basis: presence (the '
            "probe's verdict) against Latent Scaling (least-squares scale of A's decoder row "
            "fitted to B's activations where the feature fires, relative to the ceiling's) and "
            "the cosine of B's probe with A's decoder row. A feature the probe finds where the "
            "decoder direction is gone sits top left. For fits with <code>affine_map</code>: "
            "the probe's held-out R² (prediction clipped at 0) against A's SAE applied to B's "
            "activations mapped into A's "
            "residual stream by one ridge map (model stitching); the probe is the best linear "
            "predictor on training tokens, so points below the dotted y = x (circled) are "
            "features the map predicts better on test: the SAE's threshold, or an overfitted "
            "probe."
            + "".join(
                f" {html.escape(p)}: no weight-space baselines ({html.escape(why)})."
                for p, (same, why) in notes.get("basis", {}).items()
                if not same
            )
            + "</p>",
        ]
    body.append(causal_section(report))
    contexts = Contexts(report)
    body.append(match_section(report, df, scan))
    body.append(_feature_sections(report, df, scan, contexts))
    body.append(feature_browser(report, df, contexts, scan))
    body.append(
        '<p class="caption" style="margin-top:30px">The full per-feature table is '
        f"table.parquet (and table.csv) in report/{html.escape(cfg.name)}/ of the store (or the "
        "report's out_dir), one row per feature "
        "(columns: feature, status, frequency, count, max_activation, "
        "token_r2 (with token_source, token_r2_id and token_r2_&lt;token fit&gt;: the token control), ceiling_r2 (with _lo, _hi), ceiling_r2_clipped (with _lo, _hi), ceiling_auroc, "
        "encoder_cosine, decoder_cosine, and per model &lt;fit&gt;_r2 (with _lo, _hi), "
        "_r2_clipped (with _lo, _hi), _auroc, _best_hook, _presence, _presence_lo, "
        "_presence_hi, _presence_informative, _presence_raw, _class, _encoder_cosine, "
        "_decoder_cosine, "
        "_latent_scale, _map_r2 (with _lo, _hi; fits with affine_map), "
        "_linear_r2 and _linear_r2_clipped (with _lo, _hi: the linear probe beside the "
        "single-layer model), "
        "_r2@&lt;hook&gt;, _transfer_corr"
        + (
            ", and per SAE match &lt;match&gt;_best_match, _best_corr, _mutual"
            if report.match_roles
            else ""
        )
        + ").</p>"
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>xprobe report {html.escape(cfg.name)}</title>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<style>{CSS}{BROWSER_CSS}</style></head><body>" + "\n".join(body) + "</body></html>"
    )

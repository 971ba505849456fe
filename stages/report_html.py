"""The report stage's HTML page: one self-contained file, plots embedded as base64 PNG.

Only stages/report.py uses this module (it is the second half of that stage, not a stage).
"""

from __future__ import annotations

import base64
import html
import io
import re
from typing import Any

import numpy as np

from pipeline.matches import agreement, best_corr_figure, presence_corr_figure
from pipeline.presence import SCORED, STATUS_ORDER

COLORS = {"present": "#2a9d8f", "partial": "#e9a23b", "absent": "#d1495b", "unscored": "#b8b8b8"}
LINE_COLORS = ["#1f6feb", "#8957e5", "#bf8700", "#0a7d3b", "#cf222e", "#57606a"]

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
"""


def _png(fig: Any) -> str:
    import matplotlib.pyplot as plt

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return f'<img class="plot" src="data:image/png;base64,{base64.b64encode(buf.getvalue()).decode()}">'


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 10, "axes.spines.top": False, "axes.spines.right": False})
    return plt


def _hook_position(hook: str, order: int) -> tuple[float, str]:
    """x position of a hook on the residual stream (blocks applied) and a short label."""
    m = re.fullmatch(r"blocks\.(\d+)\.hook_resid_(pre|post|mid)", hook)
    if not m:
        return float(order), hook
    layer, kind = int(m.group(1)), m.group(2)
    return layer + {"pre": 0.0, "mid": 0.5, "post": 1.0}[kind], f"L{layer} {kind}"


def plot_presence(report: Any, df: Any) -> str:
    plt = _pyplot()
    cfg = report.cfg
    fig, ax = plt.subplots(figsize=(7.5, 3.2))
    bins = np.linspace(0, 1, 21)
    for i, role in enumerate(report.roles[1:]):
        score = df[f"{role.label}_presence"].to_numpy()
        score = score[np.isfinite(score)]
        style = "--" if role.label == "floor" else "-"
        ax.hist(
            score,
            bins,
            histtype="step",
            linewidth=2,
            linestyle=style,
            color=LINE_COLORS[i % len(LINE_COLORS)],
            label=f"{report._display(role)}  (n = {len(score)})",
        )
    for x, name in ((cfg.partial_at, "partial"), (cfg.present_at, "present")):
        ax.axvline(x, color="#59636e", linewidth=1, linestyle=":")
        ax.text(
            x,
            1.0,
            f" {name} ≥ {x:g}",
            transform=ax.get_xaxis_transform(),
            fontsize=8,
            color="#59636e",
            va="top",
        )
    ax.set_xlabel("presence score (0 = token baseline, 1 = ceiling)")
    ax.set_ylabel("features")
    ax.legend(frameon=False, fontsize=9)
    return _png(fig)


def plot_scatter(report: Any, df: Any) -> str:
    plt = _pyplot()
    roles = report.roles[1:]
    fig, axes = plt.subplots(1, len(roles), figsize=(3.6 * len(roles) + 0.6, 3.6), squeeze=False)
    fitted = df["ceiling_fit_status"] == "ok"
    x_all = df["ceiling_r2"].to_numpy()
    hi = max(0.05, float(np.nanmax(x_all[fitted])) if fitted.any() else 1.0)
    for ax, role in zip(axes[0], roles, strict=True):
        y_all = df[f"{role.label}_r2"].to_numpy()
        cls = df[f"{role.label}_class"].to_numpy()
        for name in ("unscored", "absent", "partial", "present"):
            sel = fitted.to_numpy() & (cls == name)
            ax.scatter(
                x_all[sel],
                y_all[sel],
                s=8 if name == "unscored" else 12,
                color=COLORS[name],
                alpha=0.8,
                linewidths=0,
                label=f"{name} ({int(sel.sum())})",
            )
        lo = min(0.0, float(np.nanmin(y_all[fitted])) if fitted.any() else 0.0)
        top = max(hi, float(np.nanmax(y_all[fitted])) if fitted.any() else hi)
        ax.plot([lo, top], [lo, top], color="#59636e", linewidth=1, linestyle=":")
        ax.set_xlabel("ceiling held-out R² (A → A)")
        ax.set_ylabel(f"{role.fit} held-out R² (best layer)")
        ax.set_title(report._display(role), fontsize=10)
        ax.legend(frameon=False, fontsize=8, markerscale=1.5, loc="upper left")
    fig.tight_layout()
    return _png(fig)


def plot_layers(report: Any, df: Any) -> tuple[str, str]:
    plt = _pyplot()
    scored = (df["status"] == SCORED).to_numpy()
    basis = scored if scored.any() else (df["ceiling_fit_status"] == "ok").to_numpy()
    which = (
        "the scored features"
        if scored.any()
        else "the features the ceiling can fit (none is scored)"
    )
    fig, ax = plt.subplots(figsize=(7.5, 3.4))
    ticks: dict[float, str] = {}
    for i, role in enumerate(report.roles):
        points = []
        for order, hook in enumerate(role.hooks):
            col = f"{role.label}_r2@{hook}" if len(role.hooks) > 1 else f"{role.label}_r2"
            x, label = _hook_position(hook, order)
            ticks[x] = label
            values = df[col].to_numpy()[basis] if col in df else np.array([])
            points.append((x, float(np.median(values)) if len(values) else np.nan))
        points.sort()
        xs, ys = zip(*points, strict=True) if points else ((), ())
        if role.label == "ceiling":
            ax.plot(xs, ys, "*", markersize=15, color="#111", zorder=5, label="ceiling (A → A)")
        else:
            ax.plot(
                xs,
                ys,
                "o--" if role.label == "floor" else "o-",
                color=LINE_COLORS[(i - 1) % len(LINE_COLORS)],
                label=report._display(role),
            )
    if report.cfg.token_baseline and basis.any():
        token = float(np.nanmedian(df["token_r2"].to_numpy()[basis]))
        ax.axhline(token, color="#59636e", linestyle=":", label="token baseline")
    ax.set_xticks(sorted(ticks), [ticks[x] for x in sorted(ticks)])
    ax.set_ylim(bottom=min(0.0, ax.get_ylim()[0]))
    if len(ticks) > 1:
        ax.set_xlim(min(ticks) - 0.3, max(ticks) + 0.3)
    ax.set_xlabel("hook (residual stream position)")
    ax.set_ylabel("median held-out R²")
    ax.legend(frameon=False, fontsize=9)
    return _png(fig), which


def plot_cosine(df: Any) -> str:
    plt = _pyplot()
    cos = df["encoder_cosine"].to_numpy()
    cos = cos[np.isfinite(cos)]
    fig, ax = plt.subplots(figsize=(7.5, 2.6))
    ax.hist(cos, np.linspace(-1, 1, 41), color="#57606a")
    ax.set_xlabel("cosine(ceiling probe direction, SAE encoder row W_enc[:, f])")
    ax.set_ylabel("features")
    return _png(fig)


# ---- contexts ---------------------------------------------------------------------------------
class _Contexts:
    """Decoded windows around stored token indices, with one feature's activation per token."""

    def __init__(self, report: Any):
        from tokenizers import Tokenizer

        store = report.store
        self.store, self.report = store, report
        info = store.info(report.tokens)
        self.ctx, self.rows = info["ctx"], info["chunk_seqs"] * info["ctx"]
        text = store.read_text(f"{report.tokens}/tokenizer.json")
        self.tok = Tokenizer.from_str(text) if text else None
        self._chunk: tuple[int, dict[str, np.ndarray]] | None = None
        self._pieces: dict[int, str] = {}
        self.rendered: dict[tuple[int, int], str] = {}

    def prepare(self, features: list[int], scan: dict[str, np.ndarray]) -> None:
        """Render every context of ``features`` in token order, so each chunk is read once."""
        todo = sorted(
            (int(t), f, float(v), float(scan["top_value"][f][0]))
            for f in set(features)
            for v, t in zip(scan["top_value"][f], scan["top_token"][f], strict=True)
            if t >= 0
        )
        for token, f, value, scale in todo:
            self.rendered[(f, token)] = self.render(f, token, value, scale)

    def chunk(self, index: int) -> dict[str, np.ndarray]:
        if self._chunk is None or self._chunk[0] != index:
            store, r = self.store, self.report
            data = {
                name: store.read_chunk(f"{unit}/{name}", index)
                for unit, names in ((r.tokens, ("ids", "mask")), (r.feats, ("idx", "val")))
                for name in names
            }
            data["ids"], data["mask"] = data["ids"].reshape(-1), data["mask"].reshape(-1)
            self._chunk = (index, data)
        return self._chunk[1]

    def piece(self, token_id: int) -> str:
        if token_id not in self._pieces:
            text = (
                self.tok.decode([token_id], skip_special_tokens=False)
                if self.tok
                else f"[{token_id}]"
            )
            self._pieces[token_id] = text
        return self._pieces[token_id]

    def render(self, feature: int, token: int, value: float, scale: float) -> str:
        cfg = self.report.cfg
        index, row = divmod(token, self.rows)
        data = self.chunk(index)
        pos = token % self.ctx
        start = row - min(pos, cfg.context_before)
        stop = row + min(self.ctx - 1 - pos, cfg.context_after) + 1
        spans = []
        for r in range(start, stop):
            hit = data["idx"][r] == feature
            act = float(data["val"][r][hit][0]) if hit.any() else 0.0
            spans.append(
                self._span(int(data["ids"][r]), bool(data["mask"][r]), act, scale, r == row)
            )
        return f'<div class="ctx"><span class="act">{value:.3g}</span>{"".join(spans)}</div>'

    def _span(self, token_id: int, counted: bool, act: float, scale: float, peak: bool) -> str:
        text = html.escape(self.piece(token_id))
        text = text.replace("\n", '<span class="ws">↵</span>').replace(
            "\t", '<span class="ws">→</span>'
        )
        classes = ["tok"] + (["peak"] if peak else []) + ([] if counted else ["masked"])
        alpha = max(0.0, min(1.0, act / scale)) if scale > 0 else 0.0
        style = f' style="background: rgba(255,140,0,{0.85 * alpha:.2f})"' if act > 0 else ""
        return f'<span class="{" ".join(classes)}" title="{act:.4g}"{style}>{text or "∅"}</span>'


def _fmt(value: Any) -> str:
    if isinstance(value, (float, np.floating)):
        return "—" if not np.isfinite(value) else f"{value:.3f}"
    return html.escape(str(value))


def _feature_card(
    report: Any, row: Any, role: Any, scan: dict[str, np.ndarray], contexts: _Contexts
) -> str:
    f = int(row["feature"])
    cls = row[f"{role.label}_class"]
    score, raw = row[f"{role.label}_presence"], row[f"{role.label}_presence_raw"]
    badge = f"{cls} {_fmt(score)}" + (f" (unclipped {raw:.2f})" if abs(raw - score) > 5e-4 else "")
    parts = [
        f"frequency {row['frequency']:.2e}",
        f"ceiling R² {_fmt(row['ceiling_r2'])}",
        f"token R² {_fmt(row['token_r2'])}",
    ]
    for other in report.roles[1:]:
        parts.append(
            f"{other.fit} R² {_fmt(row[f'{other.label}_r2'])} ({other.label if other.label == 'floor' else 'best: ' + str(row[f'{other.label}_best_hook'])})"
        )
    if f"{role.label}_transfer_corr" in row:
        parts.append(f"direct-transfer corr {_fmt(row[f'{role.label}_transfer_corr'])}")
    if "encoder_cosine" in row:
        parts.append(f"encoder cosine {_fmt(row['encoder_cosine'])}")
    for m in report.match_roles:
        if m.role.label == role.label:
            parts.append(_match_part(m, row))
    lines = [contexts.rendered[(f, int(t))] for t in scan["top_token"][f] if t >= 0]
    return (
        f'<div class="feature"><div class="head">feature {f} '
        f'<span class="badge" style="background:{COLORS[cls]}">{badge}</span></div>'
        f'<div class="scores">{" · ".join(parts)}</div>'
        + ("".join(lines) or '<div class="ctx">no activation in the corpus</div>')
        + "</div>"
    )


def _match_part(m: Any, row: Any) -> str:
    best = int(row[f"{m.name}_best_match"])
    if best < 0:
        return f"SAE match {html.escape(m.name)}: no positively correlated B feature"
    mutual = ", mutual" if row[f"{m.name}_mutual"] else ""
    return (
        f"SAE match {html.escape(m.name)}: B feature {best}, "
        f"corr {_fmt(row[f'{m.name}_best_corr'])}{mutual}"
    )


def _feature_sections(report: Any, df: Any, scan: dict[str, np.ndarray]) -> str:
    n = report.cfg.n_shown
    if n == 0:
        return ""
    contexts = _Contexts(report)
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
        raw = df[f"{role.label}_presence_raw"]
        scored = df[np.isfinite(raw.to_numpy())]
        order = scored.sort_values(f"{role.label}_presence_raw", kind="stable")
        top = order.iloc[::-1].head(n)
        bottom = order[~order["feature"].isin(top["feature"])].head(n)
        shown.append((role, top, bottom, len(scored)))
    contexts.prepare([int(f) for _, t, b, _ in shown for f in (*t["feature"], *b["feature"])], scan)
    for role, top, bottom, n_scored in shown:
        name = html.escape(role.fit)
        if n_scored == 0:
            out.append(f"<h3>{name}</h3><p>No feature is scored for {name}.</p>")
            continue
        for title, rows in (
            (f"the {len(top)} most present (highest scores of {n_scored} scored)", top),
            (f"the {len(bottom)} least present (lowest scores)", bottom),
        ):
            if rows.empty:
                continue
            out.append(f"<h3>{name}: {title}</h3>")
            out.extend(_feature_card(report, r, role, scan, contexts) for _, r in rows.iterrows())
    return "\n".join(out)


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


def _match_section(report: Any, df: Any, scan: dict[str, np.ndarray]) -> str:
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
    contexts = _Contexts(report) if cfg.n_shown else None
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
            f'<div class="cols"><div>{_png(hist)}</div><div>{_png(scatter)}</div></div>',
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
            out.extend(_feature_card(report, r, m.role, scan, contexts) for _, r in rows.iterrows())
    return "\n".join(out)


def _facts(report: Any, df: Any, notes: dict[str, Any]) -> str:
    store = report.store
    tokens = store.info(report.tokens)
    feats = store.info(report.feats)
    rows = [
        ("store", str(store.url)),
        (
            "corpus",
            f"{report.cfg.corpus}: {tokens.get('n_counted', tokens['n_tok']):,} counted tokens, "
            f"{tokens['n_seq']:,} sequences of {tokens['ctx']}",
        ),
        (
            "held-out split",
            f"{report.split[0]:g} of sequences (seed {report.split[1]}), the fits' split",
        ),
        (
            "SAE",
            f"{report.cfg.features} on {feats['model']} at {feats['hook']}: {feats['n_feat']:,} features "
            f"({feats.get('sae_architecture', '?')}), {feats.get('n_dead', '?')} dead",
        ),
    ]
    for role in report.roles:
        what = {"ceiling": "ceiling (A → A)", "floor": "floor (random init)"}.get(role.label, "B")
        rows.append((what, f"fit {role.fit!r}: {role.model} at {', '.join(role.hooks)}"))
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
        f'<p class="sub">xprobe report <b>{html.escape(cfg.name)}</b>: held-out R² of linear probes '
        "from each model's residual stream to each SAE feature, against controls.</p>",
        _facts(report, df, notes),
        "<h2>Summary</h2>",
        f'<pre class="summary">{html.escape(summary)}</pre>',
        '<dl class="defs">'
        f"<dt>presence score</dt><dd>(R²<sub>B</sub> − {token}) / (R²<sub>ceiling</sub> − {token}), "
        "clipped to [0, 1]. R²<sub>B</sub> is B's held-out R² at its best layer; R²<sub>ceiling</sub> is "
        "A's own residual stream at the SAE's hook; R²<sub>token</sub> predicts the feature by its "
        "training mean given the current token id. 0: B explains no more than the token does; 1: as "
        "much as A itself.</dd>"
        "<dt>status (why a feature is not scored)</dt><dd>"
        + "; ".join(f"<b>{s}</b> {int((df['status'] == s).sum())}" for s in STATUS_ORDER)
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
        '<p class="caption">One point per feature the ceiling can fit, coloured by class; dotted: '
        "y = x. Points near the diagonal are features B has as well as A does.</p>",
        "<h2>By layer</h2>",
        layers,
        f'<p class="caption">Median held-out R² over {which}, per probed hook.</p>',
    ]
    if "encoder_cosine" in df:
        body += [
            "<h2>Calibration: ceiling directions vs the SAE encoder</h2>",
            plot_cosine(df),
            '<p class="caption">The A → A probe should point along the encoder row of its feature; '
            "a cosine far below 1 means the probe uses correlated directions too (expected when "
            "features are correlated), a cosine near 0 flags a mismatch between the SAE and A's "
            "stored activations.</p>",
        ]
    body.append(_match_section(report, df, scan))
    body.append(_feature_sections(report, df, scan))
    body.append(
        '<p class="caption" style="margin-top:30px">Full per-feature table: '
        f"{html.escape(notes.get('table', 'table.parquet'))} (and .csv), one row per feature "
        "(columns: feature, status, frequency, count, max_activation, "
        "token_r2, ceiling_r2, encoder_cosine, and per model &lt;fit&gt;_r2, _best_hook, _presence, "
        "_presence_raw, _class, _r2@&lt;hook&gt;, _transfer_corr"
        + (
            ", and per SAE match &lt;match&gt;_best_match, _best_corr, _mutual"
            if report.match_roles
            else ""
        )
        + ").</p>"
    )
    return (
        "<!doctype html><html><head><meta charset='utf-8'>"
        f"<title>xprobe report {html.escape(cfg.name)}</title><style>{CSS}</style></head><body>"
        + "\n".join(body)
        + "</body></html>"
    )

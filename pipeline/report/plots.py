"""The report's figures (matplotlib, Agg), each returned as an ``<img>`` tag with an embedded PNG.

Part of the report stage (pipeline/report/html.py lays them out), not a stage.
"""

from __future__ import annotations

import base64
import io
import re
from typing import Any

import numpy as np

from pipeline.maths.presence import SCORED

COLORS = {
    "present": "#2a9d8f",
    "partial": "#e9a23b",
    "absent": "#d1495b",
    "undetermined": "#8e7cc3",
    "unscored": "#b8b8b8",
}
LINE_COLORS = ["#1f6feb", "#8957e5", "#bf8700", "#0a7d3b", "#cf222e", "#57606a"]


def png(fig: Any) -> str:
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
    return png(fig)


def plot_scatter(report: Any, df: Any) -> str:
    """One panel per model, each its own image in a row that wraps on a narrow page."""
    plt = _pyplot()
    roles = report.roles[1:]
    panels = []
    fitted = df["ceiling_fit_status"] == "ok"
    x_all = df["ceiling_r2"].to_numpy()
    hi = max(0.05, float(np.nanmax(x_all[fitted])) if fitted.any() else 1.0)
    for role in roles:
        fig, ax = plt.subplots(figsize=(4.0, 3.6))
        y_all = df[f"{role.label}_r2"].to_numpy()
        cls = df[f"{role.label}_class"].to_numpy()
        for name in ("unscored", "absent", "partial", "undetermined", "present"):
            sel = fitted.to_numpy() & (cls == name)
            if name != "unscored" and f"{role.label}_r2_lo" in df and "ceiling_r2_lo" in df:
                ax.errorbar(  # bootstrap intervals over held-out sequences
                    x_all[sel],
                    y_all[sel],
                    xerr=_spans(
                        x_all[sel],
                        df["ceiling_r2_lo"].to_numpy()[sel],
                        df["ceiling_r2_hi"].to_numpy()[sel],
                    ),
                    yerr=_spans(
                        y_all[sel],
                        df[f"{role.label}_r2_lo"].to_numpy()[sel],
                        df[f"{role.label}_r2_hi"].to_numpy()[sel],
                    ),
                    fmt="none",
                    ecolor=COLORS[name],
                    elinewidth=0.6,
                    alpha=0.35,
                )
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
        panels.append(png(fig).replace('class="plot"', 'class="panel"'))
    return f'<div class="panels">{"".join(panels)}</div>'


def _spans(value: np.ndarray, low: np.ndarray, high: np.ndarray) -> np.ndarray:
    """[2, n] error-bar lengths below and above ``value`` (0 where the interval is unknown)."""
    spans = np.stack([value - low, high - value])
    return np.clip(np.nan_to_num(spans, nan=0.0, posinf=0.0, neginf=0.0), 0, None)


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
    return png(fig), which


def plot_cosine(df: Any) -> str:
    plt = _pyplot()
    cos = df["encoder_cosine"].to_numpy()
    cos = cos[np.isfinite(cos)]
    fig, ax = plt.subplots(figsize=(7.5, 2.6))
    ax.hist(cos, np.linspace(-1, 1, 41), color="#57606a")
    ax.set_xlabel("cosine(ceiling probe direction, SAE encoder row W_enc[:, f])")
    ax.set_ylabel("features")
    return png(fig)


def plot_baselines(report: Any, df: Any) -> str | None:
    """Per model B in A's basis, its presence against the standard weight-space baselines: the
    Latent Scaling β relative to the ceiling's, and the decoder cosine, one point per scored
    feature coloured by class. None when no fit has them."""
    panels: dict[str, list[tuple[np.ndarray, str]]] = {}
    for role in report.roles[1:]:
        own = []
        if f"{role.label}_latent_scale" in df and "ceiling_latent_scale" in df:
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = df[f"{role.label}_latent_scale"] / df["ceiling_latent_scale"]
            own.append((ratio.to_numpy(), "latent scale β / ceiling's β"))
        if f"{role.label}_decoder_cosine" in df:
            own.append((df[f"{role.label}_decoder_cosine"].to_numpy(), "cosine(probe, W_dec[f])"))
        if own:
            panels[role.label] = own
    if not panels:
        return None
    roles = [r for r in report.roles[1:] if r.label in panels]
    n_rows = max(len(p) for p in panels.values())
    plt = _pyplot()
    fig, axes = plt.subplots(
        n_rows, len(roles), figsize=(3.6 * len(roles) + 0.6, 3.2 * n_rows), squeeze=False
    )
    scored = (df["status"] == SCORED).to_numpy()
    for column, role in enumerate(roles):
        cls = df[f"{role.label}_class"].to_numpy()
        presence = df[f"{role.label}_presence"].to_numpy()
        for row in range(n_rows):
            ax = axes[row][column]
            if row >= len(panels[role.label]):
                ax.axis("off")
                continue
            values, label = panels[role.label][row]
            for name in ("absent", "partial", "undetermined", "present"):
                sel = scored & (cls == name) & np.isfinite(values)
                ax.scatter(values[sel], presence[sel], s=10, color=COLORS[name], label=name)
            ax.set_xlabel(label)
            ax.set_ylabel("presence")
            ax.set_title(report._display(role), fontsize=10)
    axes[0][0].legend(frameon=False, fontsize=8, loc="best")
    fig.tight_layout()
    return png(fig)


def draw_causal(ax: Any, table: Any) -> None:
    """Each feature's steering cosine against its score, its random-direction null magnitude in
    grey beneath (the figure of ``xprobe export --causal`` and of the report)."""
    ax.scatter(table["score"], table["abs_cos_null"], s=14, c="#b8b8b8", label="|random null|")
    for group, color, label in (("top", "#2a9d8f", "top by score"), ("other", "#d1495b", "others")):
        rows = table[table["group"] == group]
        ax.scatter(rows["score"], rows["cos_steer"], s=18, c=color, label=f"{label}: steering")
    ax.axhline(0, color="#57606a", lw=0.6)
    ax.set_xlabel("score (presence, or held-out R²)")
    ax.set_ylabel("cosine with A's Δ log-probs")
    ax.legend(fontsize=8, frameon=False)


def plot_causal(table: Any, title: str) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.6))
    draw_causal(ax, table)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    return png(fig)

"""The report's figures (matplotlib, Agg), each returned as an ``<img>`` tag with an embedded PNG.

Part of the report stage (pipeline/report/html.py lays them out), not a stage.
"""

from __future__ import annotations

import base64
import io
import re
import warnings
from typing import Any

import numpy as np

from pipeline.maths.presence import NO_MARGIN, SCORED

COLORS = {
    "present": "#2a9d8f",
    "partial": "#e9a23b",
    "absent": "#d1495b",
    "undetermined": "#8e7cc3",
    "no ceiling margin": "#7a8a99",
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
            label=f"{report.display(role)}  (n = {len(score)})",
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
        for name in ("unscored", "absent", "partial", "undetermined", NO_MARGIN, "present"):
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
        ax.set_title(report.display(role), fontsize=10)
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
            median = float(np.median(values)) if len(values) else np.nan
            low, high = _median_interval(report, role.fit, hook, basis, values)
            points.append((x, median, low, high))
        points.sort()
        xs, ys, lows, highs = zip(*points, strict=True) if points else ((), (), (), ())
        color = "#111" if role.label == "ceiling" else LINE_COLORS[(i - 1) % len(LINE_COLORS)]
        if np.isfinite(lows).any():  # bootstrap interval of the median, per hook
            ax.errorbar(
                xs,
                ys,
                yerr=_spans(np.asarray(ys), np.asarray(lows), np.asarray(highs)),
                fmt="none",
                ecolor=color,
                elinewidth=1.2,
                capsize=3,
                alpha=0.6,
            )
        if role.label == "ceiling":
            ax.plot(xs, ys, "*", markersize=15, color=color, zorder=5, label="ceiling (A → A)")
        else:
            ax.plot(
                xs,
                ys,
                "o--" if role.label == "floor" else "o-",
                color=color,
                label=report.display(role),
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


def _median_interval(
    report: Any, fit: str, hook: str, basis: np.ndarray, values: np.ndarray
) -> tuple[float, float]:
    """``confidence`` percentile interval of the median held-out R² over the ``basis`` features
    at one hook of a fit, from its bootstrap replicates over held-out sequences (the median of
    each replicate); features whose probe is not ok keep their point value (``values``, 0) in
    every replicate, like in the median. (NaN, NaN) without replicates."""
    from pipeline.maths.presence import percentile_interval
    from pipeline.store.layout import probes_unit

    path = f"{probes_unit(fit)}/{hook}/r2_held_out_boot"
    if not report.n_boot or not basis.any() or not report.store.has(path):
        return np.nan, np.nan
    boot = report.store.array(path)[:][basis].astype(np.float64)  # [n, R]
    status = report.store.array(f"{probes_unit(fit)}/{hook}/status")[:][basis]
    boot[status != 0] = values[status != 0, None]
    with warnings.catch_warnings():  # a replicate where every feature is undefined
        warnings.simplefilter("ignore", RuntimeWarning)
        medians = np.nanmedian(boot, axis=0)
    low, high = percentile_interval(medians[None, :], report.cfg.confidence)
    return float(low[0]), float(high[0])


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
    """Per model B, its verdict against the standard baselines, one point per scored feature
    coloured by class: presence against the Latent Scaling β relative to the ceiling's and
    against the decoder cosine (B in A's basis); and B's probe's held-out R² (of its prediction
    clipped at 0, as the SAE's output is ≥ 0) against the affine-map baseline's (A's SAE read through a ridge map B → A; fits with ``affine_map``),
    with y = x dotted: points below it are features the map predicts better than the dedicated
    probe on test. None when no fit has any of them."""
    panels: dict[str, list[tuple[np.ndarray, str, np.ndarray, str]]] = {}
    for role in report.roles[1:]:
        p = role.label
        presence = df[f"{p}_presence"].to_numpy()
        own = []
        same = f"{p}_same_basis" not in df or bool(df[f"{p}_same_basis"].all())
        if same and f"{p}_latent_scale" in df and "ceiling_latent_scale" in df:
            with np.errstate(divide="ignore", invalid="ignore"):
                ratio = df[f"{p}_latent_scale"] / df["ceiling_latent_scale"]
            own.append((ratio.to_numpy(), "latent scale β / ceiling's β", presence, "presence"))
        if same and f"{p}_decoder_cosine" in df:
            own.append(
                (
                    df[f"{p}_decoder_cosine"].to_numpy(),
                    "cosine(probe, W_dec[f])",
                    presence,
                    "presence",
                )
            )
        if f"{p}_map_r2" in df:
            own.append(
                (
                    df[f"{p}_map_r2"].to_numpy(),
                    "held-out R² through the affine map",
                    df[f"{p}_r2_clipped"].to_numpy(),
                    "held-out R² of the probe, clipped at 0",
                )
            )
        if own:
            panels[p] = own
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
        for row in range(n_rows):
            ax = axes[row][column]
            if row >= len(panels[role.label]):
                ax.axis("off")
                continue
            values, label, ys, y_label = panels[role.label][row]
            finite = scored & np.isfinite(values) & np.isfinite(ys)
            for name in ("absent", "partial", "undetermined", NO_MARGIN, "present"):
                sel = finite & (cls == name)
                ax.scatter(values[sel], ys[sel], s=10, color=COLORS[name], label=name)
            title = report.display(role)
            if y_label != "presence" and finite.any():  # the map panel: y = x, and who wins
                low = min(0.0, float(values[finite].min()), float(ys[finite].min()))
                high = max(float(values[finite].max()), float(ys[finite].max()))
                ax.plot([low, high], [low, high], color="#59636e", linewidth=1, linestyle=":")
                beaten = finite & (values > ys)
                ax.scatter(
                    values[beaten],
                    ys[beaten],
                    s=40,
                    facecolors="none",
                    edgecolors="#111",
                    linewidths=0.8,
                    label="map > probe",
                )
                title += f"\nmap beats the probe on {int(beaten.sum())} of {int(finite.sum())}"
            ax.set_xlabel(label)
            ax.set_ylabel(y_label)
            ax.set_title(title, fontsize=10)
            if row and y_label != "presence":
                ax.legend(frameon=False, fontsize=8, loc="best")
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

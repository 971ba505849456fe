"""``xprobe export``: select a fit's features, write the SAE folder, measure it on B.

The folder gets ``metrics.json`` (the figures of :mod:`pipeline.export.measure` and the
selection) beside the SAE; with ``causal``, ``causal.csv`` and ``causal.png``, the table recorded
in the store's unit ``causal/<fit>/<hook>`` (:mod:`pipeline.export.causal_unit`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.export.causal import causal_figure
from pipeline.export.causal_unit import (
    CausalConfig,
    check_recordable,
    measure_table,
    record,
    writable,
)
from pipeline.export.measure import format_measurement, measure
from pipeline.export.sae import (
    FitSource,
    build_sae,
    check_export_target,
    check_selection,
    select_features,
    staged_export,
    write_export,
)
from pipeline.report.causal import GROUPS
from pipeline.store import Store

EXPORTED = "exported"
DIRECT = "direct"


def export_fit(
    store: Store,
    fit: str,
    out: Path,
    hook: str | None = None,
    report: str | None = None,
    present_at: float | None = None,
    min_r2: float | None = None,
    decoder: str = "lstsq",
    train_tokens: int = 100_000,
    eval_tokens: int | None = 20_000,
    causal: int = 0,
    causal_contexts: int = 8,
    device: str = "cpu",
    force: bool = False,
) -> dict[str, Any]:
    """Export ``fit`` to ``out`` and, unless ``eval_tokens`` is None, measure it (and A's SAE
    applied directly to B where it fits B's hook) on B's held-out tokens.

    Features kept (``pipeline.export.sae.select_features``): by default those the report
    ``report`` classes "present"; with ``present_at``, presence point score >= present_at; with
    ``min_r2``, held-out R² >= min_r2. With ``causal`` > 0, the causal agreement of the
    ``causal`` most present features and of as many others (a seeded random draw) goes to
    ``out/causal.csv`` and ``out/causal.png``, and, when ``store`` is writable, to the store's
    unit ``causal/<fit>/<hook>`` for the report, through the lifecycle: the table recorded with
    these settings from this fit is reused, other settings are refused before any work unless
    ``force`` (which also replaces an earlier export in ``out``). Returns a summary with
    ``lines`` to print."""
    out = Path(out)
    check_selection(present_at, min_r2)
    check_export_target(out, force)  # before any work
    source = FitSource.resolve(store, fit, hook)
    feature_ids, selection = select_features(source, report, present_at, min_r2)
    causal_cfg = None
    if causal > 0:
        causal_cfg = CausalConfig.of_selection(
            fit, source.hook, selection, causal, causal_contexts, device
        )
        restart = check_recordable(store, causal_cfg, force) if writable(store) else False
    sae = build_sae(source, feature_ids, decoder, train_tokens, device)
    with staged_export(out) as tmp:  # written there, moved into place once complete
        write_export(source, sae, feature_ids, selection, tmp, decoder)
        n_feat = int(store.info(source.feats)["n_feat"])
        kind = f"TopK (k={sae.cfg.k})" if hasattr(sae.cfg, "k") else "ReLU"
        lines = [
            f"export: {len(feature_ids)} of {n_feat} features of fit {fit!r} ({_said(selection)}), "
            f"{kind}, {decoder} decoder, on {source.hook} of {source.identity()['model_b']}",
            f"        {out} (sae-lens folder; steering vectors in steering.safetensors)",
        ]
        summary: dict[str, Any] = {
            "n_kept": len(feature_ids),
            "selection": selection,
            "out": str(out),
        }
        if eval_tokens is not None:
            decoded = "write dirs" if decoder == "write" else "lstsq decoder"
            saes, labels = {EXPORTED: sae}, {EXPORTED: f"exported (probes + {decoded})"}
            sae_a = source.sae_a(device)
            if sae_a.cfg.d_in == sae.cfg.d_in and sae_a.cfg.metadata.hook_name == source.hook:
                saes[DIRECT] = sae_a
                same = source.identity()["model_a"] == source.identity()["model_b"]
                labels[DIRECT] = (
                    "A's own SAE (B is A)" if same else "A's SAE on B (direct transfer)"
                )
            figures = measure(source, saes, max_tokens=eval_tokens, device=device)
            metrics = {**figures.to_dict(), "selection": selection}
            (tmp / "metrics.json").write_text(json.dumps(metrics, indent=1) + "\n")
            lines.append(format_measurement(figures, labels))
            summary["metrics"] = figures.to_dict()
        if causal_cfg is not None:
            if writable(store):
                recorded = record(store, causal_cfg, force=restart)
                table, unit = recorded["table"], recorded["unit"]
                done = "recorded"
                if recorded["already_complete"]:
                    done = "already recorded (these settings, this fit)"
                tail = [f"  {done} in the store as {unit} (the report shows it)"]
            else:
                table = measure_table(source, causal_cfg)
                tail = ["  (the store is open read-only: not recorded for the report)"]
            table.to_csv(tmp / "causal.csv", index=False)
            figure = causal_figure(table, f"causal agreement: {fit} vs A ({source.hook})")
            figure.savefig(tmp / "causal.png", dpi=100)
            lines += _causal_lines(table, causal_contexts) + tail
            summary["causal"] = table
        summary["lines"] = lines
    return summary


def _causal_lines(table: Any, n_contexts: int) -> list[str]:
    lines = [
        f"causal agreement (medians over features; each feature's median over <= {n_contexts} "
        "held-out contexts where it fires in A):",
        f"  {'features':<22} {'n':>3} {'score':>6} {'cos steer':>9} {'cos null':>9} {'|null|':>6} "
        f"{'dloss probe':>11} {'dloss write':>11} {'dloss rand':>10}",
    ]
    for group, label in GROUPS:
        rows = table[table["group"] == group]
        if len(rows):
            med = rows.median(numeric_only=True)
            lines.append(
                f"  {label:<22} {len(rows):>3} {med['score']:>6.2f} {med['cos_steer']:>9.3f} "
                f"{med['cos_null']:>9.3f} {med['abs_cos_null']:>6.3f} {med['dloss_probe']:>11.4f} "
                f"{med['dloss_write']:>11.4f} "
                f"{med['dloss_random']:>10.4f}"
            )
    return lines


def _said(selection: dict[str, Any]) -> str:
    if selection["by"] == "class":
        return f"class {selection['class']!r} in report {selection['report']!r}"
    if selection["by"] == "presence":
        return f"presence >= {selection['present_at']} in report {selection['report']!r}"
    return f"held-out R² >= {selection['min_r2']}"

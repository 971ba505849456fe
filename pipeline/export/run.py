"""``xprobe export``: select a fit's features, write the SAE folder, measure it on B.

The folder gets ``metrics.json`` (the figures of :mod:`pipeline.export.measure`) beside the SAE.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.export.causal import causal_agreement, causal_figure
from pipeline.export.measure import format_measurement, measure
from pipeline.export.sae import (
    FitSource,
    build_sae,
    check_export_target,
    presence_scores,
    select_features,
    staged_export,
    write_export,
)
from pipeline.maths.lstsq import STATUS_OK
from pipeline.report.causal import record_causal
from pipeline.store import Store

EXPORTED = "exported"
DIRECT = "direct"


def export_fit(
    store: Store,
    fit: str,
    out: Path,
    hook: str | None = None,
    report: str | None = None,
    present_at: float = 0.7,
    min_r2: float | None = None,
    decoder: str = "write",
    train_tokens: int = 100_000,
    eval_tokens: int | None = 20_000,
    causal: int = 0,
    causal_contexts: int = 8,
    device: str = "cpu",
    force: bool = False,
) -> dict[str, Any]:
    """Export ``fit`` to ``out`` and, unless ``eval_tokens`` is None, measure it (and A's SAE
    applied directly to B where it fits B's hook) on B's held-out tokens. With ``causal`` > 0,
    the causal agreement of the ``causal`` most present features and of as many others (a
    seeded random draw) goes to ``out/causal.csv`` and ``out/causal.png``, and, when
    ``store`` is writable, to the store's ``causal/<fit>/<hook>`` for the report. Returns a summary with ``lines`` to print."""
    out = Path(out)
    check_export_target(out, force)  # before any work
    source = FitSource.resolve(store, fit, hook)
    feature_ids, selection = select_features(source, report, present_at, min_r2)
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
            (tmp / "metrics.json").write_text(json.dumps(figures.to_dict(), indent=1) + "\n")
            lines.append(format_measurement(figures, labels))
            summary["metrics"] = figures.to_dict()
        if causal > 0:
            table = _causal(source, report, present_at, min_r2, causal, causal_contexts, device)
            table.to_csv(tmp / "causal.csv", index=False)
            figure = causal_figure(table, f"causal agreement: {fit} vs A ({source.hook})")
            figure.savefig(tmp / "causal.png", dpi=100)
            lines += _causal_lines(table, causal_contexts)
            if store.local_path is not None and store.mode != "r":
                settings = {"n": causal, "n_contexts": causal_contexts, "selection": selection}
                unit = record_causal(store, fit, source.hook, table, settings)
                lines.append(
                    f"  recorded in the store as {unit}/{source.hook} (the report shows it)"
                )
            else:
                lines.append("  (the store is open read-only: not recorded for the report)")
            summary["causal"] = table
        summary["lines"] = lines
    return summary


def _causal(
    source: FitSource,
    report: str | None,
    present_at: float,
    min_r2: float | None,
    n: int,
    n_contexts: int,
    device: str,
) -> Any:
    """Causal agreement of the n features scored highest (presence, or held-out R² with
    ``min_r2``) and of n others drawn at random among the scored ones below ``present_at``
    (presence) or outside the top n (R²); column ``group``."""

    ok = source.probe("status") == STATUS_OK
    if min_r2 is None:
        score, _ = presence_scores(source, report)
    else:
        score = np.where(ok, source.probe("r2_held_out"), np.nan)
    scored = np.flatnonzero(np.isfinite(score) & ok)
    top = scored[np.argsort(-score[scored], kind="stable")[:n]]
    rest = np.setdiff1d(scored, top)
    if min_r2 is None:
        rest = rest[score[rest] < present_at]
    others = np.random.default_rng(0).choice(rest, size=min(n, len(rest)), replace=False)
    features = np.sort(np.concatenate([top, others]))
    table = causal_agreement(source, features, n_contexts, device)
    table.insert(1, "group", np.where(np.isin(table["feature"], top), "top", "other"))
    table.insert(2, "score", score[table["feature"].to_numpy()])
    return table


def _causal_lines(table: Any, n_contexts: int) -> list[str]:
    lines = [
        f"causal agreement (medians over features; each feature's median over <= {n_contexts} "
        "held-out contexts where it fires in A):",
        f"  {'features':<22} {'n':>3} {'score':>6} {'cos steer':>9} {'cos null':>9} {'|null|':>6} "
        f"{'dloss probe':>11} {'dloss write':>11} {'dloss rand':>10}",
    ]
    for group, label in (("top", "top by score"), ("other", "random others")):
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
    if selection["by"] == "presence":
        return f"presence >= {selection['present_at']} in report {selection['report']!r}"
    return f"held-out R² >= {selection['min_r2']}"

"""``xprobe export``: select a fit's features, write the SAE folder, measure it on B.

The folder gets ``metrics.json`` (the figures of :mod:`pipeline.export.measure`) beside the SAE.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.export.measure import format_measurement, measure
from pipeline.export.sae import FitSource, build_sae, select_features, write_export
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
    device: str = "cpu",
    force: bool = False,
) -> dict[str, Any]:
    """Export ``fit`` to ``out`` and, unless ``eval_tokens`` is None, measure it (and A's SAE
    applied directly to B where it fits B's hook) on B's held-out tokens. Returns a summary
    with ``lines`` to print."""
    source = FitSource.resolve(store, fit, hook)
    feature_ids, selection = select_features(source, report, present_at, min_r2)
    sae = build_sae(source, feature_ids, decoder, train_tokens, device)
    write_export(source, sae, feature_ids, selection, out, decoder, force)
    n_feat = int(store.info(source.feats)["n_feat"])
    kind = f"TopK (k={sae.cfg.k})" if hasattr(sae.cfg, "k") else "ReLU"
    lines = [
        f"export: {len(feature_ids)} of {n_feat} features of fit {fit!r} ({_said(selection)}), "
        f"{kind}, {decoder} decoder, on {source.hook} of {source.identity()['model_b']}",
        f"        {out} (sae-lens folder; steering vectors in steering.safetensors)",
    ]
    summary: dict[str, Any] = {"n_kept": len(feature_ids), "selection": selection, "out": str(out)}
    if eval_tokens is not None:
        saes, labels = {EXPORTED: sae}, {EXPORTED: "exported (B's probes + write dirs)"}
        sae_a = source.sae_a(device)
        if sae_a.cfg.d_in == sae.cfg.d_in and sae_a.cfg.metadata.hook_name == source.hook:
            saes[DIRECT] = sae_a
            labels[DIRECT] = "A's SAE on B (direct transfer)"
        figures = measure(source, saes, max_tokens=eval_tokens, device=device)
        (Path(out) / "metrics.json").write_text(json.dumps(figures.to_dict(), indent=1) + "\n")
        lines.append(format_measurement(figures, labels))
        summary["metrics"] = figures.to_dict()
    summary["lines"] = lines
    return summary


def _said(selection: dict[str, Any]) -> str:
    if selection["by"] == "presence":
        return f"presence >= {selection['present_at']} in report {selection['report']!r}"
    return f"held-out R² >= {selection['min_r2']}"

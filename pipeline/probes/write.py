"""What a fit writes: each hook's arrays under ``probes/<name>/<hook>/`` (layout in the
module docstring of stages/fit.py and in pipeline/store/layout.py), the per-class held-out R²
of chat corpora, and ``probes/<name>/best_hook``.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.lazy import torch
from pipeline.maths.lstsq import r2_from_stats
from pipeline.store import Store


def write_array(store: Store, path: str, value: Any, prov: dict[str, Any]) -> None:
    """Write ``value`` (numpy or torch) at ``path``, replacing what is there; rows chunked by
    4096 (``direction`` as float32)."""
    value = value.cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
    if path.endswith("/direction"):
        value = value.astype(np.float32)
    if store.has(path):
        store.delete(path)
    chunks = (min(len(value), 4096),) + value.shape[1:] if value.ndim else ()
    store.create_array(path, value.shape, chunks or value.shape, value.dtype, prov)[...] = value


def write_hook(
    store: Store, unit: str, hook: str, result: dict[str, Any], scores: dict[str, dict]
) -> None:
    """Write one hook's arrays (``probes/<name>/<hook>/...``), its held-out scores included."""
    prov = store.info(unit)
    result.update(scores.get(hook, {}))
    for key, value in result.items():
        write_array(store, f"{unit}/{hook}/{key}", value, prov)


def write_best_hook(store: Store, unit: str, gcv_r2: list[np.ndarray]) -> None:
    """``best_hook [F]`` int32: per feature, the hook whose probe's GCV R² (training tokens
    only) is highest."""
    best = np.argmax(np.stack(gcv_r2), axis=0).astype(np.int32)
    path = f"{unit}/best_hook"
    if store.has(path):
        store.delete(path)
    store.create_array(path, best.shape, best.shape, best.dtype, store.info(unit))[...] = best


def hook_summary(
    store: Store,
    unit: str,
    hook: str,
    classes: tuple[str, ...],
    result: dict[str, Any],
    mapped: dict[str, Any] | None,
    stats: dict,
) -> dict[str, Any]:
    """Medians for the run's summary; with ``classes``, each class's held-out R² (written)."""
    r2 = _numpy(result["r2_held_out"])
    ok = _numpy(result["status"]) == 0
    out: dict[str, Any] = {
        "median_r2_held_out": float(np.median(r2[ok])) if ok.any() else None,
        "n_ok": int(ok.sum()),
    }
    if mapped is not None:
        out["map_r2_train_total"] = float(mapped["r2_train_total"])
        if "map_r2_held_out" in result and ok.any():
            out["median_map_r2_held_out"] = float(np.nanmedian(result["map_r2_held_out"][ok]))
    prov = store.info(unit)
    for c in classes:
        by_class = stats[f"held_out/{c}"]
        if f"r2_held_out_{c}" in result:  # scored in the held-out pass (written with the hook)
            r2_c = np.asarray(result[f"r2_held_out_{c}"])
        else:  # the linear probe's, from the class's statistics
            r2_c = r2_from_stats(by_class, result["direction"], result["intercept"])
            r2_c = np.where(ok, r2_c, 0.0)
            write_array(store, f"{unit}/{hook}/r2_held_out_{c}", r2_c, prov)
        defined = ok & np.isfinite(r2_c)
        out[f"n_tok_held_out_{c}"] = int(by_class.n)
        out[f"median_r2_held_out_{c}"] = float(np.median(r2_c[defined])) if defined.any() else None
    return out


def _numpy(value: Any) -> np.ndarray:
    return np.asarray(value.cpu() if isinstance(value, torch.Tensor) else value)

"""The answers, from Python: B's directions for a feature, its best hook, the report's table.

The notebook path (re-exported by ``pipeline``; ``store`` is a ``Store`` or a location)::

    import pipeline

    store = pipeline.open_store("work/store")        # read-only
    table = pipeline.load_table(store)               # one row per SAE feature (pandas)
    present = table[table["B_class"] == "present"]
    hook = pipeline.best_hook(store, "B", 17)        # "blocks.2.hook_resid_post"
    w = pipeline.direction(store, "B", 17)           # [d_B]: B's read direction, at that hook
    v = pipeline.write_direction(store, "B", 17)     # [d_B]: slope of B's residual on the feature

What they read (``docs/store.md``): ``probes/<fit>/best_hook [F]`` (an index into the fit's
``hooks``, chosen on training tokens), ``probes/<fit>/<hook>/direction [F, d_B]`` and
``.../write_direction [F, d_B]``, and the report's ``report/<name>/table.parquet``. Nothing here
writes; the store layout stays the store's business.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from pipeline.errors import XprobeError
from pipeline.store import Store
from pipeline.store.layout import probes_unit

if TYPE_CHECKING:
    import pandas as pd


def _open(store: Store | str | Path) -> Store:
    return store if isinstance(store, Store) else Store(store, mode="r")


def fit_hooks(store: Store | str | Path, fit: str) -> list[str]:
    """The hooks of B that fit ``fit`` probed, in its config's order."""
    store, unit = _open(store), probes_unit(fit)
    if not store.has(unit):
        have = sorted(
            u.removeprefix("probes/") for u, _ in store.units() if u.startswith("probes/")
        )
        raise XprobeError(f"{store.url} has no fit {fit!r} (fits: {have or 'none'}); run it first")
    info = store.info(unit)
    if not info.get("complete"):
        raise XprobeError(f"fit {fit!r} is not complete; run it again to finish it")
    return list(info["config"]["hooks"])


def _feature(store: Store, fit: str, feature: int) -> int:
    n_feat = int(store.info(probes_unit(fit))["n_feat"])
    if not 0 <= int(feature) < n_feat:
        raise XprobeError(f"feature {feature} is out of range: fit {fit!r} has {n_feat} features")
    return int(feature)


def best_hook(store: Store | str | Path, fit: str, feature: int) -> str:
    """The hook at which fit ``fit`` scores ``feature`` best (chosen on training tokens, as the
    report's ``<fit>_best_hook`` column)."""
    store = _open(store)
    hooks = fit_hooks(store, fit)
    index = int(store.array(f"{probes_unit(fit)}/best_hook")[_feature(store, fit, feature)])
    return hooks[index]


def _row(store: Store | str | Path, fit: str, feature: int, hook: str | None, what: str):
    store = _open(store)
    hooks = fit_hooks(store, fit)
    hook = best_hook(store, fit, feature) if hook is None else hook
    if hook not in hooks:
        raise XprobeError(f"fit {fit!r} did not probe {hook!r}; its hooks: {hooks}")
    path = f"{probes_unit(fit)}/{hook}/{what}"
    if not store.has(path):
        raise XprobeError(f"fit {fit!r} has no {what} (an older fit?); rerun it with --force")
    return np.asarray(store.array(path)[_feature(store, fit, feature)])


def direction(
    store: Store | str | Path, fit: str, feature: int, hook: str | None = None
) -> np.ndarray:
    """``[d_B]``: B's read direction for A's ``feature`` (its row of ``direction``: what the
    per-feature model applies to B's residual), at ``hook`` (default: the feature's best hook)."""
    return _row(store, fit, feature, hook, "direction")


def write_direction(
    store: Store | str | Path, fit: str, feature: int, hook: str | None = None
) -> np.ndarray:
    """``[d_B]``: B's write direction for ``feature`` (the slope of B's residual on the
    feature's activation), at ``hook`` (default: the feature's best hook)."""
    return _row(store, fit, feature, hook, "write_direction")


def load_table(
    store: Store | str | Path, name: str = "main", out_dir: str | Path | None = None
) -> pd.DataFrame:
    """The report's per-feature table (``report/<name>``): one row per SAE feature; its columns
    are described in ``docs/report.md``. ``out_dir``: where the report wrote it, if its config set
    ``out_dir`` (default: ``report/<name>/`` in the store)."""
    import pandas as pd

    store = _open(store)
    unit = f"report/{name}"
    if out_dir is not None:
        table = Path(out_dir) / "table.parquet"
    elif store.local_path is not None and (store.local_path / unit / "table.parquet").exists():
        table = store.local_path / unit / "table.parquet"
    else:
        have = sorted(
            u.removeprefix("report/") for u, _ in store.units() if u.startswith("report/")
        )
        raise XprobeError(
            f"{store.url} has no table for report {name!r} (reports: {have or 'none'}); run the "
            "report stage, or give out_dir if its config set one"
        )
    return pd.read_parquet(table)

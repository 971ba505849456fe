"""What ``pipeline`` exports for notebooks and scripts (see ``pipeline/__init__.py``).

``run`` takes what ``xprobe run`` takes: a TOML file, or the same tables as a dict. Everything
else opens what the stages wrote: the store, the report's table, activations and features chunk
by chunk.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.config import from_dict, load_toml, normalize_path, relative_to
from pipeline.controls import derive
from pipeline.errors import XprobeError
from pipeline.quiet import quiet
from pipeline.registry import STAGES, StageEntry
from pipeline.store import Store

if TYPE_CHECKING:
    import pandas as pd

    from pipeline.store.reader import ActChunk


def stage_sections(config: dict[str, Any], name: str) -> list[dict[str, Any]]:
    """A stage's TOML section(s): a table, or an array of tables for stages run several times."""
    section = config.get(name)
    if section is None:
        return []
    return section if isinstance(section, list) else [section]


def check_sections(config: dict[str, Any]) -> None:
    """Refuse top-level keys that are neither ``store``/``cache``/``max_disk`` nor a stage."""
    known = {"store", "cache", "max_disk"} | {s.name for s in STAGES}
    unknown = sorted(set(config) - known)
    if unknown:
        raise XprobeError(f"unknown config section(s) {unknown}; known: {sorted(known)}")


def plan(
    config: dict[str, Any],
    base: Path | None = None,
    only: Sequence[str] = (),
    overrides: dict[str, Any] | None = None,
    store_path: str | None = None,
) -> list[tuple[StageEntry, Any, Any]]:
    """``(stage entry, config dataclass, run function)`` for every stage section of ``config``,
    in run order, all built (so all checked) before anything runs. ``base``: the folder relative paths are
    relative to; ``overrides``: field values set in every section whose stage has that field;
    ``store_path``: the store's location, given to derive the controls a report needs
    (``pipeline.controls``; their floor models are written by ``write_floors``)."""
    check_sections(config)
    unknown = sorted(set(only) - {s.name for s in STAGES})
    if unknown:
        raise XprobeError(f"only {unknown}: no such stage; stages: {[s.name for s in STAGES]}")
    planned = _build(config, base, only, overrides)  # the written sections' errors come first
    try:
        derived = derive(config, base, store_path)[0]
    except XprobeError:
        if only and not {"activations", "fit"} & set(only):
            return planned  # a control that cannot be derived is no concern of these stages
        raise
    return planned if derived is config else _build(derived, base, only, overrides)


def _build(
    config: dict[str, Any],
    base: Path | None,
    only: Sequence[str],
    overrides: dict[str, Any] | None,
) -> list[tuple[StageEntry, Any, Any]]:
    planned = []
    for entry in STAGES:
        sections = stage_sections(config, entry.name)
        if (only and entry.name not in only) or not sections:
            continue
        cfg_cls, run_fn = entry.load()
        names = {f.name for f in dataclasses.fields(cfg_cls)}
        for i, section in enumerate(sections):
            section = relative_to(cfg_cls, section, base)
            for key, value in (overrides or {}).items():
                if key in names:
                    section[key] = value
            if "scheduler" in (overrides or {}):  # a cluster given for the run replaces any
                section.pop("workers", None)
            where = entry.name if i == 0 else f"{entry.name}.{i}"
            planned.append((entry, from_dict(cfg_cls, section, where=where), run_fn))
    return planned


def write_floors(config: dict[str, Any], base: Path | None, store_path: str) -> None:
    """Write the random floor models ``floor = "random"`` asks for (once; see
    ``pipeline.controls``), before the run's activations stage reads them."""
    for floor in derive(config, base, store_path)[1]:
        floor.write()


def store_location(path: str, base: Path | None) -> str:
    """A store or cache location from a config: a local path relative to ``base``, or a URL."""
    return path if "://" in path else normalize_path(path, "path", base)


def run(
    config: str | Path | dict[str, Any],
    *,
    only: Sequence[str] = (),
    force: bool = False,
    rebuild_stale: bool = False,
    progress: bool = True,
    max_disk: str | int | None = None,
) -> list[dict[str, Any]]:
    """Run every stage of ``config`` (a TOML file, or its tables as a dict) in order, skipping
    finished work, like ``xprobe run`` (``force``, ``rebuild_stale``, ``max_disk``: its flags;
    ``max_disk`` also from the config); returns each stage's summary.

    Relative paths are relative to the TOML file's folder (for a dict: the working directory).
    """
    if isinstance(config, (str, Path)):
        base: Path | None = Path(config).parent
        config = load_toml(config)
    else:
        base = None
    path = store_location(config["store"], base) if config.get("store") else None
    planned = plan(config, base, only, None if progress else {"progress": False}, path)
    if not planned:
        raise XprobeError("the config configures no stage; add a section such as [tokenize]")
    if path is None:
        raise XprobeError('no store given: set store = "PATH" in the config')
    with quiet(progress):
        write_floors(config, base, path)
    caches = config.get("cache") or []
    caches = [caches] if isinstance(caches, str) else caches
    store = Store(
        path,
        mode="a",
        cache=[store_location(c, base) for c in caches],
    )
    with quiet(progress):
        return run_planned(
            planned, store, max_disk or config.get("max_disk"), force, rebuild_stale, progress
        )


def run_planned(
    planned: list[tuple[StageEntry, Any, Any]],
    store: Store,
    max_disk: str | int | None,
    force: bool,
    rebuild_stale: bool,
    progress: bool,
) -> list[dict[str, Any]]:
    """Run planned stages in order; by segments (``pipeline.segments``) with a disk budget, or
    when a configured stage needs dense chunks an earlier segmented run evicted."""
    from pipeline.segments import needs_segments, parse_size, run_config

    budget = None if max_disk is None else parse_size(max_disk)
    if budget is not None or needs_segments(planned, store):
        return run_config(planned, store, budget, force, rebuild_stale, progress)
    return [
        run_fn(cfg, store, force=force, rebuild_stale=rebuild_stale) for _, cfg, run_fn in planned
    ]


def run_stage(
    cfg: Any, store: Store | str | Path, *, force: bool = False, rebuild_stale: bool = False
) -> dict[str, Any]:
    """Run one stage from its config dataclass (``TokenizeConfig(...)``...) on ``store``."""
    if not isinstance(store, Store):
        store = Store(store, mode="a")
    for entry in STAGES:
        cfg_cls, run_fn = entry.load()
        if isinstance(cfg, cfg_cls):
            return run_fn(cfg, store, force=force, rebuild_stale=rebuild_stale)
    raise XprobeError(f"{type(cfg).__name__} is not a stage config")


def open_store(path: str | Path, mode: str = "r", cache: Sequence[str | Path] = ()) -> Store:
    """A store, read-only by default (any fsspec URL, a zip from ``xprobe pack``, a folder)."""
    return Store(path, mode=mode, cache=cache)


def load_table(
    store: Store | str | Path, name: str = "main", out_dir: str | Path | None = None
) -> pd.DataFrame:
    """The report's per-feature table: ``pipeline.results.load_table`` (kept here for
    ``from pipeline.api import load_table``)."""
    from pipeline.results import load_table as load

    return load(store, name, out_dir)


def iter_activations(
    store: Store, corpus: str, model: str, hook: str, device: str = "cpu"
) -> Iterator[ActChunk]:
    """``acts/<corpus>/<model>/<hook>`` chunk by chunk: ``.acts [n_tok_chunk, d_model]`` (torch,
    on ``device``), ``.mask [n_tok_chunk]`` (tokens that count), ``.ids [n_tok_chunk]``."""
    from pipeline.store.reader import iter_chunks

    return iter_chunks(store, corpus, model, hook, device=device)


def iter_features(store: Store, corpus: str, sae: str) -> Iterator[tuple[int, Any, Any, Any]]:
    """``feats/<corpus>/<sae>`` chunk by chunk as ``(index, rows, cols, vals)``: the sparse
    activations of chunk ``index`` (row: token within the chunk, col: feature id)."""
    from pipeline.store.sparse import iter_sparse

    return iter_sparse(store, corpus, sae)

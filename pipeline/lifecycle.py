"""The stage contract and the runner that makes every stage resumable.

A stage declares the units it writes, checks its inputs, creates its arrays and then computes
whole chunks of sequences. The runner owns everything else: refusing a store written with another
config (or starting over with ``force``), skipping chunks already recorded complete, writing each
chunk on a background thread while the next one is computed, fsyncing it, recording it in the
manifest only then, and showing progress in tokens/s with an ETA.
"""

from __future__ import annotations

import errno
import queue
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from tqdm.auto import tqdm

from pipeline.config import diff_keys, fingerprint
from pipeline.errors import XprobeError
from pipeline.store import Store
from pipeline.store.io import checksum, provenance


@dataclass
class ChunkResult:
    """What a stage computed for chunk ``index``: rows to write, keyed by full array path."""

    index: int
    arrays: dict[str, np.ndarray]
    n_tok: int
    record: dict[str, Any] = field(default_factory=dict)  # extra facts for the manifest


class Stage(ABC):
    """One step of the pipeline. Subclasses set ``name`` and implement the abstract methods."""

    name: ClassVar[str]

    def __init__(self, cfg: Any):
        self.cfg = cfg

    @abstractmethod
    def units(self, store: Store) -> dict[str, dict[str, Any]]:
        """Unit paths this stage writes, each with its stage-specific provenance."""

    def validate(self, store: Store) -> None:
        """Check inputs before anything is written; raise XprobeError with what to do."""

    @abstractmethod
    def prepare(self, store: Store) -> int | None:
        """Create the output arrays; return the number of chunks, or None if not known yet."""

    @abstractmethod
    def compute(self, store: Store, todo: Callable[[int], bool]) -> Iterator[ChunkResult]:
        """Yield a ChunkResult for every chunk index ``i`` with ``todo(i)`` true, in order."""

    def tokens_todo(self, store: Store, done: set[int]) -> int | None:
        """Tokens left to process, for the progress bar (None if unknown)."""
        return None

    def load_prepared(self, store: Store) -> None:
        """Restore, without writing, what ``prepare`` set on this instance (a dask worker computes
        chunks of a stage that the coordinating process prepared)."""

    def finalize(self, store: Store, n_chunks: int | None) -> dict[str, Any]:
        """After all chunks are written: extra provenance (must include n_chunks if it was None)."""
        return {}


def check_config(store: Store, stage: Any, units: dict[str, dict[str, Any]], force: bool) -> bool:
    """Refuse (or with ``force`` clear) units written with another config. True if all complete.

    ``stage`` is anything with the stage's ``name`` and ``cfg``. The units are claimed for the
    local store: a unit of the same name in a read-only cache is shadowed, never written or
    compared here.
    """
    store.claim(list(units))
    new_fp = fingerprint(stage.cfg)
    all_complete = True
    for unit in units:
        if not store.has(unit) or "xprobe" not in store.group(unit).attrs:
            all_complete = False
            continue
        info = store.info(unit)
        if info.get("config_fingerprint") != new_fp:
            if force:
                store.delete(unit)
                all_complete = False
                continue
            diffs = diff_keys(info.get("config", {}), provenance(stage.name, stage.cfg)["config"])
            raise XprobeError(
                f"{unit} was written by stage {info.get('stage')!r} with another config:\n  "
                + "\n  ".join(diffs)
                + f"\nUse the same config to resume, or --force to delete {unit} and start it over."
            )
        if force:
            store.delete(unit)
            all_complete = False
        elif not info.get("complete"):
            all_complete = False
    return all_complete


def write_chunk(store: Store, units: list[str], result: ChunkResult) -> None:
    """Write one chunk's arrays, fsync them, then record the chunk complete in each unit."""
    crcs: dict[str, dict[str, int]] = {u: {} for u in units}
    for path, data in result.arrays.items():
        arr = store.array(path)
        start = result.index * arr.chunks[0]
        stop = start + data.shape[0]
        if stop > arr.shape[0]:
            arr.resize((stop,) + arr.shape[1:])
        arr[start:stop] = data
        store.sync_chunk(arr, result.index)
        unit, name = path.rsplit("/", 1)
        crcs.setdefault(unit, {})[name] = checksum(data)
    for unit in units:
        record = {
            "chunk": result.index,
            "n_tok": result.n_tok,
            "crc32": crcs.get(unit, {}),
            **result.record,
        }
        store.mark_done(unit, result.index, record)


class _Writer:
    """A background thread that writes chunks while the stage computes the next ones."""

    def __init__(self, store: Store, units: list[str], on_written: Callable[[ChunkResult], None]):
        self.store, self.units, self.on_written = store, units, on_written
        self.queue: queue.Queue[ChunkResult | None] = queue.Queue(maxsize=2)
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._loop, name="xprobe-writer", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while (item := self.queue.get()) is not None:
            if self.error is not None:
                continue  # drain after a failure; nothing more is written
            try:
                write_chunk(self.store, self.units, item)
                self.on_written(item)
            except BaseException as e:  # re-raised in the main thread
                self.error = e

    def put(self, item: ChunkResult) -> None:
        self.raise_if_failed()
        self.queue.put(item)

    def close(self) -> None:
        self.queue.put(None)
        self.thread.join()
        self.raise_if_failed()

    def raise_if_failed(self) -> None:
        if self.error is None:
            return
        e = self.error
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise disk_full(self.store) from e
        raise e


def disk_full(store: Store) -> XprobeError:
    return XprobeError(
        f"the disk holding {store.url} is full. Chunks already recorded are intact; "
        "free some space and run the same command again to resume."
    )


def run_stage(
    stage: Stage, store: Store, force: bool = False, progress: bool = True, client: Any = None
) -> dict[str, Any]:
    """Run ``stage`` on ``store`` to completion, doing only what is missing. Returns a summary.

    With a dask ``client``, chunks are computed and written by the cluster's workers
    (``pipeline.distributed``); this process still holds the locks, prepares and finalizes.
    """
    stage.validate(store)
    unit_provs = stage.units(store)
    units = list(unit_provs)
    if not force and (cache := store.cached_complete(units, fingerprint(stage.cfg))):
        return {
            "stage": stage.name,
            "units": units,
            "chunks_written": 0,
            "already_complete": True,
            "cache": cache,
        }
    locked: list[str] = []
    try:
        for unit in units:
            store.acquire_lock(unit, stage.name)
            locked.append(unit)
        return _run_locked(stage, store, unit_provs, force, progress, client)
    except OSError as e:  # metadata, side files and locks can hit a full disk too
        if e.errno == errno.ENOSPC:
            raise disk_full(store) from e
        raise
    finally:
        for unit in locked:
            store.release_lock(unit)


def _run_locked(
    stage: Stage,
    store: Store,
    unit_provs: dict[str, dict[str, Any]],
    force: bool,
    progress: bool,
    client: Any = None,
) -> dict[str, Any]:
    units = list(unit_provs)
    if check_config(store, stage, unit_provs, force):
        return {"stage": stage.name, "units": units, "chunks_written": 0, "already_complete": True}
    for unit, extra in unit_provs.items():
        if not store.has(unit) or "xprobe" not in store.group(unit).attrs:
            store.create_unit(unit, provenance(stage.name, stage.cfg, **extra))
    n_chunks = stage.prepare(store)
    if n_chunks is not None:
        for unit in units:
            store.update_info(unit, n_chunks_planned=n_chunks)
    done = set.intersection(*(store.done_chunks(u) for u in units)) if units else set()
    total = stage.tokens_todo(store, done)
    bar = tqdm(
        total=total,
        unit="tok",
        unit_scale=True,
        desc=f"{stage.name}",
        disable=not progress,
        dynamic_ncols=True,
        mininterval=1.0,
    )
    written = []

    def on_written(result: ChunkResult) -> None:
        written.append(result.index)
        bar.update(result.n_tok)
        bar.set_postfix(chunk=result.index, refresh=False)

    if client is not None:
        if n_chunks is None:
            raise XprobeError(
                f"stage {stage.name} cannot run on dask: its chunk count is not known"
            )
        from pipeline.distributed import run_chunks

        todo = [i for i in range(n_chunks) if i not in done]
        try:
            run_chunks(client, stage, store, units, todo, on_written)
        finally:
            bar.close()
    else:
        writer = _Writer(store, units, on_written)
        try:
            for result in stage.compute(store, lambda i: i not in done):
                writer.put(result)
        finally:
            try:
                writer.close()
            finally:
                bar.close()
    extras = stage.finalize(store, n_chunks)
    n_chunks = extras.pop("n_chunks", n_chunks)
    if n_chunks is None:
        raise RuntimeError(f"stage {stage.name} did not report its chunk count")
    for unit in units:
        missing = sorted(set(range(n_chunks)) - store.done_chunks(unit))
        if missing:
            raise XprobeError(
                f"{unit}: chunks {missing[:10]} are still missing after the run; rerun to resume"
            )
        store.mark_complete(unit, n_chunks, **extras)
    return {
        "stage": stage.name,
        "units": units,
        "chunks_written": len(written),
        "already_complete": False,
    }


@dataclass(frozen=True)
class _Identity:
    name: str
    cfg: Any


def run_whole_unit(
    name: str,
    cfg: Any,
    store: Store,
    unit: str,
    extra: dict[str, Any],
    force: bool,
    work: Callable[[], tuple[int, dict[str, Any]]],
) -> dict[str, Any]:
    """Run a stage that writes one unit from accumulated state (fit, match) rather than chunk by
    chunk: lock the unit, refuse another config (or start over with ``force``), create it with
    its provenance, then ``work()`` (which resumes from its own checkpoint) returns the chunk
    count and the facts to record; the unit is marked complete only after that."""
    store.acquire_lock(unit, name)
    try:
        if check_config(store, _Identity(name, cfg), {unit: extra}, force):
            return {"stage": name, "units": [unit], "chunks_written": 0, "already_complete": True}
        if not store.has(unit) or "xprobe" not in store.group(unit).attrs:
            store.create_unit(unit, provenance(name, cfg, **extra))
        n_chunks, facts = work()
        store.mark_complete(unit, n_chunks, **facts)
        return {
            "stage": name,
            "units": [unit],
            "chunks_written": n_chunks,
            "already_complete": False,
            "summary": facts.get("summary"),
        }
    finally:
        store.release_lock(unit)

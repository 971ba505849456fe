"""The one stage lifecycle: every stage (``pipeline.stage``) runs through ``run`` here.

Before doing or skipping anything, each unit the stage writes is assessed against the store:

- *complete*: recorded complete, with this config and the same inputs (lineage): skipped;
- *stale*: its inputs changed since it was computed (a model or SAE folder rewritten, an input
  unit recomputed to other bytes, a hub model moved on), or an input unit is itself stale. Never
  served as complete and never resumed: refused with one line naming the unit, the input that
  changed and the command that recomputes it (``--force`` on the stage, ``--rebuild-stale``);
- *another config*: refused likewise (``--force`` starts it over);
- *restart*: started but with nothing committed (no chunk, no checkpoint), under another config
  or other inputs: deleted and started again without asking (a first attempt that failed);
- *resume*: started with this config and these inputs: only the missing work is done;
- *new*.

Then, for the units that need work, under a per-unit lock: create them with their provenance
(the stage's config, its fingerprint and the lineage), and either compute the missing chunks
(``ChunkedStage``: each written on a background thread while the next is computed, fsynced,
recorded in the manifest only then; or as tasks on a dask cluster) or ``build`` the unit
(``WholeStage``). A unit is marked complete, with its content fingerprint, only after that.

Read-only stores (remote, zip, a local folder opened read-only or without write permission) take
no locks: complete units are served, anything else says the store is read-only.
"""

from __future__ import annotations

import contextlib
import errno
import queue
import threading
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

from tqdm.auto import tqdm

from pipeline.config import canonical, diff_keys, fingerprint
from pipeline.errors import XprobeError
from pipeline.lineage import Input, Stale, changed_inputs, staleness
from pipeline.stage import ChunkedStage, Stage, WholeStage
from pipeline.store import Store
from pipeline.store.checkpoint import checkpoint_path
from pipeline.store.chunks import ChunkResult, write_chunk
from pipeline.store.io import provenance

READ_ONLY_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM)


@dataclass(frozen=True)
class Assessment:
    """What a run must do with one unit (see the module docstring)."""

    unit: str
    state: str  # complete | stale | config | restart | resume | new
    stale: Stale | None = None
    diffs: tuple[str, ...] = ()


def _has_work(store: Store, unit: str) -> bool:
    """Whether a started unit holds anything worth keeping: a committed chunk or a checkpoint."""
    if store.done_chunks(unit):
        return True
    return store.local_path is not None and checkpoint_path(store, unit).exists()


def assess(
    store: Store,
    stage: Stage,
    unit: str,
    now: dict[str, Input],
    memo: dict[str, Stale | None] | None = None,
) -> Assessment:
    """The state of ``unit`` for a run of ``stage`` whose inputs are ``now``."""
    memo = {} if memo is None else memo
    upstream = _stale_input_unit(store, unit, now, memo)
    if not store.has(unit) or "xprobe" not in store.group(unit).attrs:
        return Assessment(unit, "stale", upstream) if upstream else Assessment(unit, "new")
    info = store.info(unit)
    changed = changed_inputs(info.get("lineage") or {}, now)
    stale = Stale(unit, changed[0][0], changed[0][1].describe()) if changed else upstream
    same_config = info.get("config_fingerprint") == fingerprint(stage.identity())
    if info.get("complete"):
        if stale is not None:
            return Assessment(unit, "stale", stale)
        if not same_config:
            return Assessment(unit, "config", diffs=_diffs(stage, info))
        return Assessment(unit, "complete")
    if stale is not None and upstream is not None:
        return Assessment(unit, "stale", stale)  # its inputs must be recomputed first
    if not _has_work(store, unit):
        return Assessment(unit, "restart" if (stale or not same_config) else "resume")
    if stale is not None:
        return Assessment(unit, "stale", stale)
    if not same_config:
        return Assessment(unit, "config", diffs=_diffs(stage, info))
    return Assessment(unit, "resume")


def _stale_input_unit(
    store: Store, unit: str, now: dict[str, Input], memo: dict[str, Stale | None]
) -> Stale | None:
    for name, inp in now.items():
        if inp.kind == "unit" and store.has(inp.ref):
            upstream = staleness(store, inp.ref, memo=memo)
            if upstream is not None:
                return Stale(unit, name, inp.describe(), via=upstream)
    return None


def _diffs(stage: Stage, info: dict[str, Any]) -> tuple[str, ...]:
    return tuple(diff_keys(info.get("config", {}), canonical(stage.identity())))


def refusal(stage: Stage, a: Assessment) -> XprobeError:
    """The one-line error for a unit a run must not skip, resume or overwrite unasked."""
    if a.state == "config":
        return XprobeError(
            f"{a.unit} was written by stage {stage.name!r} with another config:\n  "
            + "\n  ".join(a.diffs)
            + f"\nUse the same config to resume, or --force to delete {a.unit} and start it over."
        )
    assert a.stale is not None
    if a.stale.via is not None:
        root = a.stale.via
        while root.via is not None:
            root = root.via
        return XprobeError(
            f"{a.unit} is stale: {a.stale.reason()}. Recompute {root.unit} and what follows "
            f"from it first: `xprobe run CONFIG --rebuild-stale` recomputes every stale unit in order."
        )
    return XprobeError(
        f"{a.unit} is stale: {a.stale.reason()}. Recompute it with `xprobe {stage.name} --force` "
        "(same config), or `xprobe run CONFIG --rebuild-stale` to recompute every stale unit."
    )


def plan(stage: Stage, store: Store) -> list[Assessment]:
    """What a run of ``stage`` would do with each of its units, doing nothing (``--dry-run``)."""
    stage.validate(store)
    now = stage.inputs(store)
    memo: dict[str, Stale | None] = {}
    out = []
    for unit in stage.units(store):
        a = assess(store, stage, unit, now, memo)
        if a.state == "config" and stage.recompute_on_config_change:
            a = Assessment(unit, "restart")
        out.append(a)
    return out


def _summary(stage: Stage, units: list[str], written: int, **extra: Any) -> dict[str, Any]:
    return {"stage": stage.name, "units": units, "chunks_written": written, **extra}


def _done(stage: Stage, store: Store, units: list[str], **extra: Any) -> dict[str, Any]:
    summary = _summary(stage, units, 0, already_complete=True, **extra)
    if isinstance(stage, WholeStage):
        summary = stage.publish(store, summary)
    return summary


def run(
    stage: Stage,
    store: Store,
    force: bool = False,
    rebuild_stale: bool = False,
    progress: bool = True,
    cluster: Callable[[], contextlib.AbstractContextManager[Any]] | None = None,
    client: Any = None,
    chunks: Collection[int] | None = None,
) -> dict[str, Any]:
    """Run ``stage`` on ``store`` to completion, doing only what is missing. Returns a summary.

    ``force`` starts the stage's units over; ``rebuild_stale`` recomputes those that are stale
    (and nothing else). ``cluster()`` gives a dask client (or None) for the work, entered only
    when there is work to do: chunks then run as tasks on its workers (``pipeline.distributed``)
    while this process holds the locks, prepares and finalizes. ``client``: a client to use as is.

    ``chunks`` (a segmented run, ``pipeline.segments``): do only the work of these chunks. A
    chunked stage computes those of them that are missing or were evicted (and finalizes only
    once every chunk is recorded); a whole stage that consumes chunks (the fit) adds them to its
    checkpoint and is built later, by a run without ``chunks``.
    """
    if client is not None:
        cluster = lambda: contextlib.nullcontext(client)  # noqa: E731
    stage.segment = None if chunks is None else sorted(chunks)
    stage.validate(store)
    unit_facts = stage.units(store)
    units = list(unit_facts)
    now = stage.inputs(store)
    memo: dict[str, Stale | None] = {}
    config_fp = fingerprint(stage.identity())
    if not force and chunks is None and (cache := store.cached_complete(units, config_fp)):
        stale = [a for u in units if (a := assess(store, stage, u, now, memo)).state == "stale"]
        if not stale:
            return _done(stage, store, units, cache=cache)
        if not rebuild_stale:
            raise refusal(stage, stale[0])
    if store.local_path is None or store.mode == "r":
        return _read_only(stage, store, units, now, memo, "is open read-only", force)
    store.claim(units)
    locked: list[str] = []
    try:
        for unit in units:
            try:
                store.acquire_lock(unit, stage.name)
            except OSError as e:
                if e.errno in READ_ONLY_ERRNOS:
                    why = f"is not writable ({e.strerror})"
                    return _read_only(stage, store, units, now, memo, why, force)
                raise
            locked.append(unit)
        return _run_locked(
            stage, store, unit_facts, now, memo, force, rebuild_stale, progress, cluster, chunks
        )
    except OSError as e:  # metadata, side files and locks can hit a full disk too
        if e.errno == errno.ENOSPC:
            raise disk_full(store) from e
        raise
    finally:
        for unit in locked:
            store.release_lock(unit)


def _read_only(
    stage: Stage,
    store: Store,
    units: list[str],
    now: dict[str, Input],
    memo: dict[str, Stale | None],
    why: str,
    force: bool = False,
) -> dict[str, Any]:
    if force:  # never a silent "already complete": nothing can be started over here
        raise XprobeError(
            f"the store {store.url} {why}: --force cannot start {', '.join(units)} over. Write "
            f"to a local store that reads this one as a cache (`--store NEW --cache {store.url}`)"
        )
    states = [assess(store, stage, u, now, memo) for u in units]
    if all(a.state == "complete" for a in states):
        return _done(stage, store, units)
    for a in states:
        if a.state == "stale" or (a.state == "config" and not stage.recompute_on_config_change):
            raise refusal(stage, a)
    if isinstance(stage, WholeStage) and stage.can_publish_read_only:
        return stage.publish(store, _summary(stage, units, 0, already_complete=False))
    todo = [a.unit for a in states if a.state != "complete"]
    raise XprobeError(
        f"the store {store.url} {why}, and {', '.join(todo)} must be computed: write to a local "
        f"store that reads this one as a cache (`--store NEW --cache {store.url}`)"
    )


def _run_locked(
    stage: Stage,
    store: Store,
    unit_facts: dict[str, dict[str, Any]],
    now: dict[str, Input],
    memo: dict[str, Stale | None],
    force: bool,
    rebuild_stale: bool,
    progress: bool,
    cluster: Callable[[], contextlib.AbstractContextManager[Any]] | None,
    chunks: Collection[int] | None = None,
) -> dict[str, Any]:
    units = list(unit_facts)
    complete = _assess_all(stage, store, units, now, memo, force, rebuild_stale)
    if complete:
        if chunks is None or not isinstance(stage, ChunkedStage):
            return _done(stage, store, units)
        evicted = set.union(*(store.evicted_chunks(u) for u in units))
        if not evicted & set(chunks):
            return _done(stage, store, units)
    _create(stage, store, unit_facts, now, memo, force)
    with (cluster or contextlib.nullcontext)() as client:
        if isinstance(stage, ChunkedStage):
            summary = _run_chunks(stage, store, units, progress, client, chunks)
        elif chunks is not None:
            assert isinstance(stage, WholeStage)
            consumed = stage.consume(store, sorted(chunks), client)
            return _summary(stage, units, consumed, already_complete=False)
        else:
            assert isinstance(stage, WholeStage)
            n_chunks, facts = stage.build(store, client)
            _seal_lineage(stage, store, units)
            for unit in units:
                store.mark_complete(unit, n_chunks, **facts)
            summary = _summary(
                stage, units, n_chunks, already_complete=False, summary=facts.get("summary")
            )
    if isinstance(stage, WholeStage):
        summary = stage.publish(store, summary)
    return summary


def _assess_all(
    stage: Stage,
    store: Store,
    units: list[str],
    now: dict[str, Input],
    memo: dict[str, Stale | None],
    force: bool,
    rebuild_stale: bool,
) -> bool:
    """Refuse what must not be resumed or overwritten unasked; True if every unit is complete
    (and not forced)."""
    states = [assess(store, stage, u, now, memo) for u in units]
    for a in states:
        if a.state == "stale" and not (force or rebuild_stale):
            raise refusal(stage, a)
        if a.state == "stale" and a.stale is not None and a.stale.via is not None:
            raise refusal(stage, a)  # recomputing this unit cannot help: its input is stale
        if a.state == "config" and not (force or stage.recompute_on_config_change):
            raise refusal(stage, a)
    return not force and all(a.state == "complete" for a in states)


def _create(
    stage: Stage,
    store: Store,
    unit_facts: dict[str, dict[str, Any]],
    now: dict[str, Input],
    memo: dict[str, Stale | None],
    force: bool,
) -> None:
    """Delete what starts over (forced, stale, another config, a failed first attempt) and
    create the units that are missing, with their provenance and lineage."""
    lineage = {name: inp.record() for name, inp in now.items()}
    for unit in unit_facts:
        a = assess(store, stage, unit, now, memo)
        if store.has_local(unit) and (force or a.state in ("stale", "config", "restart")):
            store.delete(unit)
        if not store.has_local(unit) or "xprobe" not in store.group(unit).attrs:
            store.create_unit(
                unit,
                provenance(stage.name, stage.identity(), lineage=lineage, **unit_facts[unit]),
            )


def consume_together(
    stages: list[WholeStage], store: Store, chunks: Collection[int], rebuild_stale: bool = False
) -> dict[str, int]:
    """A segment (``pipeline.segments``) consumed by several stages of one kind (the fits) in
    one pass over its chunks, so each dense chunk is read once for all of them. Each stage's
    units are assessed, locked and created as ``run`` does; then ``consume_all`` on the stages
    that are not complete. Returns the chunks each unit consumed."""
    chunks = sorted(chunks)
    if store.local_path is None or store.mode == "r":
        raise XprobeError(f"the store {store.url} is open read-only: a segmented run writes")
    try:
        with contextlib.ExitStack() as held:
            ready = []
            for stage in stages:
                stage.segment = chunks
                stage.validate(store)
                unit_facts = stage.units(store)
                now = stage.inputs(store)
                memo: dict[str, Stale | None] = {}
                store.claim(list(unit_facts))
                for unit in unit_facts:
                    store.acquire_lock(unit, stage.name)
                    held.callback(store.release_lock, unit)
                if not _assess_all(stage, store, list(unit_facts), now, memo, False, rebuild_stale):
                    _create(stage, store, unit_facts, now, memo, False)
                    ready.append(stage)
            return type(ready[0]).consume_all(ready, store, chunks) if ready else {}
    except OSError as e:
        if e.errno == errno.ENOSPC:
            raise disk_full(store) from e
        raise


def _all_recorded(store: Store, units: list[str], n_chunks: int | None) -> bool:
    return n_chunks is not None and all(len(store.done_chunks(u)) == n_chunks for u in units)


def _seal_lineage(stage: Stage, store: Store, units: list[str]) -> None:
    """At completion, record the content fingerprints of input units that had none when the unit
    was created: a segmented run (``pipeline.segments``) starts consuming an input unit's chunks
    before that unit is complete. Those chunks were checked against their markers when read, and
    the input's fingerprint hashes those markers, so it names what was consumed."""
    now = stage.inputs(store)
    for unit in units:
        lineage = dict(store.info(unit).get("lineage") or {})
        fill = {
            name: now[name].record()
            for name, rec in lineage.items()
            if rec.get("fingerprint") is None
            and name in now
            and now[name].kind == "unit"
            and now[name].fingerprint is not None
        }
        if fill:
            store.update_info(unit, lineage={**lineage, **fill})


# ---- chunked stages ----------------------------------------------------------------------------------
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


def _run_chunks(
    stage: ChunkedStage,
    store: Store,
    units: list[str],
    progress: bool,
    client: Any,
    only: Collection[int] | None = None,
) -> dict[str, Any]:
    complete = all(store.info(u).get("complete") for u in units)
    n_chunks = stage.prepare(store)
    if n_chunks is not None and not complete:
        for unit in units:
            store.update_info(unit, n_chunks_planned=n_chunks)
    done = set.intersection(*(store.done_chunks(u) for u in units)) if units else set()
    if only is not None:  # a segment: these chunks only, evicted ones computed again
        if n_chunks is None:
            raise XprobeError(
                f"stage {stage.name} cannot run by segments: its chunk count is unknown"
            )
        evicted = set.union(*(store.evicted_chunks(u) for u in units))
        done = (done - (evicted & set(only))) | (set(range(n_chunks)) - set(only))
    bar = tqdm(
        total=stage.tokens_todo(store, done),
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

        try:
            run_chunks(
                client,
                stage,
                store,
                units,
                [i for i in range(n_chunks) if i not in done],
                on_written,
            )
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
    if only is not None and (complete or not _all_recorded(store, units, n_chunks)):
        return _summary(stage, units, len(written), already_complete=False)
    extras = stage.finalize(store, n_chunks)
    n_chunks = extras.pop("n_chunks", n_chunks)
    if n_chunks is None:
        raise RuntimeError(f"stage {stage.name} did not report its chunk count")
    _seal_lineage(stage, store, units)
    for unit in units:
        missing = sorted(set(range(n_chunks)) - store.done_chunks(unit))
        if missing:
            raise XprobeError(
                f"{unit}: chunks {missing[:10]} are still missing after the run; rerun to resume"
            )
        store.mark_complete(unit, n_chunks, **extras)
    return _summary(stage, units, len(written), already_complete=False)

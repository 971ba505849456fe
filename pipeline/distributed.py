"""Running stages on a dask.distributed cluster: chunks as tasks, the fitter as a tree reduction.

``pipeline.lifecycle.run`` (with a cluster) and the fit come here when a stage config
names a cluster (``pipeline/cluster.py`` gets the client). The coordinating process (the one you ran) keeps everything that touches shared metadata:
the unit locks, the config check, ``prepare`` (arrays are created at their final shape before any
worker writes), and ``finalize`` and the complete flag after the last task. Each chunk is one task:
a worker computes it with its cached copy of the stage (the model or SAE is loaded once per worker
process) and writes it straight to the store with the runner's ``write_chunk``: data, fsync, then
the chunk's marker. A task returns a few numbers, never array data. Zarr chunk files of different
chunk indices are different files, so workers never write the same file; a worker that dies
mid-task leaves its chunk unmarked, and dask reruns the task elsewhere or a resume redoes it.

The fitter's per-partition sufficient statistics are computed as tasks over contiguous runs of
chunks and summed by pairwise merges on the workers (a tree), so the coordinator receives one
set of statistics.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from pipeline.cluster import n_workers
from pipeline.config import canonical, fingerprint
from pipeline.errors import XprobeError
from pipeline.stage import ChunkedStage
from pipeline.store import Store
from pipeline.store.chunks import ChunkResult, write_chunk

if TYPE_CHECKING:
    from distributed import Client, Future

    from pipeline.maths.lstsq import SufficientStats

T = TypeVar("T")


def store_spec(store: Store) -> tuple[str, list[str]]:
    """What a worker needs to reopen ``store``: its local path and its read-only caches."""
    if store.local_path is None:
        raise XprobeError(f"store {store.url} is not a local path; workers write only to a folder")
    return str(store.local_path), [c.url for c in getattr(store, "caches", [])]


def open_store(spec: tuple[str, list[str]], mode: str = "a") -> Store:
    url, caches = spec
    return Store(url, mode=mode, cache=caches) if caches else Store(url, mode=mode)


# ---- chunk stages -----------------------------------------------------------------------------
_CACHE: OrderedDict[tuple[type, str], ChunkedStage] = OrderedDict()
_CACHE_SIZE = 2  # stages (models, SAEs) kept per worker process; the oldest is dropped
_CACHE_LOCK = threading.Lock()
LOADS: dict[str, int] = {}
"""How often this process built each cached stage (a worker builds each config once)."""


def worker_stage(stage_cls: type[ChunkedStage], cfg: Any) -> ChunkedStage:
    """This worker process's instance of ``stage_cls(cfg)``, built (model loaded) once."""
    config = fingerprint(canonical(cfg, include_runtime=True))
    key = (stage_cls, config)
    with _CACHE_LOCK:
        stage = _CACHE.get(key)
        if stage is None:
            while len(_CACHE) >= _CACHE_SIZE:
                _CACHE.popitem(last=False)
                _free_device_memory()
            stage = _CACHE[key] = stage_cls(cfg)
            name = f"{stage_cls.__module__}.{stage_cls.__qualname__}:{config}"
            LOADS[name] = LOADS.get(name, 0) + 1
        _CACHE.move_to_end(key)
    return stage


def _free_device_memory() -> None:
    import gc

    import torch

    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _check_writable(store: Store, result: ChunkResult) -> None:
    """Refuse a chunk a worker must not write: one whose rows fall outside its array (workers
    never resize: that rewrites shared metadata) or whose dtype differs (it would be cast)."""
    for path, data in result.arrays.items():
        arr = store.array(path)
        stop = result.index * arr.chunks[0] + data.shape[0]
        if stop > arr.shape[0] or data.shape[1:] != arr.shape[1:]:
            raise XprobeError(
                f"chunk {result.index} of {path} has shape {data.shape}, outside the array's "
                f"{arr.shape}; a stage run on workers must create its arrays full size in prepare()"
            )
        if data.dtype != arr.dtype:
            raise XprobeError(
                f"chunk {result.index} of {path} was computed as {data.dtype} but the array holds "
                f"{arr.dtype}: this worker resolved another dtype or device than the coordinator. "
                "Set device and dtype explicitly in the config."
            )


def chunk_task(
    stage_cls: type[ChunkedStage],
    cfg: Any,
    spec: tuple[str, list[str]],
    units: list[str],
    index: int,
) -> dict:
    """On a worker: compute chunk ``index`` and write it to the store. Returns a small record."""

    start = time.perf_counter()
    store = open_store(spec)
    stage = worker_stage(stage_cls, cfg)
    stage.load_prepared(store)
    results = list(stage.compute(store, lambda i: i == index))
    if [r.index for r in results] != [index]:
        raise RuntimeError(
            f"{stage_cls.__name__}.compute yielded chunks {[r.index for r in results]} "
            f"when asked for chunk {index}"
        )
    _check_writable(store, results[0])
    write_chunk(store, units, results[0])  # Store.array keeps write_empty_chunks: one file a chunk
    return {
        "index": index,
        "n_tok": results[0].n_tok,
        "seconds": time.perf_counter() - start,
        "pid": os.getpid(),
    }


def run_chunks(
    client: Client,
    stage: ChunkedStage,
    store: Store,
    units: list[str],
    todo: Sequence[int],
    on_written: Callable[[ChunkResult], None],
    in_flight: int | None = None,
) -> None:
    """Compute and write chunks ``todo`` of ``stage`` as tasks on ``client``'s workers.

    At most ``in_flight`` tasks (default twice the workers, counted again as tasks finish, so an
    adaptive cluster that grows gets more) are queued at once. After a task
    fails, nothing new is submitted and the tasks already running are waited for, so no worker
    writes once this returns; then the first error is raised. Chunks written are kept.
    """
    from distributed import as_completed

    spec, run_id = store_spec(store), uuid.uuid4().hex[:8]
    pending = iter(todo)
    index_of: dict[str, int] = {}

    def submit(index: int) -> Future:
        future = client.submit(
            chunk_task,
            type(stage),
            stage.cfg,
            spec,
            units,
            index,
            key=f"xprobe-{stage.name}-{run_id}-chunk-{index}",
        )
        index_of[future.key] = index
        return future

    window = in_flight or 2 * n_workers(client)
    futures = as_completed([submit(i) for i in itertools.islice(pending, window)])
    errors: list[tuple[int, BaseException]] = []
    try:
        for future in futures:
            index = index_of.pop(future.key)
            try:
                record = future.result()
            except Exception as e:  # the worker's exception (or KilledWorker), raised below
                errors.append((index, e))
            else:
                on_written(ChunkResult(index, {}, n_tok=record["n_tok"]))
            future.release()
            window = in_flight or 2 * n_workers(client)
            while not errors and futures.count() < window:
                if (nxt := next(pending, None)) is None:
                    break
                futures.add(submit(nxt))
    except BaseException:
        client.cancel(list(futures.futures))  # Ctrl-C: queued tasks are dropped
        raise
    if errors:
        index, first = min(errors, key=lambda e: e[0])
        if isinstance(first, XprobeError):  # the stage's own message, as in one process
            raise first
        raise _task_error(stage.name, index, first, sorted(i for i, _ in errors)) from first


def _task_error(stage: str, index: int, first: BaseException, failed: list[int]) -> XprobeError:
    if type(first).__name__ == "KilledWorker":
        what = "a worker died (or was lost) while computing"
    else:
        what = f"{type(first).__name__}: {first} in"
    return XprobeError(
        f"{stage}: {what} chunk {index} (failed chunks: {failed}). Chunks already written are "
        "recorded; run the same command again to resume."
    )


# ---- the fitter: partitions and a tree reduction ----------------------------------------------
def merge_tree(client: Client, futures: list[Future], merge: Callable[[T, T], T]) -> Future:
    """Submit pairwise merges of ``futures`` on the workers (``merge(a, b)``, a tree of depth
    log2 n); returns the future of the single result. Data moves between workers only."""
    if not futures:
        raise ValueError("merge_tree needs at least one future")
    level = 0
    while len(futures) > 1:
        merged = [
            client.submit(merge, a, b, key=f"xprobe-merge-{uuid.uuid4().hex[:8]}-{level}-{i}")
            for i, (a, b) in enumerate(zip(futures[::2], futures[1::2], strict=False))
        ]
        futures = merged + ([futures[-1]] if len(futures) % 2 else [])
        level += 1
    return futures[0]


def partitions(todo: Sequence[int], n_parts: int) -> list[list[int]]:
    """``todo`` split into at most ``n_parts`` contiguous runs of (nearly) equal length."""
    n_parts = max(1, min(n_parts, len(todo)))
    size, extra = divmod(len(todo), n_parts)
    out, start = [], 0
    for p in range(n_parts):
        stop = start + size + (p < extra)
        out.append(list(todo[start:stop]))
        start = stop
    return [p for p in out if p]


def _fit_partition(fit_cls: type, cfg: Any, spec: tuple, chunks: list[int], d: int, n_feat: int):
    """On a worker: the fit's statistics over ``chunks``, as CPU state dicts (the same loop
    as a local run, without checkpoints: the coordinator merges and checkpoints)."""
    from pipeline.probes import accumulate as acc

    fit = fit_cls(cfg, open_store(spec, mode="r"))
    state = acc.Accumulation(fit, acc.fresh_stats(fit, d, n_feat), [], fit.held_out_mask())
    acc.consume([state], chunks, save=False)
    return acc.state_dicts(state.stats)


def _merge_states(a: dict, b: dict) -> dict:
    """Chan's merge of two partitions' statistics (float64, on the CPU)."""
    import torch

    from pipeline.maths.lstsq import SufficientStats

    out = {}
    for hook, splits in a.items():
        out[hook] = {}
        for split, state in splits.items():
            merged = SufficientStats.from_state_dict(state, torch.device("cpu"), torch.float64)
            merged.merge(SufficientStats.from_state_dict(b[hook][split], torch.device("cpu")))
            out[hook][split] = merged.state_dict()
    return out


def accumulate_fit(
    client: Client,
    fit: Any,
    todo: Sequence[int],
    d: int,
    n_feat: int,
    n_parts: int | None = None,
    on_partition: Callable[[list[int]], None] = lambda part: None,
) -> dict[str, dict[str, SufficientStats]]:
    """The fit's statistics over chunks ``todo``: one task per partition (default two per
    worker), reduced by a tree of pairwise merges. ``fit`` is a ``pipeline.probes.Fit``;
    ``on_partition(chunks)`` is called here as each partition's task succeeds, for a progress
    bar."""
    from pipeline.maths.lstsq import SufficientStats

    spec, run_id = store_spec(fit.store), uuid.uuid4().hex[:8]
    parts = partitions(todo, n_parts or 2 * n_workers(client))
    futures = [
        client.submit(
            _fit_partition,
            type(fit),
            fit.cfg,
            spec,
            part,
            d,
            n_feat,
            key=f"xprobe-fit-{run_id}-chunks-{part[0]}-{part[-1]}",
        )
        for part in parts
    ]
    part_of = {future.key: part for part, future in zip(parts, futures, strict=True)}
    try:
        from distributed import as_completed

        final = merge_tree(client, futures, _merge_states)
        for future in as_completed(futures):
            if future.status == "finished":
                on_partition(part_of[future.key])
        state = final.result()
    except XprobeError:
        raise
    except Exception as e:
        raise XprobeError(
            f"fit: a partition task failed ({type(e).__name__}: {e}); nothing was consumed, "
            "run the same command again"
        ) from e
    return {
        hook: {
            split: SufficientStats.from_state_dict(sd, fit.device, fit.dtype)
            for split, sd in splits.items()
        }
        for hook, splits in state.items()
    }

"""Getting a dask.distributed client: an existing cluster, or a local one (one worker per GPU).

A stage config's ``scheduler = "tcp://host:8786"`` (or a scheduler JSON file) names an existing
cluster; ``workers = N`` starts a local one for the stage (``xprobe run --workers N``: one for the
whole run). Both are runtime-only fields. What runs on the cluster is ``pipeline/distributed.py``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.config import runtime
from pipeline.errors import XprobeError

if TYPE_CHECKING:
    from distributed import Client


def scheduler_field() -> Any:
    """The ``scheduler`` config field of a stage that can run on dask (runtime only)."""
    return runtime(
        None,
        "dask scheduler address (tcp://host:8786) or scheduler JSON file: run this stage's "
        "chunks (fit: partitions) on that cluster's workers",
    )


def workers_field() -> Any:
    """The ``workers`` config field of a stage that can run on dask (runtime only)."""
    return runtime(
        None,
        "start a local dask cluster of this many worker processes for this stage "
        "(one per GPU where CUDA is visible; 0 = every GPU)",
    )


def visible_gpus() -> list[str]:
    """The GPUs this process may use: ``CUDA_VISIBLE_DEVICES`` entries, else every CUDA device."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None:
        return [g.strip() for g in listed.split(",") if g.strip() and g.strip() != "-1"]
    import torch

    return [str(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")
"""What dask's nannies give each worker (1: one BLAS thread per single-threaded worker)."""


@contextlib.contextmanager
def threads_set_in_workers_only() -> Iterator[None]:
    """Nannies created inside give their workers ``THREAD_VARIABLES`` in the worker process
    (``distributed.nanny.environ``), not in this one. dask's default puts them in
    ``distributed.nanny.pre-spawn-environ``, which the nanny writes into *this* process's
    ``os.environ`` before it spawns each worker: every process started from here afterwards
    (a resumed run, a notebook's subprocess) then runs its BLAS on one thread and sums floats in
    another order than the same command run from a shell. A nanny reads these settings when it
    is created, so they hold for its restarts too. A worker imports torch only when a task
    runs, after its nanny has set them."""
    import dask
    import distributed  # noqa: F401  (its defaults enter dask.config on import)

    pre_spawn = dict(dask.config.get("distributed.nanny.pre-spawn-environ", None) or {})
    moved = {name: pre_spawn.pop(name) for name in THREAD_VARIABLES if name in pre_spawn}
    environ = {**moved, **(dask.config.get("distributed.nanny.environ", None) or {})}
    with dask.config.set(
        {"distributed.nanny.pre-spawn-environ": pre_spawn, "distributed.nanny.environ": environ}
    ):
        yield


def pinned_gpu_cluster(gpus: Sequence[str]) -> Any:
    """A local cluster with one single-threaded worker process per GPU, each seeing only its GPU.

    ``CUDA_VISIBLE_DEVICES`` is set in each worker's environment by its nanny before the process
    starts, so ``cuda`` in a worker is its own GPU. dask-cuda's ``LocalCUDACluster`` does the same
    (and more); this is the fallback where dask-cuda is not installed.
    """
    from distributed import Nanny, Scheduler, SpecCluster

    workers = {
        f"gpu-{gpu}": {
            "cls": Nanny,
            "options": {"nthreads": 1, "env": {"CUDA_VISIBLE_DEVICES": str(gpu)}},
        }
        for gpu in gpus
    }
    scheduler = {"cls": Scheduler, "options": {"dashboard_address": ":0"}}
    return SpecCluster(workers=workers, scheduler=scheduler, name="xprobe-gpus")


def local_cluster(n_workers: int) -> Any:
    """``n_workers`` local worker processes (one thread each); where CUDA devices are visible,
    one worker per GPU (``n_workers = 0``: every GPU), through dask-cuda if it is installed.
    This process's environment is left as it was (:func:`threads_set_in_workers_only`)."""
    with threads_set_in_workers_only():
        return _local_cluster(n_workers)


def _local_cluster(n_workers: int) -> Any:
    gpus = visible_gpus()
    if gpus:
        n = n_workers or len(gpus)
        if n > len(gpus):
            raise XprobeError(
                f"workers = {n} but only {len(gpus)} GPU(s) are visible ({','.join(gpus)}); "
                "run one worker per GPU"
            )
        try:
            from dask_cuda import LocalCUDACluster
        except ImportError:
            return pinned_gpu_cluster(gpus[:n])
        return LocalCUDACluster(CUDA_VISIBLE_DEVICES=",".join(gpus[:n]), threads_per_worker=1)
    if n_workers < 1:
        raise XprobeError(f"workers must be at least 1 on a machine without GPUs, got {n_workers}")
    from distributed import LocalCluster

    return LocalCluster(
        n_workers=n_workers, threads_per_worker=1, processes=True, dashboard_address=":0"
    )


@contextlib.contextmanager
def connect(scheduler: str | None = None, workers: int | None = None) -> Iterator[Client]:
    """A client of the cluster at ``scheduler`` (an address or a scheduler JSON file), or of a
    local cluster of ``workers`` processes started here and shut down on exit."""
    from distributed import Client

    if scheduler and workers is not None:
        raise XprobeError("give either scheduler (an existing cluster) or workers (a local one)")
    if scheduler:
        is_file = scheduler.endswith(".json") and Path(scheduler).exists()
        try:
            client = (
                Client(scheduler_file=scheduler, timeout="30s")
                if is_file
                else Client(scheduler, timeout="30s")
            )
        except (OSError, TimeoutError, ValueError) as e:
            raise XprobeError(
                f"cannot reach the dask scheduler at {scheduler} ({e}); start it (`dask scheduler`) "
                "or check the address"
            ) from None
        with client:
            yield client
        return
    if workers is None:
        raise XprobeError("connect() needs a scheduler address or a number of workers")
    with local_cluster(workers) as cluster, Client(cluster) as client:
        yield client


@contextlib.contextmanager
def client_for(cfg: Any) -> Iterator[Client | None]:
    """The client a stage config asks for (its ``scheduler`` / ``workers`` fields), or None."""
    scheduler, workers = getattr(cfg, "scheduler", None), getattr(cfg, "workers", None)
    if not scheduler and workers is None:
        yield None
        return
    with connect(scheduler, workers) as client:
        yield client


def n_workers(client: Client) -> int:
    return max(1, len(client.scheduler_info(n_workers=-1).get("workers", {})))

"""Writing one chunk of a chunked unit: its arrays' rows, fsync, then the chunk's marker.

A stage's ``compute`` yields a ``ChunkResult`` per chunk; the lifecycle (one process) or a dask
worker (``pipeline.distributed``) hands it to ``write_chunk``. The marker, holding each array's
crc32, is written only after the data is durable, so a chunk without a marker does not exist.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.errors import XprobeError
from pipeline.store.core import Store
from pipeline.store.io import checksum


@dataclass
class ChunkResult:
    """What a stage computed for chunk ``index``: rows to write, keyed by full array path."""

    index: int
    arrays: dict[str, np.ndarray]
    n_tok: int
    record: dict[str, Any] = field(default_factory=dict)  # extra facts for the manifest


def write_chunk(store: Store, units: list[str], result: ChunkResult) -> None:
    """Write one chunk's arrays, fsync them, then record the chunk complete in each unit. A chunk
    that replaces an evicted one (``Store.evict_chunk``) must have the bytes it had."""
    crcs: dict[str, dict[str, int]] = {u: {} for u in units}
    for path, data in result.arrays.items():
        unit, name = path.rsplit("/", 1)
        crcs.setdefault(unit, {})[name] = checksum(data)
    for unit in units:  # checked before anything is overwritten
        old = store.chunk_record(unit, result.index)
        if old and old.get("evicted") and old.get("crc32") != crcs.get(unit, {}):
            raise XprobeError(
                f"chunk {result.index} of {unit} was recomputed to other bytes than the evicted "
                "chunk it replaces (a nondeterministic forward?): what was consumed from it would "
                f"not match. Recompute {unit} and what follows from it with --force."
            )
    for path, data in result.arrays.items():
        arr = store.array(path)
        start = result.index * arr.chunks[0]
        stop = start + data.shape[0]
        if stop > arr.shape[0]:
            arr.resize((stop,) + arr.shape[1:])
        arr[start:stop] = data
        store.sync_chunk(arr, result.index)
    for unit in units:
        record = {
            "chunk": result.index,
            "n_tok": result.n_tok,
            "crc32": crcs.get(unit, {}),
            **result.record,
        }
        store.mark_done(unit, result.index, record)

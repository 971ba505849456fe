"""Checking a whole store against its chunk manifests, and repairing what can be recomputed.

Every chunk marker ``_done/<i>.json`` holds the crc32 of each array's rows. ``verify_store`` reads
every recorded chunk back, compares, and scans activations for non-finite values. A whole unit (fit, match, report: no chunk markers) is
checked against the crc32 of each array recorded in its provenance at completion. With
``repair``, the marker of each bad chunk is dropped and its unit is marked incomplete, so that
rerunning the stage that wrote it recomputes exactly those chunks (the runner resumes by
markers). Stages also verify each chunk they read, so a corrupted chunk is never used as data.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.errors import XprobeError
from pipeline.store.core import DONE_DIR, Store, array_crc32
from pipeline.store.layout import UNIT_KINDS


@dataclass(frozen=True)
class Problem:
    unit: str
    chunk: int | None  # None: a whole unit's array
    array: str
    what: str


def verify_whole_unit(store: Store, unit: str) -> list[Problem]:
    """A whole unit (fit, match, report) against the crc32 of each array recorded at completion."""
    info = store.info(unit)
    recorded = info.get("checksums")
    if not info.get("complete") or not recorded:
        return []  # nothing promised yet (or written before checksums were recorded)
    problems = []
    for name, crc in sorted(recorded.items()):
        path = f"{unit}/{name}"
        if not store.has(path):
            problems.append(Problem(unit, None, name, "the array is missing"))
            continue
        try:
            actual = array_crc32(store.array(path))
        except (RuntimeError, ValueError) as e:
            problems.append(Problem(unit, None, name, f"it cannot be decoded: {e}"))
            continue
        if actual != crc:
            problems.append(Problem(unit, None, name, "it does not match its checksum"))
    return problems


def verify_unit(store: Store, unit: str) -> list[Problem]:
    """Every recorded chunk of ``unit`` read back and checked; an empty list if all are sound."""
    kind = UNIT_KINDS.get(unit.split("/")[0])
    if kind is not None and not kind.chunked:
        return verify_whole_unit(store, unit)
    info = store.info(unit)
    problems = []
    for index in sorted(store.done_chunks(unit)):
        record = store.chunk_record(unit, index)
        if record is None:  # a complete unit whose markers were lost: nothing to check against
            problems.append(Problem(unit, index, "", "its chunk marker is missing"))
            continue
        gone = set(record.get("evicted") or ())  # consumed and evicted on purpose (--max-disk)
        for name in sorted(set(record.get("crc32", {})) - gone):
            try:
                data = store.read_chunk(f"{unit}/{name}", index, verify=True)
            except XprobeError as e:
                problems.append(Problem(unit, index, name, str(e).split(";")[0]))
                continue
            if name == "x" and info.get("dtype") in ("float32", "float16") and data.size:
                finite = np.isfinite(data).all(axis=1)
                if not finite.all():
                    row = int(np.flatnonzero(~finite)[0])
                    ctx = int(info.get("ctx") or 1)
                    problems.append(
                        Problem(
                            unit,
                            index,
                            name,
                            f"non-finite value at token row {row} of the chunk "
                            f"(sequence {row // ctx} of the chunk, position {row % ctx})",
                        )
                    )
    return problems


def verify_store(store: Store, repair: bool = False) -> list[Problem]:
    """Check every unit of ``store``; with ``repair`` (local stores) drop bad chunks' markers."""
    problems = [p for unit, _ in store.units() for p in verify_unit(store, unit)]
    if repair and problems:
        if store.local_path is None:
            raise XprobeError(f"{store.url} is read-only; repair a local copy of it")
        for unit in sorted({p.unit for p in problems}):
            for index in sorted(
                {p.chunk for p in problems if p.unit == unit and p.chunk is not None}
            ):
                (store.local_path / unit / DONE_DIR / f"{index}.json").unlink(missing_ok=True)
            store.update_info(unit, complete=False)
    return problems

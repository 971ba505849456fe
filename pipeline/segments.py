"""Segmented runs (``xprobe run CONFIG --max-disk 50GB``): corpora whose dense activations do not
fit on the disk.

The fitter needs each activation once (it accumulates sufficient statistics) and A's features are
sparse, so only the dense activations need the disk, and only until every stage that reads them
has consumed them. A segmented run goes over the corpus in *segments* of whole chunks, sized so
that the store stays within the budget: for each segment, the activations of every configured
model are computed, A's features encoded, and every fit's statistics accumulated (each fit
checkpoints what it consumed); then the segment's dense chunks are *evicted*: their files are
deleted and their markers kept, flagged (``Store.evict_chunk``), with their checksums, so lineage
still names them and a recomputation is checked against them. Tokens, sparse features, fit
checkpoints and every output are kept.

Once every chunk is consumed, each fit solves its probes and scores them on the held-out
sequences. That pass needs B's held-out activations again, after they were evicted: it computes
them again a segment at a time (the same forward, checked bit for bit against the recorded
checksums) and evicts them after. The held-out sequences are spread over every chunk, so this is
a second forward of B over the corpus: the price of a bounded disk.

Chunks are consumed in ascending order in every segment, so every sum runs in the same order as
in an unsegmented run: the results are bit-identical to one, and a run killed at any point and
started again with the same command ends the same. A stage that needs evicted chunks later (a fit
added to the config) gets exactly those computed again by ``xprobe run`` (with ``--max-disk``
they are evicted again after; without, they are kept).

Match and the report read only tokens and sparse features, so they run after, as usual.
"""

from __future__ import annotations

import math
import re
import sys
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline import lifecycle
from pipeline.errors import XprobeError
from pipeline.stage import Stage
from pipeline.store import Store
from pipeline.store.layout import tokens_unit

_UNITS = {"": 1, "b": 1, "k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_UNITS.update({"kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40})
_UNITS.update({f"{u}b": v for u, v in list(_UNITS.items()) if len(u) == 1 and u != "b"})


def parse_size(text: str | int | float) -> int:
    """Bytes from ``50GB``, ``1.5TB``, ``800MiB`` or a plain number of bytes."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value, unit = float(text), ""
    else:
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([A-Za-z]*)\s*", str(text))
        if not m or m.group(2).lower() not in _UNITS:
            raise XprobeError(
                f"max_disk {text!r} is not a size: give a number with a unit, e.g. 50GB, 1.5TB, 800MiB"
            )
        value, unit = float(m.group(1)), m.group(2).lower()
    size = int(value * _UNITS[unit])
    if size <= 0:
        raise XprobeError(f"max_disk must be positive, got {text!r}")
    return size


def human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    return f"{n:.2f} TB"


@dataclass
class Segmented:
    """The configured stages of a segmented run, by role."""

    store: Store
    max_disk: int | None
    activations: list[Any]  # ActivationsStage
    features: list[Any]  # FeaturesStage
    fits: list[Any]  # FitStage
    force: bool = False
    rebuild_stale: bool = False
    progress: bool = True
    summaries: list[dict[str, Any]] = field(default_factory=list)
    written: dict[int, int] = field(default_factory=dict)
    """Chunks each stage (by id) wrote in segments, for its summary."""
    samples: list[int] = field(default_factory=list)
    """The store's size, sampled before and after every segment (what the tests check)."""
    computed: dict[str, set[int]] = field(default_factory=dict)
    """Dense chunks this run computed, by unit: the only ones it evicts."""

    # ---- what is where --------------------------------------------------------------------
    def producers(self) -> dict[str, Any]:
        """Dense unit -> the activations stage that writes it."""
        return {unit: stage for stage in self.activations for unit in stage.units(self.store)}

    def consumers(self) -> dict[str, list[Callable[[], set[int]]]]:
        """Dense unit -> for each configured stage reading it, what it has consumed."""
        store = self.store
        out: dict[str, list[Callable[[], set[int]]]] = {}
        for stage in [*self.features, *self.fits]:
            for unit in stage.dense_reads(store):
                out.setdefault(unit, []).append(lambda s=stage: s.consumed_chunks(store))
        return out

    def n_chunks(self) -> int:
        tokens = {tokens_unit(s.cfg.corpus) for s in self.activations}
        if len(tokens) != 1:
            raise XprobeError(
                f"a segmented run goes over one corpus; the activations sections read {sorted(tokens)}"
            )
        return int(self.store.info(tokens.pop())["n_chunks"])

    def chunk_bytes(self, units: Sequence[str]) -> int:
        """Bytes one chunk of ``units`` takes at most on disk (uncompressed)."""
        total = 0
        for unit in units:
            arr = self.store.array(f"{unit}/x") if self.store.has(f"{unit}/x") else None
            if arr is not None:
                total += math.prod(arr.chunks) * arr.dtype.itemsize
            else:
                stage = self.producers()[unit]
                tinfo = self.store.info(stage.tokens)
                rows = int(tinfo["chunk_seqs"]) * int(tinfo["ctx"])
                total += rows * stage.d_model * _itemsize(stage.dtype)
        return total

    def used(self) -> int:
        used = self.store.nbytes_stored("") or 0
        self.samples.append(used)
        return used

    def checkpoint_bytes(self) -> int:
        return sum(stage.disk_reserve(self.store).checkpoint_now for stage in self.fits)

    def reserve(self) -> int:
        """Room kept for what is written besides dense chunks and what a chunk leaves behind:
        the fits' checkpoints still to grow to their size, one temporary copy of the largest
        (each is rewritten through one, one fit after the other), and the fits' outputs, written
        while the held-out pass's last segment is on disk."""
        grow, largest, outputs = 0, 0, 0
        for stage in self.fits:
            need = stage.disk_reserve(self.store)
            grow += need.checkpoint - need.checkpoint_now
            largest = max(largest, need.checkpoint)
            outputs += need.outputs
        return grow + largest + outputs

    def segment_length(self, units: Sequence[str], kept_per_chunk: float, left: int) -> int:
        """Chunks per segment within the budget (all of ``left`` without one)."""
        if self.max_disk is None:
            return max(left, 1)
        used, reserve = self.used(), self.reserve()
        per_chunk = self.chunk_bytes(units) + kept_per_chunk
        n = int((self.max_disk - used - reserve) // max(per_chunk, 1))
        if n < 1:
            raise XprobeError(
                f"--max-disk {human(self.max_disk)} is too small: the store holds {human(used)}, the "
                f"fits' checkpoints and outputs need {human(reserve)} more, and one chunk of dense activations "
                f"takes {human(per_chunk)}. Give at least {human(used + reserve + per_chunk)} (a "
                "few chunks' worth more keeps the overhead low), or tokenize with fewer chunk_seqs."
            )
        return min(n, left)

    # ---- the run --------------------------------------------------------------------------
    def run(self) -> list[dict[str, Any]]:
        for stage in self.activations:
            stage.validate(self.store)  # tokens are complete: its units and widths are known
        self._refuse_global_norms()
        n_chunks = self.n_chunks()
        per_chunk = self.chunk_bytes(list(self.producers()))
        if self.max_disk is not None and self.max_disk < per_chunk:  # before anything is touched
            raise XprobeError(
                f"--max-disk {human(self.max_disk)} is too small: one chunk of dense activations "
                f"takes {human(per_chunk)}. Give at least that plus the store's size (a few "
                "chunks' worth more keeps the overhead low), or tokenize with fewer chunk_seqs."
            )
        self._consume_all(n_chunks)
        for stage in self.activations + self.features:  # complete by now, or finalised here
            self._run(stage)
        self._build_fits(n_chunks)
        return self.summaries

    def _run(
        self, stage: Stage, chunks: list[int] | None = None, collect: bool = True
    ) -> dict[str, Any]:
        from pipeline.cluster import client_for

        summary = lifecycle.run(
            stage,
            self.store,
            force=self.force and chunks is None,
            rebuild_stale=self.rebuild_stale,
            progress=self.progress and getattr(stage.cfg, "progress", True),
            cluster=lambda: client_for(stage.cfg),  # None unless scheduler / workers is set
            chunks=chunks,
        )
        if chunks is not None:
            self.written[id(stage)] = self.written.get(id(stage), 0) + summary["chunks_written"]
        else:
            if self.written.get(id(stage)) and summary.get("already_complete"):
                summary = {**summary, "already_complete": False}
            summary["chunks_written"] += self.written.pop(id(stage), 0)
            if collect:
                self.summaries.append(summary)
        return summary

    def _consume_all(self, n_chunks: int) -> None:
        store = self.store
        producers = self.producers()
        if self.force:  # --force: every configured unit starts over, before the first segment
            units = [*producers, *(s.unit for s in self.features + self.fits)]
            for unit in units:
                if store.has_local(unit):
                    store.delete(unit)
            self.force = False
        consumers = self.consumers()
        dense = [u for u in producers if u in consumers]  # evicted once all have consumed them

        recorded = {u: store.done_chunks(u) if store.has(u) else set() for u in producers}

        def finished(index: int) -> bool:  # stored, and consumed by every configured reader
            return all(index in done for done in recorded.values()) and all(
                index in done() for unit in dense for done in consumers[unit]
            )

        # a killed segmented run's last segment: stored, consumed, not yet evicted. Only units
        # a segmented run is working on (incomplete, some chunks evicted); never a finished store
        resumed = [u for u in dense if store.has(u) and not store.info(u).get("complete")]
        resumed = [u for u in resumed if store.evicted_chunks(u)]
        for unit in resumed:
            self.computed.setdefault(unit, set()).update(recorded[unit])
        self.evict([i for i in range(n_chunks) if finished(i)], resumed)
        todo = [i for i in range(n_chunks) if not finished(i)]
        start = self.used() - self.checkpoint_bytes() if self.max_disk is not None else 0
        consumed, kept_per_chunk = 0, None
        while todo:
            n = self.segment_length(list(producers), kept_per_chunk or 0.0, len(todo))
            if kept_per_chunk is None:
                n = 1  # the first segment measures what a chunk leaves behind (features...)
            segment, todo = todo[:n], todo[n:]
            self._say(f"segment: chunks {segment[0]}..{segment[-1]} ({len(todo)} left)")
            for stage in self.activations:
                self.produce(stage, segment)
            for stage in self.features:
                self._run(stage, segment)
            if self.fits:  # every fit in one pass over the segment: each chunk read once
                lifecycle.consume_together(self.fits, store, segment, self.rebuild_stale)
            consumers = self.consumers()  # the fits' units exist now
            self.evict(segment, dense)
            consumed += len(segment)
            if self.max_disk is not None:  # what stays per chunk: features, kept activations...
                kept = self.samples[-1] - self.checkpoint_bytes() - start
                kept_per_chunk = max(kept / consumed, 0.0)

    def produce(self, stage: Any, segment: list[int]) -> None:
        """Compute ``segment`` of an activations stage, noting which chunks this run wrote (or
        wrote again): only those may be evicted."""
        store = self.store
        units = list(stage.units(store))
        present = {
            u: (store.done_chunks(u) - store.evicted_chunks(u)) if store.has(u) else set()
            for u in units
        }
        self._run(stage, segment)
        for unit in units:
            self.computed.setdefault(unit, set()).update(set(segment) - present[unit])

    def _say(self, line: str) -> None:
        """A segment's line, with or without progress bars: a long run is never silent."""
        if self.max_disk is not None:
            used = self.samples[-1] if self.samples else 0
            print(f"{line}; store {human(used)} of {human(self.max_disk)}", file=sys.stderr)

    def evict(self, chunks: list[int], dense: list[str]) -> None:
        """Evict ``chunks`` of ``dense`` that this run computed (never a chunk it found)."""
        if self.max_disk is None:
            return
        store = self.store
        for unit in dense:
            if not store.has(unit):
                continue
            recorded, mine = store.done_chunks(unit), self.computed.get(unit, set())
            for index in chunks:
                if index in recorded and index in mine:  # again for one flagged, not deleted
                    store.evict_chunk(unit, index, ("x",))
        self.used()

    def _build_fits(self, n_chunks: int) -> None:
        """Solve and score every fit whose chunks are all consumed. Their held-out passes need
        B's evicted chunks again: the fits score in lockstep, one thread each, so each segment
        is computed again once for all of them (``Rematerialize``)."""
        scoring = Rematerialize(self, n_chunks)
        for stage in self.fits:
            again = stage.rereads(self.store)
            stage.provider = scoring.join(id(stage), list(again), set().union(*again.values()))
        summaries: dict[int, dict[str, Any]] = {}
        errors: list[BaseException] = []

        import torch

        n_threads = torch.get_num_threads()

        def build(stage: Any) -> None:
            # a new thread's BLAS does not inherit the caller's torch.set_num_threads (seen:
            # eigh differing by 1e-14 after set_num_threads(1)); the same count, the same sums
            torch.set_num_threads(n_threads)
            try:
                with scoring.cond:  # one fit computes at a time: the others wait for chunks
                    summaries[id(stage)] = self._run(stage, collect=False)
            except BaseException as e:  # re-raised by the main thread
                errors.append(e)
                scoring.fail(e)
            finally:
                scoring.leave(id(stage))

        threads = [
            threading.Thread(target=build, args=(s,), name=f"xprobe-fit-{s.cfg.name}")
            for s in self.fits
        ]
        try:
            for thread in threads:
                thread.start()
            for thread in threads:
                while thread.is_alive():
                    thread.join(0.2)  # the main thread stays free for Ctrl-C and signals
        except BaseException as e:
            scoring.fail(e)  # the fits stop at their next chunk; locks are released
            for thread in threads:
                thread.join()
            raise
        finally:
            scoring.close()
            for stage in self.fits:
                stage.provider = None
        if errors:
            raise errors[0]
        for stage in self.fits:
            summary = summaries[id(stage)]
            self.summaries.append(summary)

    def _refuse_global_norms(self) -> None:
        """``exclude_norm_above`` scales by the median norm over the whole corpus, known only
        once a model's activations are complete: a segment's features cannot wait for it."""
        store = self.store
        for stage in self.features + self.fits:
            for unit in stage.needs_complete(store):
                if not (store.has(unit) and store.info(unit).get("complete")):
                    raise XprobeError(
                        f"exclude_norm_above needs the median residual norm of {unit} over the whole "
                        "corpus before anything is encoded or fitted, but a --max-disk run encodes "
                        "and fits each segment as soon as it is stored. Leave exclude_norm_above "
                        "unset in a segmented run, or compute the activations first (without "
                        "--max-disk, or with enough disk for them)."
                    )


class Rematerialize:
    """The held-out passes' chunk provider in a segmented run. Each fit (a thread) asks for
    chunk ``index`` before reading it; if the chunk is there, it goes on. If it was evicted, the
    fit waits until every fit still scoring waits too; then the evicted chunks of the segment
    from the smallest index asked for (as many chunks as the budget holds) are computed again,
    once for all fits, after the previous segment is evicted. Each fit reads its chunks in
    ascending order, so every fit moves forward at each step.

    Only one fit computes at a time: each holds ``cond`` while it runs and releases it only to
    wait, so the fits never compete for the cores or hold their scoring state at the same
    instant, and each computes as it would alone."""

    def __init__(self, run: Segmented, n_chunks: int):
        self.run, self.n_chunks = run, n_chunks
        self.units: dict[int, list[str]] = {}
        self.reads: set[int] = set()  # chunks some fit's held-out pass reads
        self.waiting: dict[int, int] = {}
        self.current: list[int] = []
        self.written: list[str] = []  # units computed again for the current segment
        self.error: BaseException | None = None
        self.cond = threading.Condition()

    def join(self, key: int, units: list[str], reads: set[int]) -> Callable[[int], None]:
        self.units[key] = units
        self.reads |= reads
        return lambda index: self.request(key, index)

    def leave(self, key: int) -> None:
        with self.cond:
            self.units.pop(key, None)
            self.waiting.pop(key, None)
            self.cond.notify_all()

    def fail(self, error: BaseException) -> None:
        self.error = self.error or error  # seen by the running fit at its next chunk
        with self.cond:
            self.cond.notify_all()

    def request(self, key: int, index: int) -> None:
        with self.cond:
            while True:
                if self.error is not None:
                    raise XprobeError(f"stopped: another fit of the run failed ({self.error!r})")
                if not self._evicted(self.units[key], index):
                    self.waiting.pop(key, None)
                    return
                self.waiting[key] = index
                # advance only when every fit still scoring waits on a chunk that is evicted
                # now: a fit woken by the last advance (its chunk is back) has yet to read it
                blocked = {k: i for k, i in self.waiting.items() if self._evicted(self.units[k], i)}
                if set(blocked) >= set(self.units):
                    try:
                        self._advance(min(blocked.values()))
                    except BaseException as e:
                        self.error = e
                        self.cond.notify_all()
                        raise
                    self.cond.notify_all()
                    continue
                self.cond.wait()

    def _evicted(self, units: list[str], index: int) -> bool:
        store = self.run.store
        return any(
            "x" in ((store.chunk_record(u, index) or {}).get("evicted") or ()) for u in units
        )

    def _advance(self, index: int) -> None:
        """Evict the current segment, compute again the one from ``index``."""
        store = self.run.store
        wanted = sorted({u for units in self.units.values() for u in units})
        producers = self.run.producers()
        orphans = [u for u in wanted if u not in producers and self._evicted([u], index)]
        if orphans:
            raise XprobeError(
                f"chunk {index} of {orphans[0]} was evicted after a segmented run, and no "
                "activations section of this config computes it: add that section back so that "
                "`xprobe run` can compute the evicted chunks again"
            )
        self.close()
        stages = list({id(producers[u]): producers[u] for u in wanted if u in producers}.values())
        written = [u for stage in stages for u in stage.units(store)]
        ahead = sorted(i for i in self.reads if i >= index)  # the chunks some fit will read
        n = self.run.segment_length(written, 0.0, len(ahead))
        consumed = self.run.consumers()  # outputs no configured stage reads were never evicted
        self.written = [u for u in written if u in consumed]
        segment = ahead[:n]
        for stage in stages:
            self.run.produce(stage, segment)
        self.current = segment

    def close(self) -> None:
        if self.current:
            self.run.evict(self.current, self.written)
            self.current = []


def _itemsize(dtype: str) -> int:
    return {"float32": 4, "float16": 2, "bfloat16": 2}.get(dtype, 4)


def run_config(
    planned: Sequence[tuple[Any, Any, Any]],
    store: Store,
    max_disk: int | None,
    force: bool = False,
    rebuild_stale: bool = False,
    progress: bool = True,
) -> list[dict[str, Any]]:
    """``xprobe run`` in segments: tokenize, then the segmented stages, then the rest."""
    summaries = []
    roles: dict[str, list[Any]] = {"activations": [], "features": [], "fit": []}
    rest = []
    for entry, cfg, run_fn in planned:
        if entry.name == "tokenize":
            summaries.append(run_fn(cfg, store, force=force, rebuild_stale=rebuild_stale))
        elif entry.name in roles:
            roles[entry.name].append(entry.load_stage()(cfg))
        else:
            rest.append((cfg, run_fn))
    if roles["activations"]:
        segmented = Segmented(
            store,
            max_disk,
            roles["activations"],
            roles["features"],
            roles["fit"],
            force=force,
            rebuild_stale=rebuild_stale,
            progress=progress,
        )
        summaries += segmented.run()
    else:
        for stage in roles["features"] + roles["fit"]:
            summaries.append(lifecycle.run(stage, store, force=force, rebuild_stale=rebuild_stale))
    for cfg, run_fn in rest:
        summaries.append(run_fn(cfg, store, force=force, rebuild_stale=rebuild_stale))
    return summaries


def needs_segments(planned: Sequence[tuple[Any, Any, Any]], store: Store) -> bool:
    """Whether a run without ``--max-disk`` must still go by segments: a configured stage reads
    a dense unit that has evicted chunks (from an earlier segmented run)."""
    for entry, cfg, _ in planned:
        if entry.name != "activations":
            continue
        stage = entry.load_stage()(cfg)
        try:
            units = [stage.unit_of(layer, kind) for layer, kind in stage.wanted()]
        except Exception:  # noqa: BLE001 - a bad model path: the stage's own run says so
            continue
        if any(store.has(u) and store.evicted_chunks(u) for u in units):
            return True
    return False

"""The stage contract: what every stage declares, in one of two shapes.

A stage writes one or more *units* of the store. It declares them (``units``), the inputs they
are computed from (``inputs``: store units, models, SAEs, corpus files, tokenizers; see
``pipeline.lineage``), and checks what it needs before anything is written (``validate``). The
lifecycle (``pipeline.lifecycle.run``) does everything else, the same way for every stage: locks,
refusing another config, lineage (a unit whose inputs changed is stale, never complete),
creating units with their provenance, resuming, marking complete.

Two shapes of work:

- ``ChunkedStage`` (tokenize, activations, features) computes whole chunks of sequences, each
  written and recorded on its own (``prepare``, ``compute``, ``finalize``), so a rerun does only
  the missing chunks and chunks can run as tasks on a dask cluster.
- ``WholeStage`` (fit, match, report) builds its unit from a pass over its inputs (``build``,
  which resumes from its own checkpoint, ``pipeline.store.checkpoint``); ``publish`` runs after
  every run, complete or already complete (the report renders its files there).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, ClassVar

from pipeline.lineage import Input
from pipeline.store import Store
from pipeline.store.chunks import ChunkResult


@dataclass(frozen=True)
class DiskReserve:
    """Bytes a stage's checkpoint takes now (``checkpoint_now``) and at most (``checkpoint``,
    from the widths), and what its outputs will take (``outputs``; 0 once complete)."""

    checkpoint_now: int = 0
    checkpoint: int = 0
    outputs: int = 0


class Stage(ABC):
    """One step of the pipeline. Subclasses set ``name`` and implement the abstract methods."""

    name: ClassVar[str]

    def __init__(self, cfg: Any):
        self.cfg = cfg

    @abstractmethod
    def units(self, store: Store) -> dict[str, dict[str, Any]]:
        """Unit paths this stage writes, each with its stage-specific provenance facts."""

    @abstractmethod
    def inputs(self, store: Store) -> dict[str, Input]:
        """What the units are computed from, by name (``pipeline.lineage``); called after
        ``validate``, before anything is done or skipped."""

    segment: list[int] | None = None
    """Set by the lifecycle: the chunks a segmented run (``pipeline.segments``) does now, or None
    for a whole run. Within a segment, input units need only these chunks, not be complete."""

    recompute_on_config_change: ClassVar[bool] = False
    """True for a unit that is only a cache (the report's pass): another config recomputes it
    instead of being refused."""

    def validate(self, store: Store) -> None:
        """Check inputs before anything is written; raise XprobeError with what to do."""

    def identity(self) -> Any:
        """What the units' config fingerprint covers: the config (runtime fields excluded)."""
        return self.cfg

    # ---- what a segmented run (pipeline.segments) asks of a stage ----------------------------
    def dense_reads(self, store: Store) -> list[str]:
        """Dense units (activations) this stage reads, which a segmented run may evict once
        every stage reading them has consumed a chunk; called after ``validate``."""
        return []

    def consumed_chunks(self, store: Store) -> set[int]:
        """Chunks of ``dense_reads`` this stage has consumed for good (durably recorded)."""
        return set()

    def needs_complete(self, store: Store) -> list[str]:
        """Units that must be complete before this stage can take a segment (e.g. a threshold
        computed over the whole corpus), so a segmented run refuses before it starts."""
        return []


class ChunkedStage(Stage):
    """A stage whose units are written chunk by chunk (one chunk = ``chunk_seqs`` sequences)."""

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


class WholeStage(Stage):
    """A stage that writes each unit from one accumulated pass (fit, match, report)."""

    can_publish_read_only: ClassVar[bool] = False
    """Whether ``publish`` can run on a read-only store whose unit is missing (computing in
    memory what it would have cached)."""

    @abstractmethod
    def build(self, store: Store, client: Any = None) -> tuple[int, dict[str, Any]]:
        """Compute and write the unit(s), resuming from a checkpoint if there is one; return the
        number of chunks read and the facts to record at completion."""

    consumes_chunks: ClassVar[bool] = False
    """Whether the stage can take its input chunks a segment at a time (``consume``), so that
    a segmented run (``pipeline.segments``) can evict them before the whole corpus is read."""

    def consume(self, store: Store, chunks: list[int], client: Any = None) -> int:
        """Add ``chunks`` (those not yet consumed) to the unit's checkpoint; return how many."""
        raise NotImplementedError(f"stage {self.name} cannot consume its input by segments")

    @classmethod
    def consume_all(
        cls, stages: list[WholeStage], store: Store, chunks: list[int]
    ) -> dict[str, int]:
        """Several stages of this kind consume ``chunks`` (``lifecycle.consume_together``); by
        default one after the other. Returns the chunks each consumed, by stage name."""
        return {f"{s.name} {i}": s.consume(store, chunks) for i, s in enumerate(stages)}

    provider: Callable[[int], None] | None = None
    """Set by a segmented run: called with a chunk index before a pass after consumption
    (``rereads``) reads it, to compute it again if it was evicted."""

    def rereads(self, store: Store) -> dict[str, set[int]]:
        """Dense units read again after every chunk is consumed (the fit's held-out pass reads
        B's hooks), each with the chunks read, through ``provider``."""
        return {}

    def disk_reserve(self, store: Store) -> DiskReserve:
        """What the stage still writes besides its inputs' chunks, for a segmented run's budget."""
        return DiskReserve()

    def publish(self, store: Store, summary: dict[str, Any]) -> dict[str, Any]:
        """After the units are complete (now or before): anything rebuilt on every run."""
        return summary

"""The causal table of ``xprobe export --causal`` as a store unit, through the stage lifecycle.

Reads the fit ``probes/<fit>/<hook>/{direction,write_direction,status,r2_held_out}`` [F], the
report's table (presence scores and classes, when the score is presence), A's features, the
tokens and the models A and B (:func:`pipeline.export.causal.causal_agreement`). Writes the unit
``causal/<fit>/<hook>/``, one row per measured feature:
    feature, n_contexts [n] int64; alpha, score, cos_steer, cos_null, abs_cos_null, z_steer,
    dloss_probe, dloss_write, dloss_random [n] float64; top [n] bool (else a random other)
Its config is :class:`CausalConfig` (the causal settings), its lineage the fit's content
fingerprint; ``pipeline.lifecycle.run`` locks it, refuses other settings (``force`` starts it
over), marks it complete with its checksums and serves a complete one as already complete, as
for every stage. A unit whose fit was recomputed since is stale. The report reads it
(``pipeline.report.causal``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from pipeline import lifecycle
from pipeline.config import check_fields, runtime
from pipeline.errors import XprobeError
from pipeline.export.sae import NOT_PRESENT, FitSource, presence_classes, presence_scores
from pipeline.lineage import Input, unit_input
from pipeline.maths.lstsq import STATUS_OK
from pipeline.report.causal import COLUMNS, causal_unit, read_table
from pipeline.stage import WholeStage
from pipeline.store import Store
from pipeline.store.layout import probes_unit, safe_name

SCORES = ("presence", "r2_held_out")


@dataclass(frozen=True)
class CausalConfig:
    fit: str
    """The fit measured (``probes/<fit>``)."""
    hook: str
    """B's hook of the fit (``causal/<fit>/<hook>``)."""
    n: int
    """Features measured: the ``n`` scored highest and ``n`` others drawn at random (seed 0)."""
    n_contexts: int = 8
    """Held-out contexts per feature where it fires in A."""
    score: str = "presence"
    """What ranks the features: ``presence`` (from the report) or ``r2_held_out`` (the probe's)."""
    report: str | None = None
    """The report whose presence scores (and classes) are used; with ``score = "presence"``."""
    present_at: float | None = None
    """The others are drawn among features with presence below this point score; unset: among
    those the report classes "partial" or "absent" (the whole interval below its present_at).
    With ``score = "r2_held_out"``: among those outside the top ``n``."""
    device: str = runtime("cpu", "torch device")

    def __post_init__(self) -> None:
        check_fields(self)
        if self.n < 1 or self.n_contexts < 1:
            raise XprobeError(
                f"--causal and --causal-contexts must be >= 1, got {self.n}, {self.n_contexts}"
            )
        if self.score not in SCORES:
            raise XprobeError(f"the causal score must be one of {SCORES}, not {self.score!r}")
        if (self.score == "presence") != (self.report is not None):
            raise XprobeError("a causal table ranked by presence names its report, and only then")
        if self.score != "presence" and self.present_at is not None:
            raise XprobeError("present_at draws the others by presence: it needs score presence")

    @classmethod
    def of_selection(
        cls, fit: str, hook: str, selection: dict[str, Any], n: int, n_contexts: int, device: str
    ) -> CausalConfig:
        """The causal settings that go with the export's feature ``selection``
        (``pipeline.export.sae.select_features``): features ranked by the score it kept them by,
        the others drawn below its threshold (presence, or the report's class)."""
        if selection["by"] == "r2_held_out":
            return cls(fit, hook, n, n_contexts, "r2_held_out", device=device)
        present_at = selection.get("present_at") if selection["by"] == "presence" else None
        return cls(fit, hook, n, n_contexts, "presence", selection["report"], present_at, device)


def choose_features(
    source: FitSource, cfg: CausalConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(top, others, score)``: the ``cfg.n`` ok probes scored highest (ties: lower id first),
    ``cfg.n`` others drawn (seeded) among the ok scored ones below the threshold
    (:class:`CausalConfig`), both ``[<= n]`` int64, and the score of every feature ``[F]``."""
    ok = source.probe("status") == STATUS_OK
    if cfg.score == "presence":
        score, _ = presence_scores(source, cfg.report)
    else:
        score = np.where(ok, source.probe("r2_held_out"), np.nan)
    scored = np.flatnonzero(np.isfinite(score) & ok)
    top = scored[np.argsort(-score[scored], kind="stable")[: cfg.n]]
    rest = np.setdiff1d(scored, top)
    if cfg.score == "presence" and cfg.present_at is not None:
        rest = rest[score[rest] < cfg.present_at]
    elif cfg.score == "presence":
        classes, _ = presence_classes(source, cfg.report)
        rest = rest[np.isin(classes[rest], NOT_PRESENT)]
    others = np.random.default_rng(0).choice(rest, size=min(cfg.n, len(rest)), replace=False)
    return top.astype(np.int64), others.astype(np.int64), score


def measure_table(source: FitSource, cfg: CausalConfig) -> Any:
    """The causal table of ``cfg`` (pandas DataFrame, ``pipeline.report.causal.TABLE_ORDER``):
    :func:`pipeline.export.causal.causal_agreement` of the chosen features, with their group
    (``top`` or ``other``) and score."""
    from pipeline.export.causal import causal_agreement
    from pipeline.report.causal import TABLE_ORDER

    top, others, score = choose_features(source, cfg)
    features = np.sort(np.concatenate([top, others]))
    table = causal_agreement(source, features, cfg.n_contexts, cfg.device)
    table.insert(1, "group", np.where(np.isin(table["feature"], top), "top", "other"))
    table.insert(2, "score", score[table["feature"].to_numpy()])
    return table[list(TABLE_ORDER)]


class CausalStage(WholeStage):
    """The export's causal table of one fit at one hook, as a unit of the lifecycle."""

    name = "export"
    cfg: CausalConfig

    def validate(self, store: Store) -> None:
        self.source = FitSource.resolve(store, self.cfg.fit, self.cfg.hook)
        self.unit = causal_unit(self.cfg.fit, self.cfg.hook)
        legacy = f"causal/{safe_name(self.cfg.fit)}"
        if store.has(legacy) and "xprobe" in store.group(legacy).attrs:
            raise XprobeError(
                f"{legacy} holds causal tables recorded by an older xprobe (one unit per fit, "
                f"now one per fit and hook): remove the folder {legacy} of the store and run "
                "the export again"
            )

    def units(self, store: Store) -> dict[str, dict[str, Any]]:
        return {self.unit: {"fit": self.cfg.fit, "hook": self.cfg.hook}}

    def inputs(self, store: Store) -> dict[str, Input]:
        return {"fit": unit_input(store, probes_unit(self.cfg.fit))}

    def build(self, store: Store, client: Any = None) -> tuple[int, dict[str, Any]]:
        table = measure_table(self.source, self.cfg)
        prov = store.info(self.unit)
        arrays = {c: table[c].to_numpy() for c in COLUMNS}
        arrays["top"] = (table["group"] == "top").to_numpy()
        for name, value in arrays.items():
            value = np.ascontiguousarray(value)
            path = f"{self.unit}/{name}"
            if store.has_local(path):
                store.delete(path)  # left by an attempt that did not complete
            chunks = (max(1, len(value)),)
            store.create_array(path, value.shape, chunks, value.dtype, prov)[...] = value
        return 1, {"n_features": len(table)}

    def publish(self, store: Store, summary: dict[str, Any]) -> dict[str, Any]:
        """The recorded table (``table``), read back from the unit, complete now or before."""
        return {**summary, "unit": self.unit, "table": read_table(store, self.unit)}


def writable(store: Store) -> bool:
    """Whether the causal table can be recorded in ``store`` (a local folder open for writing)."""
    return store.local_path is not None and store.mode != "r"


def check_recordable(store: Store, cfg: CausalConfig, force: bool) -> bool:
    """Before the export does any work: refuse a recorded table of ``cfg.fit`` at ``cfg.hook``
    with other settings, or a stale one, unless ``force`` (the lifecycle's refusal, one line).
    Returns whether the run must start the unit over: only then does ``force`` reach the
    lifecycle, so a table recorded with these settings from the current fit is reused."""
    stage = CausalStage(cfg)
    (state,) = lifecycle.plan(stage, store)
    if state.state == "config" and not force:
        raise lifecycle.refusal(stage, state)
    if state.state == "stale" and state.stale is not None:
        if state.stale.via is not None:  # the fit itself is stale: recompute it first
            raise lifecycle.refusal(stage, state)
        if not force:
            raise XprobeError(
                f"{state.unit} is stale: {state.stale.reason()}. Run the export again with "
                "--force to measure it again from the current fit"
            )
    return force and state.state != "complete"


def record(store: Store, cfg: CausalConfig, force: bool = False) -> dict[str, Any]:
    """Measure and record the causal table of ``cfg`` in ``store`` through the lifecycle, or
    serve the one recorded with these settings (``already_complete``). Returns the lifecycle's
    summary with ``unit`` and ``table``."""
    return lifecycle.run(CausalStage(cfg), store, force=force, progress=False)

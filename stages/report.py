"""Report stage: presence scores against controls, a per-feature table and one HTML page.

Reads the fits ``probes/<fit>/<hook>/{r2_held_out,status,...}`` of the models B, of the ceiling
(A → A at the SAE's hook) and of the floor (a randomly initialised model), A's features
``feats/<corpus>/<sae>/{idx,val,stats/*,transfer/*}`` and the tokens ``tokens/<corpus>``.
One pass over tokens and features (no activations) accumulates the token baseline and each
feature's top-activating tokens (see pipeline/maths/presence.py); it is cached in ``report/<name>/``:
    token_r2 [F] float64, top_value [F, n_contexts] float64, top_token [F, n_contexts] int64
through the lifecycle (its lineage: the tokens and the features; a change of split, n_contexts
or token_baseline redoes it without asking: it is a cache). Everything else is rebuilt on every
run (seconds): ``table.parquet``, ``table.csv`` (one row per feature) and
``report.html`` (self-contained) in ``out_dir`` (default ``STORE/report/<name>/``). With
``matches``, each named match stage result ``matches/<name>/{best_idx,best_corr,mutual}`` [F]
(A's side: these features; B's side: the SAE of one of the models B) is put beside the probes.
The report itself lives in ``pipeline/report/``: model.py (roles, the pass, the summary),
table.py (the table), match.py (pairing the matches with the fits), html.py (the page, with
plots.py and cards.py).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import check_fields, fingerprint, path_field, runtime
from pipeline.errors import XprobeError
from pipeline.lineage import Input, unit_input
from pipeline.report.model import Report
from pipeline.stage import WholeStage
from pipeline.store import Store
from pipeline.store.io import new_temp_file


@dataclass(frozen=True)
class ReportConfig:
    corpus: str
    """Corpus the fits were computed on (``tokens/<corpus>``)."""
    features: str
    """Store name of A's SAE features (``feats/<corpus>/<features>``)."""
    fits: tuple[str, ...]
    """Fits of the models B to report (``probes/<fit>``), in display order."""
    ceiling: str | None = None
    """Fit of A on itself at the SAE's hook (the ceiling). Default: the one fit in the store with
    A's model, these features and the SAE's hook."""
    floor: str | None = None
    """Fit of a randomly initialised model with B's architecture (the floor); optional."""
    name: str = "main"
    """Name of the report (``report/<name>`` in the store)."""
    token_baseline: bool = True
    """Score against the token baseline (per-token-id mean, and the ``token_fits``); off:
    presence = R²_B / R²_ceiling."""
    token_fits: tuple[str, ...] = ()
    """Fits of token-only streams (``context = "token"`` activations: each token read alone)
    whose held-out R² compete with the per-id mean as the token baseline, per feature and per
    bootstrap replicate. ``xprobe run`` derives them for A and every model B (pipeline/controls.py)
    unless this is written (``[]``: none)."""
    present_at: float = 0.7
    """Presence score at or above which a feature counts as present."""
    partial_at: float = 0.3
    """Presence score at or above which (and below present_at) a feature counts as partial."""
    confidence: float = 0.95
    """Coverage of the bootstrap intervals (the fits' ``n_bootstrap`` replicates); a class is given
    only when the presence interval lies in one band, otherwise the feature is "undetermined"."""
    min_headroom: float = 0.05
    """Score a feature only where R²_ceiling exceeds max(R²_token, 0) by at least this much."""
    same_basis: bool | tuple[str, ...] | None = None
    """Whether the models B are in A's basis (A itself, a finetune of A), which the weight-space
    baselines (Latent Scaling, cosines with A's encoder and decoder rows) need: true (all fits),
    false (none), a list of fit names (those; the others decided from the data), or unset: decided
    per fit from the data (B's width is A's and its probe directions agree with the ceiling's:
    pipeline/report/table.py, ``basis_of``). Out of A's basis those columns are NaN, with the
    reason in ``<fit>_basis_reason``."""
    encoder_cosine: bool = True
    """Load the SAE and record the cosine of each ceiling direction with its encoder row."""
    n_shown: int = 8
    """Features shown with contexts in the HTML, for each B: the most and the least present."""
    n_contexts: int = 4
    """Top-activating contexts kept per feature."""
    matches: tuple[str, ...] = ()
    """Match stage results to set beside the probes (``matches/<name>``; its ``features_a`` must be
    these features): ``"NAME"`` pairs it with the fit in ``fits`` of the model that B's SAE was
    run on, ``"NAME:FIT"`` names that fit (needed when no fit, or several, probe that model)."""
    match_at: float = 0.5
    """Best-match correlation at or above which a feature counts as matched by B's SAE."""
    context_before: int = runtime(12, "tokens shown before the activating token")
    context_after: int = runtime(4, "tokens shown after the activating token")
    out_dir: str | None = path_field(
        None, runtime=True, doc="folder for table.parquet/csv and report.html"
    )
    html: str | None = path_field(
        None, runtime=True, doc="path of the HTML report (default OUT_DIR/report.html)"
    )
    progress: bool = runtime(True, "show a progress bar")

    def __post_init__(self) -> None:
        check_fields(self)
        if not 0 <= self.partial_at <= self.present_at <= 1:
            raise XprobeError(
                f"need 0 <= partial_at <= present_at <= 1, got {self.partial_at}, {self.present_at}"
            )
        if not 0 < self.confidence < 1:
            raise XprobeError(f"confidence must be in (0, 1), got {self.confidence}")
        if not 0 < self.match_at <= 1:
            raise XprobeError(f"match_at must be in (0, 1], got {self.match_at}")
        if self.n_contexts < 1 or self.n_shown < 0:
            raise XprobeError("n_contexts must be >= 1 and n_shown >= 0")
        if not self.fits:
            raise XprobeError("the report needs at least one fit of a model B (fits = [...])")
        if len(set(self.matches)) != len(self.matches):
            raise XprobeError(f"matches names a match twice: {list(self.matches)}")


def _shown(path: Path) -> Path:
    """``path`` relative to the working directory when it is below it (shorter to read)."""
    try:
        return path.resolve().relative_to(Path.cwd())
    except ValueError:
        return path


def _write_atomic(path: Path, data: bytes) -> None:
    """``data`` to ``path`` through a temp file beside it (mkstemp: O_EXCL, a random name, so no
    planted symlink is followed), renamed over it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = new_temp_file(path)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _publish(files: dict[Path, bytes]) -> str:
    """Write the report's files, each unless it already holds exactly these bytes: a complete
    report is served, not rewritten. Where they cannot be written (a read-only store), files
    whose table is unchanged are served as they are (the page may name the store otherwise);
    a table that must change but cannot is one ``XprobeError``. Returns a note for the summary."""
    import errno

    changed = {p: d for p, d in files.items() if not (p.is_file() and p.read_bytes() == d)}
    try:
        for path, data in changed.items():
            _write_atomic(path, data)
    except OSError as e:
        if e.errno not in (errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOSPC):
            raise
        table = next(iter(files))
        if table not in changed and all(p.is_file() for p in files):
            return f" [served as written: {e.strerror}]"
        why = "the disk is full" if e.errno == errno.ENOSPC else e.strerror
        raise XprobeError(
            f"the report's table in {table.parent} must be rewritten (its fits or settings "
            f"changed) but cannot be ({why}): set out_dir (and html) to a writable folder"
        ) from None
    return ""


class ReportStage(WholeStage):
    """The report as a stage of the lifecycle. Its unit ``report/<name>`` caches the one pass
    over tokens and features (computed from them alone: they are its lineage); the table and the
    page are rendered from the current fits on every run (``publish``)."""

    name = "report"
    cfg: ReportConfig
    can_publish_read_only = True  # a shared read-only store: the pass is done in memory
    recompute_on_config_change = True  # the unit is a cache of the pass, keyed on its settings

    def validate(self, store: Store) -> None:
        self.report = Report(self.cfg, store)
        self.facts = self.report.validate()

    def identity(self) -> dict[str, Any]:
        """The cached pass depends on the features, the split and these two settings only:
        thresholds, fits and display options change the page, not the unit."""
        cfg = self.cfg
        return {
            "corpus": cfg.corpus,
            "features": cfg.features,
            "split": list(self.report.split),
            "n_contexts": cfg.n_contexts,
            "token_baseline": cfg.token_baseline,
            "n_bootstrap": self.report.n_boot,
        }

    def units(self, store: Store) -> dict[str, dict[str, Any]]:
        return {self.report.unit: self.facts}

    def inputs(self, store: Store) -> dict[str, Input]:
        return {
            "tokens": unit_input(store, self.report.tokens),
            "features": unit_input(store, self.report.feats),
        }

    def build(self, store: Store, client: Any = None) -> tuple[int, dict[str, Any]]:
        arrays, n_chunks = self.report.scan_pass(self.facts["n_feat"])
        prov = store.info(self.report.unit)
        for name, value in arrays.items():
            path = f"{self.report.unit}/{name}"
            chunks = tuple(max(1, n) for n in value.shape)  # [F, 0] without replicates
            store.create_array(path, value.shape, chunks, value.dtype, prov)[...] = value
        self.scanned = arrays
        return n_chunks, {}

    def _scan(self, store: Store) -> dict[str, np.ndarray]:
        if getattr(self, "scanned", None) is not None:
            return self.scanned
        unit = self.report.unit
        info = store.info(unit) if store.has(unit) else {}
        if info.get("complete") and info.get("config_fingerprint") == fingerprint(self.identity()):
            return {n: store.array(f"{unit}/{n}")[:] for n in SCAN_ARRAYS}
        arrays, self.n_read = self.report.scan_pass(self.facts["n_feat"])  # read-only, uncached
        return arrays

    def publish(self, store: Store, summary: dict[str, Any]) -> dict[str, Any]:
        from pipeline.report.html import render_html

        report, cfg = self.report, self.cfg
        if cfg.out_dir is None and not report.writable:
            raise XprobeError(f"store {store.url} is read-only: set out_dir for the report's files")
        out_dir = Path(cfg.out_dir) if cfg.out_dir else store.local_path / report.unit
        html_path = Path(cfg.html) if cfg.html else out_dir / "report.html"
        fresh = getattr(self, "scanned", None) is not None or not report.writable
        scan = self._scan(store)
        df, notes = report.table(scan)
        text = report.summary_text(df)
        parquet = io.BytesIO()
        df.to_parquet(parquet, index=False)
        notes["table"] = str(out_dir / "table.parquet")
        page = render_html(report, df, scan, notes, text)
        served = _publish(
            {
                out_dir / "table.parquet": parquet.getvalue(),  # first: the one that must hold
                out_dir / "table.csv": df.to_csv(index=False).encode(),
                html_path: page.encode("utf-8"),
            }
        )
        message = (
            f"report: {_shown(html_path)}\n        {_shown(out_dir / 'table.parquet')} (and table.csv)"
            + ("" if fresh else " [token baseline and contexts from the cache]")
            + served
            + "\n"
            + text
        )
        return {
            **summary,
            "chunks_written": summary["chunks_written"] or getattr(self, "n_read", 0),
            "already_complete": False,
            "message": message,
            "html": str(html_path),
            "table": str(out_dir / "table.parquet"),
        }


SCAN_ARRAYS = ("token_r2", "token_r2_boot", "top_value", "top_token")


def run(
    cfg: ReportConfig, store: Store, force: bool = False, rebuild_stale: bool = False
) -> dict[str, Any]:
    """Build the report; ``force`` also redoes the cached pass over tokens and features."""
    from pipeline import lifecycle

    return lifecycle.run(
        ReportStage(cfg), store, force=force, rebuild_stale=rebuild_stale, progress=cfg.progress
    )

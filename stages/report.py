"""Report stage: presence scores against controls, a per-feature table and one HTML page.

Reads the fits ``probes/<fit>/<hook>/{r2_held_out,status,...}`` of the models B, of the ceiling
(A → A at the SAE's hook) and of the floor (a randomly initialised model), A's features
``feats/<corpus>/<sae>/{idx,val,stats/*,transfer/*}`` and the tokens ``tokens/<corpus>``.
One pass over tokens and features (no activations) accumulates the token baseline and each
feature's top-activating tokens (see pipeline/maths/presence.py); it is cached in ``report/<name>/``:
    token_r2 [F] float64, top_value [F, n_contexts] float64, top_token [F, n_contexts] int64
and redone only when the features, the split or n_contexts change. Everything else is rebuilt
on every run (seconds): ``table.parquet``, ``table.csv`` (one row per feature) and
``report.html`` (self-contained) in ``out_dir`` (default ``STORE/report/<name>/``). With
``matches``, each named match stage result ``matches/<name>/{best_idx,best_corr,mutual}`` [F]
(A's side: these features; B's side: the SAE of one of the models B) is put beside the probes.
Helpers of this stage: report_table.py (the table), report_match.py (pairing the matches with
the fits), report_html.py (the page, with report_plots.py and report_cards.py).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import canonical, fingerprint, runtime
from pipeline.errors import XprobeError
from pipeline.maths.evaluate import bootstrap_weights
from pipeline.maths.presence import (
    CLASSES,
    TokenBaseline,
    TokenBaselineReplicates,
    TokenPredictor,
    TopActivations,
)
from pipeline.maths.split import held_out_sequences
from pipeline.report.match import agreement_line, pair_match
from pipeline.report.table import feature_table
from pipeline.store import Store
from pipeline.store.io import provenance
from pipeline.store.layout import feats_unit, probes_unit, safe_name, tokens_unit
from pipeline.store.sparse import load_sparse


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
    """Score against the token baseline (per-token-id mean); off: presence = R²_B / R²_ceiling."""
    present_at: float = 0.7
    """Presence score at or above which a feature counts as present."""
    partial_at: float = 0.3
    """Presence score at or above which (and below present_at) a feature counts as partial."""
    confidence: float = 0.95
    """Coverage of the bootstrap intervals (the fits' ``n_bootstrap`` replicates); a class is given
    only when the presence interval lies in one band, otherwise the feature is "undetermined"."""
    min_headroom: float = 0.05
    """Score a feature only where R²_ceiling exceeds max(R²_token, 0) by at least this much."""
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
    out_dir: str | None = runtime(None, "folder for table.parquet/csv and report.html")
    html: str | None = runtime(None, "path of the HTML report (default OUT_DIR/report.html)")
    progress: bool = runtime(True, "show a progress bar")


@dataclass
class Role:
    """One fit as the report uses it."""

    label: str  # column prefix: the fit name, or "ceiling" / "floor"
    fit: str
    model: str
    hooks: list[str]


class Report:
    def __init__(self, cfg: ReportConfig, store: Store):
        if not 0 <= cfg.partial_at <= cfg.present_at <= 1:
            raise XprobeError(
                f"need 0 <= partial_at <= present_at <= 1, got {cfg.partial_at}, {cfg.present_at}"
            )
        if not 0 < cfg.confidence < 1:
            raise XprobeError(f"confidence must be in (0, 1), got {cfg.confidence}")
        if not 0 < cfg.match_at <= 1:
            raise XprobeError(f"match_at must be in (0, 1], got {cfg.match_at}")
        if cfg.n_contexts < 1 or cfg.n_shown < 0:
            raise XprobeError("n_contexts must be >= 1 and n_shown >= 0")
        self.cfg, self.store = cfg, store
        self.unit = f"report/{safe_name(cfg.name)}"
        self.tokens = tokens_unit(cfg.corpus)
        self.feats = feats_unit(cfg.corpus, cfg.features)
        self.writable = store.local_path is not None and store.mode != "r"  # caches go here

    # ---- inputs ---------------------------------------------------------------------------------
    def _fit_info(self, fit: str) -> dict[str, Any]:
        unit = probes_unit(fit)
        if not self.store.has(unit) or not self.store.info(unit).get("complete"):
            raise XprobeError(f"{unit} is not in the store or not complete; run the fit {fit!r}")
        info = self.store.info(unit)
        config = info["config"]
        if config["corpus"] != self.cfg.corpus or config["features"] != self.cfg.features:
            raise XprobeError(
                f"fit {fit!r} probes features {config['features']!r} on corpus {config['corpus']!r}, "
                f"but the report is for {self.cfg.features!r} on {self.cfg.corpus!r}"
            )
        return info

    def _find_ceiling(self, a_model: str, sae_hook: str) -> str:
        if self.cfg.ceiling:
            return self.cfg.ceiling
        found = [
            unit.removeprefix("probes/")
            for unit, info in self.store.units()
            if info.get("stage") == "fit"
            and info["config"]["corpus"] == self.cfg.corpus
            and info["config"]["features"] == self.cfg.features
            and safe_name(info["config"]["model"]) == safe_name(a_model)
            and sae_hook in info["config"]["hooks"]
        ]
        if len(found) != 1:
            raise XprobeError(
                (f"several fits could be the ceiling ({found}); set ceiling = NAME in [report]")
                if found
                else "the report needs the ceiling, a fit of A on itself at the SAE's hook. Add\n"
                f'  [[fit]]\n  name = "ceiling"\n  corpus = "{self.cfg.corpus}"\n'
                f'  features = "{self.cfg.features}"\n  model = "{a_model}"\n'
                f'  hooks = ["{sae_hook}"]\nto the config (same split as the other fits) and run it.'
            )
        return found[0]

    def validate(self) -> dict[str, Any]:
        store, cfg = self.store, self.cfg
        for unit, what in [(self.tokens, "tokenize"), (self.feats, "features")]:
            if not store.has(unit) or not store.info(unit).get("complete"):
                raise XprobeError(f"{unit} is not in the store or not complete; run {what} first")
        if not cfg.fits:
            raise XprobeError("the report needs at least one fit of a model B (fits = [...])")
        feats = store.info(self.feats)
        a_model, sae_hook = feats["model"], feats["hook"]
        ceiling = self._find_ceiling(a_model, sae_hook)
        cinfo = self._fit_info(ceiling)
        if (
            safe_name(cinfo["config"]["model"]) != safe_name(a_model)
            or sae_hook not in (cinfo["config"]["hooks"])
        ):
            raise XprobeError(
                f"the ceiling fit {ceiling!r} must probe A ({a_model!r}) at the SAE's hook "
                f"{sae_hook!r}; it probes {cinfo['config']['model']!r} at {cinfo['config']['hooks']}"
            )
        split = (cinfo["config"]["held_out_fraction"], cinfo["config"]["split_seed"])
        n_boot = int(cinfo["config"].get("n_bootstrap", 0))
        roles = [Role("ceiling", ceiling, a_model, [sae_hook])]
        named = [(fit, fit) for fit in cfg.fits if fit not in (ceiling, cfg.floor)]
        if cfg.floor:
            named.append(("floor", cfg.floor))
        for label, fit in named:
            info = self._fit_info(fit)
            if (info["config"]["held_out_fraction"], info["config"]["split_seed"]) != split:
                raise XprobeError(
                    f"fit {fit!r} uses another held-out split than the ceiling {ceiling!r} "
                    f"(held_out_fraction, split_seed = {split}); refit it with the same split"
                )
            if int(info["config"].get("n_bootstrap", 0)) != n_boot:
                raise XprobeError(
                    f"fit {fit!r} has n_bootstrap = {info['config'].get('n_bootstrap', 0)} but the "
                    f"ceiling {ceiling!r} has {n_boot}: intervals combine the fits replicate by "
                    "replicate; refit with the same n_bootstrap"
                )
            roles.append(Role(label, fit, info["config"]["model"], list(info["config"]["hooks"])))
        if len(roles) == 1:
            raise XprobeError("fits lists only the ceiling/floor; add the fit of a model B")
        self.roles, self.split, self.n_boot = roles, split, n_boot
        self.match_roles = [pair_match(self, spec, int(feats["n_feat"])) for spec in cfg.matches]
        if len({m.name for m in self.match_roles}) < len(self.match_roles):
            raise XprobeError(f"matches names a match twice: {list(cfg.matches)}")
        tokens = store.info(self.tokens)
        return {
            "corpus": cfg.corpus,
            "sae": cfg.features,
            "model": a_model,
            "hook": sae_hook,
            "n_feat": int(feats["n_feat"]),
            "fits": {r.label: r.fit for r in roles},
            "matches": {m.name: m.role.fit for m in self.match_roles},
            "held_out_fraction": split[0],
            "split_seed": split[1],
            "n_bootstrap": n_boot,
            "tokenizer_fingerprint": tokens["tokenizer_fingerprint"],
            "corpus_fingerprint": tokens["corpus_fingerprint"],
        }

    # ---- the one pass over tokens and features (cached) -----------------------------------------
    def _scan_key(self) -> str:
        feats = self.store.info(self.feats)
        return fingerprint(
            {
                "features": [feats["config_fingerprint"], feats["created"]],  # --force renews
                "corpus": feats["corpus_fingerprint"],
                "split": list(self.split),
                "n_contexts": self.cfg.n_contexts,
                "token_baseline": self.cfg.token_baseline,
                "n_bootstrap": self.n_boot,
            }
        )

    def scan(self, extra: dict[str, Any]) -> tuple[dict[str, np.ndarray], int]:
        """Token baseline R² and top activations, from the cache or one pass; (arrays, chunks read)."""
        store, key = self.store, self._scan_key()
        names = ("token_r2", "token_r2_boot", "top_value", "top_token")
        if (
            store.has(self.unit)
            and store.info(self.unit).get("scan_key") == key
            and all(store.has(f"{self.unit}/{n}") for n in names)
        ):
            return {n: store.array(f"{self.unit}/{n}")[:] for n in names}, 0
        arrays, n_chunks = self._scan_pass(extra["n_feat"])
        if self.writable:
            if store.has(self.unit):
                store.delete(self.unit)
            prov = provenance("report", self.cfg, **extra, scan_key=key)
            store.create_unit(self.unit, prov)
            for name, value in arrays.items():
                chunks = tuple(max(1, n) for n in value.shape)  # [F, 0] without replicates
                arr = store.create_array(
                    f"{self.unit}/{name}", value.shape, chunks, value.dtype, prov
                )
                arr[...] = value
        return arrays, n_chunks

    def _scan_pass(self, n_feat: int) -> tuple[dict[str, np.ndarray], int]:
        from tqdm.auto import tqdm

        store, tokens = self.store, self.store.info(self.tokens)
        ctx, chunk_seqs, n_chunks = tokens["ctx"], tokens["chunk_seqs"], tokens["n_chunks"]
        held = held_out_sequences(tokens["n_seq"], *self.split)
        baseline = TokenBaseline(n_feat)
        top = TopActivations(n_feat, self.cfg.n_contexts)
        for index in tqdm(
            range(n_chunks), desc="report", unit="chunk", disable=not self.cfg.progress
        ):
            ids = store.read_chunk(f"{self.tokens}/ids", index).reshape(-1)
            mask = store.read_chunk(f"{self.tokens}/mask", index).reshape(-1)
            rows, cols, vals = (t.numpy() for t in load_sparse(store, self.feats, index))
            first_token = index * chunk_seqs * ctx
            top.update(first_token + rows, cols, vals)
            if not self.cfg.token_baseline:
                continue
            is_held = held[index * chunk_seqs + np.arange(len(ids)) // ctx]
            for split, keep in (("train", mask & ~is_held), ("held_out", mask & is_held)):
                new_row = np.cumsum(keep) - 1
                sel = keep[rows]
                baseline.update(split, ids[keep], new_row[rows[sel]], cols[sel], vals[sel])
        token_r2 = baseline.r2_held_out() if self.cfg.token_baseline else np.zeros(n_feat)
        token_r2_boot = np.zeros((n_feat, 0))
        if self.cfg.token_baseline and self.n_boot:
            token_r2_boot = self._token_replicates(baseline.predictor())
        arrays = {"token_r2": token_r2, "token_r2_boot": token_r2_boot}
        return {**arrays, "top_value": top.value, "top_token": top.token}, n_chunks

    def _token_replicates(self, predictor: TokenPredictor) -> np.ndarray:
        """[F, n_boot]: the token baseline's held-out R² in each bootstrap replicate of held-out
        sequences (the fits' weights), from a pass over the held-out chunks' tokens and features."""
        store, tokens = self.store, self.store.info(self.tokens)
        ctx, chunk_seqs, n_seq = tokens["ctx"], tokens["chunk_seqs"], tokens["n_seq"]
        held = held_out_sequences(n_seq, *self.split)
        replicates = TokenBaselineReplicates(predictor, self.n_boot)
        for index in range(tokens["n_chunks"]):
            first = index * chunk_seqs
            n_seqs = min(chunk_seqs, n_seq - first)
            if not held[first : first + n_seqs].any():
                continue
            ids = store.read_chunk(f"{self.tokens}/ids", index).reshape(-1)
            mask = store.read_chunk(f"{self.tokens}/mask", index).reshape(-1)
            local_seq = np.arange(len(ids)) // ctx
            keep = mask & held[first + local_seq]
            rows, cols, vals = (t.numpy() for t in load_sparse(store, self.feats, index))
            new_row = np.cumsum(keep) - 1
            sel = keep[rows]
            weights = bootstrap_weights(self.split[1], index, n_seqs, self.n_boot)
            replicates.update(
                ids[keep], new_row[rows[sel]], cols[sel], vals[sel], weights[local_seq[keep]]
            )
        return replicates.result()[1]

    # ---- the table --------------------------------------------------------------------------------
    def table(self, scan: dict[str, np.ndarray]) -> tuple[Any, dict[str, Any]]:
        """The per-feature table (a DataFrame) and notes for the page: pipeline/report/table.py."""
        return feature_table(self, scan)

    # ---- summary ------------------------------------------------------------------------------------
    def summary_text(self, df: Any) -> str:
        cfg = self.cfg
        token = "max(R²_token, 0)" if cfg.token_baseline else "0"
        lines = [
            f"presence = (R²_B − {token}) / (R²_ceiling − {token}), clipped to [0, 1]",
            f"present: ≥ {cfg.present_at:g}   partial: ≥ {cfg.partial_at:g}   absent: < {cfg.partial_at:g}"
            f"   (scored where R²_ceiling − {token} ≥ {cfg.min_headroom:g})",
            (
                f"classes from {cfg.confidence:.0%} bootstrap intervals ({self.n_boot} replicates "
                "over held-out sequences): undetermined = the interval straddles a threshold"
                if self.n_boot
                else "classes from the point score (the fits have no bootstrap replicates)"
            ),
            "features: "
            + ", ".join(f"{n} {s}" for s, n in df["status"].value_counts().items())
            + f" (of {len(df)})",
        ]
        width = max(len(self._display(r)) for r in self.roles[1:])
        column = {c: max(10, len(c) + 2) for c in CLASSES}
        lines.append(f"  {'':<{width}}" + "".join(f"{c:>{column[c]}}" for c in CLASSES))
        floor_present = (
            df["floor_class"] == "present" if "floor_class" in df else np.zeros(len(df), bool)
        )
        for role in self.roles[1:]:
            counts = df[f"{role.label}_class"].value_counts()
            row = f"  {self._display(role):<{width}}" + "".join(
                f"{int(counts.get(c, 0)):>{column[c]}}" for c in CLASSES
            )
            if role.label != "floor" and "floor_class" in df:
                both = int(((df[f"{role.label}_class"] == "present") & floor_present).sum())
                row += f"   ({both} of its present features are present in the floor too)"
            lines.append(row)
        for m in self.match_roles:
            lines.append(agreement_line(df, m, cfg.match_at))
        return "\n".join(lines)

    @staticmethod
    def _display(role: Role) -> str:
        return f"{role.fit} (floor)" if role.label == "floor" else role.fit


def _shown(path: Path) -> Path:
    """``path`` relative to the working directory when it is below it (shorter to read)."""
    try:
        return path.resolve().relative_to(Path.cwd())
    except ValueError:
        return path


def _write_atomic(path: Path, write: Any) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)


def run(cfg: ReportConfig, store: Store, force: bool = False) -> dict[str, Any]:
    """Build the report; ``force`` also redoes the cached pass over tokens and features."""
    from pipeline.report.html import render_html

    report = Report(cfg, store)
    extra = report.validate()
    local = report.writable
    if cfg.out_dir is None and not local:
        raise XprobeError(f"store {store.url} is read-only: set out_dir for the report's files")
    out_dir = Path(cfg.out_dir) if cfg.out_dir else store.local_path / report.unit
    html_path = Path(cfg.html) if cfg.html else out_dir / "report.html"
    if local:
        if hasattr(store, "claim"):  # with read-only caches: this unit is always written here
            store.claim([report.unit])
        store.acquire_lock(report.unit, "report")
    try:
        if force and local and store.has(report.unit):
            store.delete(report.unit)
        scan, n_read = report.scan(extra)
        df, notes = report.table(scan)
        text = report.summary_text(df)
        _write_atomic(out_dir / "table.parquet", lambda p: df.to_parquet(p, index=False))
        _write_atomic(out_dir / "table.csv", lambda p: df.to_csv(p, index=False))
        notes["table"] = str(out_dir / "table.parquet")
        page = render_html(report, df, scan, notes, text)
        _write_atomic(html_path, lambda p: p.write_text(page, encoding="utf-8"))
        if local:
            store.update_info(
                report.unit,
                complete=True,
                n_chunks=int(store.info(report.tokens)["n_chunks"]),
                **extra,
                config=canonical(cfg),
                config_fingerprint=fingerprint(cfg),
                outputs=[
                    str(out_dir / "table.parquet"),
                    str(out_dir / "table.csv"),
                    str(html_path),
                ],
            )
    finally:
        if local:
            store.release_lock(report.unit)
    message = (
        f"report: {_shown(html_path)}\n        {_shown(out_dir / 'table.parquet')} (and table.csv)"
        + (" [token baseline and contexts from the cache]" if n_read == 0 else "")
        + "\n"
        + text
    )
    return {
        "stage": "report",
        "units": [report.unit],
        "chunks_written": n_read,
        "already_complete": False,
        "message": message,
        "html": str(html_path),
        "table": str(out_dir / "table.parquet"),
    }

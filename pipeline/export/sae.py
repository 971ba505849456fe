"""Export one fit as an SAE on B's hook that ``sae_lens.SAE.load_from_disk`` loads.

Per kept feature f of A's SAE (F_kept of them), from ``probes/<fit>/<hook>/``:

    W_enc [d_B, F_kept] = direction[f]ᵀ           the probe (read direction)
    b_enc [F_kept]      = intercept[f]             so encode(x) = relu(x·direction + intercept)
    W_dec [F_kept, d_B], b_dec [d_B]               the joint least-squares fit of x on the encoding
                                                   (``decoder="lstsq"``, the default)

(or, with ``decoder="write"``, ``W_dec[f] = write_direction[f]``, the slope of B's residual on
the feature, and ``b_dec`` the mean over training tokens of ``x − Σ_f encode(x)_f · W_dec[f]``:
one feature's write direction is its own slope, and summed over co-active features the slopes
overcount what they share, so the write decoder reconstructs poorly: explained variance −3.2
against 0.825 on the demo's finetune, docs/export.md)
with ReLU, or TopK with A's k when A's SAE is a TopK SAE (k capped at F_kept), and
``apply_b_dec_to_input = False``, so ``encode`` is exactly the clipped probe prediction.

**TopK and the single-layer model**: the fit predicts every feature as A's TopK of *all* F
pre-activations, so a feature's prediction depends on the others' (each token keeps the k
largest). The export then holds every feature's encoder row (:func:`export_latents`: latent i is
A's feature i), the kept ones and the rest as competitors, so that ``encode(x)`` is the fit's
prediction for every feature, exactly (keeping only the kept rows would let a kept feature into
the top k where a competitor would have beaten it: the exported SAE's median held-out R² was
0.058 against the fit's 0.208). The competitors' decoder rows are 0: the decoder is fitted on the
kept features' encodings alone; ``cfg.metadata.xprobe`` lists the latents (``feature_ids``) and
the kept features (``selected``), and the steering file holds the kept ones. The folder
holds sae-lens's own ``cfg.json`` and ``sae_weights.safetensors`` (written by its ``save_model``),
with ``cfg.metadata.xprobe`` naming A, its SAE, the fit and the kept feature ids, and
``steering.safetensors``: ``feature_ids [F_kept]`` int64 (A's ids), ``write_direction
[F_kept, d_B]`` float32 and ``write_norm [F_kept]`` (row i steers with feature ``feature_ids[i]``).

Which features (:func:`select_features`): by default those the report classes "present"
(``{fit}_class`` in ``report/<name>/table.parquet``: the class the report's
:func:`pipeline.maths.presence.classify_interval` gave, the whole bootstrap interval of presence
in the report's "present" band), so the export keeps what the report counts present; with
``present_at``, those whose presence *point* score is at least that; with ``min_r2``, every ok probe
with held-out R² >= min_r2 (the ceiling A → A has no presence score). Only ok probes are ever kept.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.documents import split_documents
from pipeline.errors import XprobeError
from pipeline.inputs.sae import load_sae_of
from pipeline.maths.lstsq import STATUS_OK
from pipeline.maths.split import held_out_sequences
from pipeline.store import Store
from pipeline.store.io import new_temp_dir
from pipeline.store.layout import acts_unit, feats_unit, probes_unit, safe_name, tokens_unit
from pipeline.store.reader import load_acts

STEERING_FILE = "steering.safetensors"
TOPK_ARCHITECTURES = ("topk",)
DECODERS = ("write", "lstsq")


@dataclass(frozen=True)
class FitSource:
    """What one fit at one hook was computed from, resolved from the store's provenance."""

    store: Store
    fit: str
    hook: str
    corpus: str
    features: str  # store name of A's SAE features
    model_b: str  # B's store name
    config: dict[str, Any]  # the fit's config

    @classmethod
    def resolve(cls, store: Store, fit: str, hook: str | None = None) -> FitSource:
        unit = probes_unit(fit)
        if not store.has(unit) or not store.info(unit).get("complete"):
            raise XprobeError(f"{unit} is not in the store or not complete; run the fit {fit!r}")
        config = store.info(unit)["config"]
        hooks = list(config["hooks"])
        if hook is None:
            if len(hooks) > 1:
                raise XprobeError(f"fit {fit!r} probes hooks {hooks}; choose one with --hook")
            hook = hooks[0]
        if hook not in hooks:
            raise XprobeError(f"fit {fit!r} has no hook {hook!r}; its hooks are {hooks}")
        if not store.has(f"{unit}/{hook}/write_direction"):
            raise XprobeError(
                f"{unit} has no write directions (fitted by an older xprobe); "
                f"rerun the fit with --force: xprobe fit --name {fit} ... --force"
            )
        return cls(store, fit, hook, config["corpus"], config["features"], config["model"], config)

    @property
    def probes(self) -> str:
        return f"{probes_unit(self.fit)}/{self.hook}"

    @property
    def tokens(self) -> str:
        return tokens_unit(self.corpus)

    @property
    def feats(self) -> str:
        return feats_unit(self.corpus, self.features)

    @property
    def acts_b(self) -> str:
        return acts_unit(self.corpus, safe_name(self.model_b), self.hook)

    def probe(self, key: str) -> np.ndarray:
        """``probes/<fit>/<hook>/<key>`` as a numpy array."""
        return self.store.array(f"{self.probes}/{key}")[:]

    def held_out(self) -> np.ndarray:
        """[n_seq] bool: the fit's held-out sequences (whole documents where it split by them)."""
        n_seq = int(self.store.info(self.tokens)["n_seq"])
        split_by = self.config.get("split_by", "sequence")  # fits before split_by: by sequence
        docs = split_documents(self.store, self.tokens, split_by)
        return held_out_sequences(
            n_seq, self.config["held_out_fraction"], self.config["split_seed"], doc_ids=docs
        )

    def sequences(
        self, held_out: bool, max_tokens: int
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The held-out (or training) sequences, chunk by chunk: ids [s, ctx] int64, mask
        [s, ctx] bool and B's activations [s, ctx, d] float32, until at least ``max_tokens``
        counted tokens are given (whole chunks, in corpus order)."""
        store, info = self.store, self.store.info(self.tokens)
        split = self.held_out() if held_out else ~self.held_out()
        ctx, chunk_seqs = int(info["ctx"]), int(info["chunk_seqs"])
        given = 0
        for index in range(int(info["n_chunks"])):
            if given >= max_tokens:
                return
            ids = store.read_chunk(f"{self.tokens}/ids", index).astype(np.int64)
            rows = split[index * chunk_seqs : index * chunk_seqs + len(ids)]
            mask = store.read_chunk(f"{self.tokens}/mask", index).astype(bool)[rows]
            if not mask.any():
                continue
            x = load_acts(store, self.acts_b, index).to(torch.float32).reshape(len(ids), ctx, -1)
            yield torch.from_numpy(ids[rows]), torch.from_numpy(mask), x[torch.from_numpy(rows)]
            given += int(mask.sum())

    def sae_a(self, device: str = "cpu") -> Any:
        """A's SAE, as the features unit recorded it."""
        return load_sae_of(self.store, self.feats, device=device)

    def identity(self) -> dict[str, Any]:
        """A, its SAE, B and the fit, as recorded in the store (for the export's metadata)."""
        feats, acts_b = self.store.info(self.feats), self.store.info(self.acts_b)
        feats_config = feats.get("config", {})
        a_unit = acts_unit(self.corpus, safe_name(feats_config.get("model", "")), self.hook)
        model_a = (
            self.store.info(a_unit).get("model") if self.store.has(a_unit) else None
        ) or feats_config.get("model")
        return {
            "model_a": model_a,
            "sae_a": {k: feats_config.get(k) for k in ("sae", "sae_id", "sae_path", "hook")},
            "features": self.feats,
            "model_b": acts_b.get("model"),
            "model_b_revision": acts_b.get("revision"),
            "model_b_store_name": self.model_b,
            "hook": self.hook,
            "fit": self.fit,
            "fit_config": self.config,
            "fit_config_fingerprint": self.store.info(probes_unit(self.fit)).get(
                "config_fingerprint"
            ),
            "corpus": self.corpus,
            "corpus_fingerprint": self.store.info(self.tokens).get("corpus_fingerprint"),
            "store": str(self.store.url),
        }


PRESENT = "present"
"""The report's class (``pipeline.maths.presence.CLASSES``) that the export keeps by default."""
NOT_PRESENT = ("partial", "absent")
"""The report's classes whose whole presence interval lies below its ``present_at``."""


def select_features(
    source: FitSource,
    report: str | None = None,
    present_at: float | None = None,
    min_r2: float | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
    """A's feature ids to export, ascending ``[F_kept]`` int64, and how they were chosen.

    By default the ok probes the report ``report`` (default: the one report in the store that
    scores this fit) classes "present", the count its summary gives. With ``present_at``: ok
    probes whose presence point score is at least that (features whose interval straddles the
    threshold included). With ``min_r2``: ok probes with held-out R² >= min_r2.
    """
    check_selection(present_at, min_r2)
    ok = source.probe("status") == STATUS_OK
    if min_r2 is not None:
        keep = ok & (source.probe("r2_held_out") >= min_r2)
        return np.flatnonzero(keep), {"by": "r2_held_out", "min_r2": min_r2}
    if present_at is not None:
        presence, name = presence_scores(source, report)
        keep = ok & (presence >= present_at)  # NaN (not scored) is never kept
        return np.flatnonzero(keep), {"by": "presence", "report": name, "present_at": present_at}
    classes, name = presence_classes(source, report)
    keep = ok & (classes == PRESENT)
    return np.flatnonzero(keep), {"by": "class", "report": name, "class": PRESENT}


def check_selection(present_at: float | None, min_r2: float | None) -> None:
    """Refuse a selection that names two rules or a threshold out of range (before any work)."""
    if present_at is not None and min_r2 is not None:
        raise XprobeError(
            "--present-at and --min-r2 are two ways to choose features; give at most one"
        )
    if present_at is not None and not 0 <= present_at <= 1:
        raise XprobeError(f"--present-at is a presence score in [0, 1], got {present_at}")
    if min_r2 is not None and not np.isfinite(min_r2):
        raise XprobeError(f"--min-r2 must be a finite number, got {min_r2}")


def presence_scores(source: FitSource, report: str | None = None) -> tuple[np.ndarray, str]:
    """The fit's presence score per feature ``[F]`` float64 (NaN: not scored) from the report
    ``report`` (default: the one report in the store that scores this fit), and its name."""
    values, name = _report_column(source, report, "presence", missing=np.nan)
    return values.astype(np.float64), name


def presence_classes(source: FitSource, report: str | None = None) -> tuple[np.ndarray, str]:
    """The class the report gave the fit per feature ``[F]`` object (``"present"``, ...,
    ``"unscored"``; None: no row), read from its table as the report wrote it, and its name."""
    return _report_column(source, report, "class", missing=None)


def _report_column(
    source: FitSource, report: str | None, suffix: str, missing: Any
) -> tuple[np.ndarray, str]:
    """``{fit}_{suffix}`` of the report's table per feature ``[F]`` object (``missing`` where the
    table has no row), from ``report`` or the one report in the store that scores this fit."""
    import pandas as pd

    column = f"{source.fit}_presence"
    tables = _report_tables(source.store, report)
    scoring = {name: path for name, path in tables.items() if column in _columns(path)}
    if report is None and len(scoring) != 1:
        found = sorted(scoring) or "none"
        raise XprobeError(
            f"cannot tell which report scores fit {source.fit!r} (found: {found}); name it with "
            "--report NAME, or keep features by held-out R² with --min-r2 X"
        )
    if report is not None and report not in scoring:
        raise XprobeError(
            f"report {report!r} has no presence score for fit {source.fit!r}: run the report "
            f"with {source.fit!r} in its fits, or keep features by held-out R² with --min-r2 X"
        )
    name, path = next(iter(scoring.items())) if report is None else (report, scoring[report])
    wanted = f"{source.fit}_{suffix}"
    if wanted not in _columns(path):
        raise XprobeError(
            f"the table of report {name!r} has no column {wanted} (written by an older xprobe): "
            "run the report again, or choose features by --present-at X or --min-r2 X"
        )
    table = pd.read_parquet(path, columns=["feature", wanted])
    out = np.full(len(source.probe("status")), missing, dtype=object)
    out[table["feature"].to_numpy()] = table[wanted].to_numpy()
    return out, name


def _report_tables(store: Store, report: str | None) -> dict[str, Path]:
    """``{report name: table.parquet}`` of the reports written in this store's folder."""
    if store.local_path is None:
        raise XprobeError("the store is not a local folder: keep features with --min-r2 X")
    root = store.local_path / "report"
    names = [report] if report is not None else sorted(p.name for p in root.glob("*"))
    return {n: root / n / "table.parquet" for n in names if (root / n / "table.parquet").exists()}


def _columns(path: Path) -> list[str]:
    import pyarrow.parquet as pq

    return list(pq.read_schema(path).names)


def build_sae(
    source: FitSource,
    feature_ids: np.ndarray,
    decoder: str = "lstsq",
    train_tokens: int = 100_000,
    device: str = "cpu",
) -> Any:
    """The sae-lens SAE (StandardSAE, TopKSAE with A's k, or for the single-layer model of a
    JumpReLU SAE a JumpReLUSAE with A's thresholds) of the kept features, float32.

    ``decoder="write"``: ``W_dec`` rows are B's write directions and ``b_dec`` is the mean of
    ``x − Σ_f encode(x)_f·W_dec[f]``. ``decoder="lstsq"``: ``W_dec`` and ``b_dec`` are the joint
    least-squares fit of x on ``[encode(x), 1]`` (the best decoder for this encoder; rows are
    then not the per-feature write directions, which stay in the steering file). Either is fitted
    on at most ``train_tokens`` counted training tokens of B (whole chunks, in order).
    """
    from sae_lens import StandardSAE, StandardSAEConfig, TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    if decoder not in DECODERS:
        raise XprobeError(f"decoder must be one of {DECODERS}, not {decoder!r}")
    if len(feature_ids) == 0:
        raise XprobeError(
            f"no feature of fit {source.fit!r} passes the selection; lower the threshold"
        )
    direction = source.store.array(f"{source.probes}/direction")
    write = source.store.array(f"{source.probes}/write_direction")
    d_in = int(direction.shape[1])
    a_cfg = source.sae_a().cfg
    architecture, k = a_cfg.architecture(), getattr(a_cfg, "k", None)
    selected = np.asarray(feature_ids)
    feature_ids = export_latents(source, selected)
    kept = np.isin(feature_ids, selected)  # [latents]: False for the TopK competitors
    common = dict(
        d_in=d_in,
        d_sae=len(feature_ids),
        dtype="float32",
        device=device,
        apply_b_dec_to_input=False,
        metadata=SAEMetadata(
            model_name=source.identity()["model_b"],
            hook_name=source.hook,
            context_size=int(source.store.info(source.tokens)["ctx"]),
        ),
    )
    threshold = None
    if architecture in TOPK_ARCHITECTURES and k is not None:
        sae = TopKSAE(TopKSAEConfig(k=min(int(k), len(feature_ids)), **common))
    elif architecture == "jumprelu" and source.config.get("predictor", "linear") == "sae":
        from sae_lens import JumpReLUSAE, JumpReLUSAEConfig

        # the single-layer model's σ_A: A's thresholds on B's fitted pre-activations
        sae = JumpReLUSAE(JumpReLUSAEConfig(**common))
        threshold = source.sae_a().threshold.detach()[torch.from_numpy(feature_ids)]
    else:
        sae = StandardSAE(StandardSAEConfig(**common))
    with torch.no_grad():
        if threshold is not None:
            sae.threshold.copy_(threshold.to(torch.float32))
        sae.W_enc.copy_(torch.from_numpy(direction.oindex[feature_ids, :].T.astype(np.float32)))
        sae.b_enc.copy_(torch.from_numpy(source.probe("intercept")[feature_ids].astype(np.float32)))
        w_write = write.oindex[feature_ids, :].astype(np.float32)
        w_write[~kept] = 0  # competitors take part in the top k but reconstruct nothing
        sae.W_dec.copy_(torch.from_numpy(w_write))
        sae.b_dec.zero_()
        if decoder == "write":
            sae.b_dec.copy_(_decoder_bias(source, sae, train_tokens, device))
        else:
            columns = torch.from_numpy(np.flatnonzero(kept))
            w_dec, b_dec = _joint_decoder(source, sae, train_tokens, device, columns)
            sae.W_dec.zero_()
            sae.W_dec[columns.to(sae.W_dec.device)] = w_dec
            sae.b_dec.copy_(b_dec)
    return sae.eval()


def export_latents(source: FitSource, selected: np.ndarray) -> np.ndarray:
    """A's feature ids of the exported SAE's latents, in order: the ``selected`` ones, or for
    the single-layer model of a TopK SAE every feature (the rest compete for the top k; module
    docstring)."""
    a_cfg = source.sae_a().cfg
    topk = a_cfg.architecture() in TOPK_ARCHITECTURES and getattr(a_cfg, "k", None) is not None
    if topk and source.config.get("predictor", "linear") == "sae":
        return np.arange(int(source.store.array(f"{source.probes}/direction").shape[0]))
    return np.asarray(selected)


def _training_acts(source: FitSource, n_tokens: int, device: str) -> Iterator[torch.Tensor]:
    """B's counted training tokens at the hook, chunk by chunk ``[n, d]`` float32, until at least
    ``n_tokens`` are given (whole chunks)."""
    given = 0
    for _, mask, x in source.sequences(held_out=False, max_tokens=n_tokens):
        given += int(mask.sum())
        yield x[mask].to(device)
    if given == 0:
        raise XprobeError(f"fit {source.fit!r} has no counted training tokens to fit a decoder on")


def _decoder_bias(source: FitSource, sae: Any, n_tokens: int, device: str) -> torch.Tensor:
    """Mean of ``x − sae.decode(sae.encode(x))`` (b_dec = 0) over counted training tokens [d]."""
    total = torch.zeros(sae.cfg.d_in, dtype=torch.float64, device=device)
    n = 0
    for x in _training_acts(source, n_tokens, device):
        total += (x - sae.decode(sae.encode(x))).sum(0, dtype=torch.float64)
        n += len(x)
    return (total / n).to(torch.float32)


def _joint_decoder(
    source: FitSource, sae: Any, n_tokens: int, device: str, columns: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Least squares of x [n, d] on ``[encode(x)[:, columns], 1]`` over counted training tokens,
    from the float64 Gram ``[C+1, C+1]`` and cross term ``[C+1, d]`` (pseudo-inverse: a feature
    that never fires gets a zero row). Returns ``W_dec [C, d]`` (the rows of ``columns``, default
    every latent) and ``b_dec [d]``, float32."""
    columns = torch.arange(sae.cfg.d_sae) if columns is None else columns
    width = len(columns) + 1
    gram = torch.zeros(width, width, dtype=torch.float64, device=device)
    cross = torch.zeros(width, sae.cfg.d_in, dtype=torch.float64, device=device)
    for x in _training_acts(source, n_tokens, device):
        code = sae.encode(x)[:, columns.to(x.device)]
        a = torch.cat([code, torch.ones(len(x), 1, device=device)], 1).double()
        gram += a.T @ a
        cross += a.T @ x.double()
    coef = torch.linalg.pinv(gram, hermitian=True) @ cross
    return coef[:-1].float(), coef[-1].float()


EXPORT_FILES = (
    "cfg.json",
    "sae_weights.safetensors",
    STEERING_FILE,
    "metrics.json",
    "causal.csv",
    "causal.png",
)
"""Everything ``xprobe export`` writes into its folder: what ``--force`` may replace."""


def check_export_target(out: Path, force: bool) -> None:
    """Refuse ``out`` before any work: a non-empty folder needs ``force``, and ``force`` only
    replaces an earlier export (its ``cfg.json`` carries xprobe's metadata, and it holds no file
    an export does not write), never a folder of other files."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise XprobeError(f"{out} exists and is not a folder; choose another --out")
    if not out.exists() or not any(out.iterdir()):
        return
    if not force:
        raise XprobeError(f"{out} exists and is not empty; choose another --out or pass --force")
    others = sorted(p.name for p in out.iterdir() if p.name not in EXPORT_FILES or not p.is_file())
    try:
        earlier = bool(read_metadata(out))
    except (OSError, ValueError, AttributeError):
        earlier = False
    if others or not earlier:
        what = (
            f"files an export does not write ({', '.join(others[:5])})"
            if others
            else ("no earlier export (no cfg.json with xprobe's metadata)")
        )
        raise XprobeError(
            f"{out} holds {what}; --force replaces only an earlier xprobe export: choose "
            "another --out"
        )


@contextmanager
def staged_export(out: Path) -> Iterator[Path]:
    """A new temp folder beside ``out`` (``tempfile.mkdtemp``) to write the whole export into;
    when the block ends without an error it is moved into place, replacing an earlier export
    (``check_export_target`` vetted it; checked again now), else removed. The earlier one is
    first renamed aside, so a kill between the two renames leaves no folder at ``out``, never a
    partial one that looks complete."""
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = new_temp_dir(out)
    try:
        yield tmp
        check_export_target(out, force=True)
        old = None
        if out.exists():
            old = new_temp_dir(out)
            os.replace(out, old)  # onto the empty temp folder: rename(2) replaces an empty one
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def write_export(
    source: FitSource,
    sae: Any,
    feature_ids: np.ndarray,
    selection: dict[str, Any],
    out: Path,
    decoder: str = "lstsq",
) -> Path:
    """Write the SAE folder (sae-lens's ``save_model``) and ``steering.safetensors`` into the
    new, empty folder ``out`` (the export's temp folder: ``place_export`` moves it into place)."""
    from safetensors.torch import save_file

    out = Path(out)
    identity = source.identity()
    sae.cfg.metadata.xprobe = {
        **identity,
        "what": "B's dictionary: encoder rows = probe directions, decoder rows = "
        + ("write directions" if decoder == "write" else "joint least squares on the encoding"),
        "selection": selection,
        "decoder": decoder,
        "feature_ids": [int(f) for f in export_latents(source, feature_ids)],
        "selected": [int(f) for f in feature_ids],
    }
    sae.save_model(out)
    write = torch.from_numpy(
        source.store.array(f"{source.probes}/write_direction").oindex[feature_ids, :]
    )
    save_file(
        {
            "feature_ids": torch.from_numpy(np.asarray(feature_ids, dtype=np.int64)),
            "write_direction": write,
            "write_norm": torch.from_numpy(source.probe("write_norm")[feature_ids]),
        },
        out / STEERING_FILE,
        metadata={
            "hook": source.hook,
            "model_b": str(identity["model_b"]),
            "fit": source.fit,
            "units": "residual change per unit of the feature's activation",
        },
    )
    return out


def read_metadata(folder: Path) -> dict[str, Any]:
    """The ``xprobe`` metadata of an exported SAE folder (empty if it has none)."""
    cfg = json.loads((Path(folder) / "cfg.json").read_text())
    return cfg.get("metadata", {}).get("xprobe", {})

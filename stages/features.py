"""Features stage: a model's stored activations -> an SAE's sparse feature activations.

Reads ``acts/<corpus>/<model>/<hook>/x`` ``[n_tok, d_model]`` (and ``tokens/<corpus>/mask``),
encodes it with a sae-lens SAE (``sae.encode``, any architecture sae-lens loads) and writes
``feats/<corpus>/<sae>``:
    idx  [n_tok, K] int32    ids of each token's active features, ascending, -1 = padding
    val  [n_tok, K] float32  their activations (0 in padding)
chunked ``(chunk_seqs * ctx, K)``, so feature chunk i is token chunk i. Masked positions
(``mask`` False: BOS, padding) are stored as all padding: no features.
A token with more than K active features keeps its K largest; the dropped mass
(sum |dropped| / sum |all|, over counted tokens) is recorded per chunk in the manifest and in
the final provenance, and a chunk past ``max_dropped_fraction`` stops the run.

Per-feature statistics over counted tokens, from every non-zero of ``sae.encode``'s output
before the width limit (so exact even when top-K drops something), written at finalize:
    stats/{count, frequency, mean, max, sum, sum_sq, dead}  [n_feat]
``mean`` is over all counted tokens (zeros included); ``max`` is 0 for a feature that never fires.
They are summed from per-chunk partials ``chunk_stats [n_chunks, 4, n_feat]`` (float64) stored
with each chunk, so a resumed run gives the same bits as an uninterrupted one.

Direct transfer (Kissane et al. 2024): for each B in ``transfer_models`` the same SAE encodes B's
stored activations at the same hook, and finalize writes ``transfer/<B>/corr [n_feat]`` (Pearson
correlation of each feature's activation on A and on B over the counted tokens; NaN where a side
is constant) and records explained variance on A and B and the mean cosine of A's and B's
residual vectors in the provenance (``transfer``). Explained variance is
``1 - sum ||x - sae.decode(sae.encode(x))||^2 / sum ||x - mean(x)||^2`` over counted tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from pipeline.cluster import client_for, scheduler_field, workers_field
from pipeline.config import canonical, check_fields, path_field, runtime
from pipeline.device import resolve_device
from pipeline.errors import XprobeError
from pipeline.inputs import sae as sae_loader
from pipeline.inputs.sae import sae_input_transform
from pipeline.lazy import inference_mode, torch, zarr
from pipeline.lineage import Input, sae_input, unit_input
from pipeline.maths.sparse_pack import (
    CALIBRATION_TOKENS,
    STATS,
    add_feature_stats,
    calibrated_k,
    feature_stats,
    new_feature_stats,
    pack_sparse,
)
from pipeline.maths.transfer import PAIR, SCALARS, add_transfer_sums, transfer_metrics
from pipeline.stage import ChunkedStage
from pipeline.store import Store
from pipeline.store.chunks import ChunkResult
from pipeline.store.layout import (
    RESID_HOOK,
    RESID_HOOK_ADVICE,
    acts_unit,
    feats_unit,
    safe_name,
    tokens_unit,
)
from pipeline.store.reader import excluded_threshold, high_norm, load_acts


@dataclass(frozen=True)
class FeaturesConfig:
    corpus: str
    """Name of the tokenized corpus in the store (``tokens/<corpus>``)."""
    model: str
    """Store name of the model whose activations are encoded (``acts/<corpus>/<model>``)."""
    sae: str | None = None
    """sae-lens release (``SAE.from_pretrained(sae, sae_id)``); or give ``sae_path``."""
    sae_id: str | None = None
    """SAE id within the release."""
    sae_path: str | None = path_field(None)
    """Local folder saved by sae-lens (``SAE.load_from_disk``), instead of a release."""
    name: str | None = None
    """Store name of the SAE (``feats/<corpus>/<name>``); default from release/id or the folder name."""
    hook: str | None = None
    """Hook whose activations to encode; default the SAE's ``cfg.metadata.hook_name``."""
    k: int | None = None
    """Features kept per token; default the TopK SAE's k, else calibrated on chunk 0 (1.5 x the
    largest L0 of its first 4,096 counted tokens, rounded up to a multiple of 8)."""
    device: str = "auto"
    """torch device; ``auto`` picks cuda, then mps, then cpu."""
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    """dtype the SAE encodes in; ``auto`` keeps the SAE's own dtype."""
    max_dropped_fraction: float = 1e-3
    """Largest dropped activation mass (top-K overflow) a chunk may have before the run stops."""
    transfer_models: tuple[str, ...] = ()
    """Store names of models B (same d_model and hook) to measure direct SAE transfer on."""
    sae_input: Literal["auto", "raw", "centered"] = "auto"
    """What the SAE is given: ``auto`` follows its metadata (an SAE trained on TransformerLens
    activations with ``center_writing_weights`` gets each position's residual centred over d_model
    on LayerNorm models, as TransformerLens computes it); ``raw`` or ``centered`` overrule it."""
    exclude_norm_above: float | None = None
    """Drop positions whose residual L2 norm exceeds this many times the unit's median norm (as
    recorded by the activations stage): attention-sink / BOS-like tokens. They get no features,
    are listed in ``excluded`` and are skipped by fit and report like masked positions."""
    batch_tokens: int = runtime(4096, "tokens per sae.encode call")
    progress: bool = runtime(True, "show a progress bar")
    scheduler: str | None = scheduler_field()
    workers: int | None = workers_field()

    def __post_init__(self) -> None:
        check_fields(self)
        if (self.sae_path is None) == (self.sae is None):
            raise XprobeError("give either sae (a sae-lens release, with sae_id) or sae_path")
        if self.sae is not None and self.sae_id is None:
            raise XprobeError(f"the SAE release {self.sae!r} needs an sae_id")
        if self.batch_tokens < 1:
            raise XprobeError(f"batch_tokens must be positive, got {self.batch_tokens}")
        if not 0 <= self.max_dropped_fraction <= 1:
            raise XprobeError(
                f"max_dropped_fraction must be in [0, 1], got {self.max_dropped_fraction}"
            )
        if self.k is not None and self.k < 1:
            raise XprobeError(f"k must be positive, got {self.k}")
        if self.exclude_norm_above is not None and not self.exclude_norm_above > 0:
            raise XprobeError(
                f"exclude_norm_above must be positive (× the median norm), got {self.exclude_norm_above}"
            )
        if self.hook is not None and not RESID_HOOK.match(self.hook):
            raise XprobeError(f"hook {self.hook!r} cannot be read: {RESID_HOOK_ADVICE}")


def _model_type(model: str | None, revision: str | None) -> str | None:
    """``model_type`` of a model's config (activations recorded before it was in provenance)."""
    try:
        from transformers import AutoConfig

        return AutoConfig.from_pretrained(model, revision=revision).model_type
    except Exception:
        return None


def load_sae(cfg: FeaturesConfig, device: str) -> Any:
    """The SAE named by ``cfg``, on ``device``, in ``cfg.dtype`` (or its own dtype)."""
    return sae_loader.load_sae(
        cfg.sae,
        cfg.sae_id,
        cfg.sae_path,
        device=device,
        dtype=None if cfg.dtype == "auto" else cfg.dtype,
    )


class FeaturesStage(ChunkedStage):
    name = "features"
    cfg: FeaturesConfig

    def __init__(self, cfg: FeaturesConfig):
        super().__init__(cfg)
        if cfg.name:
            self.sae_name = cfg.name
        elif cfg.sae_path is not None:
            self.sae_name = Path(cfg.sae_path).resolve().name
        else:
            self.sae_name = f"{cfg.sae}--{cfg.sae_id}"
        self.unit = feats_unit(cfg.corpus, self.sae_name)
        self.tokens = tokens_unit(cfg.corpus)
        self.device = resolve_device(cfg.device)
        self._sae = None
        self.k: int | None = None
        self._transform: tuple[str, str] | None = None

    # ---- SAE facts ----------------------------------------------------------------------------
    @property
    def sae(self) -> Any:
        if self._sae is None:
            self._sae = load_sae(self.cfg, self.device)
        return self._sae

    @property
    def hook(self) -> str:
        hook = self.cfg.hook or getattr(self.sae.cfg.metadata, "hook_name", None)
        if not hook:
            raise XprobeError(
                "the SAE's config names no hook (metadata.hook_name); set hook in the config"
            )
        return hook

    @property
    def n_feat(self) -> int:
        return int(self.sae.cfg.d_sae)

    def input_transform(self, store: Store) -> tuple[str, str]:
        """``(transform, why)`` the SAE's activations get (``pipeline.inputs.sae.sae_input_transform``)."""
        if self._transform is None:
            ainfo = store.info(self.acts_of(self.cfg.model))
            model_type = ainfo.get("model_type")
            if model_type is None and self.cfg.sae_input == "auto":
                model_type = _model_type(ainfo.get("model"), ainfo.get("revision"))
            self._transform = sae_input_transform(
                self.sae.cfg.metadata, model_type, self.cfg.sae_input
            )
        return self._transform

    def identity(self) -> Any:
        """The config, with the SAE input transform when it is not ``raw`` (so features computed
        before it existed, all raw, keep their fingerprint, and a centred run never resumes them)."""
        out = canonical(self.cfg)
        del out["sae_input"]
        if self.cfg.exclude_norm_above is None:
            del out["exclude_norm_above"]
        if self._transform is not None and self._transform[0] != "raw":
            out["sae_input_transform"] = self._transform[0]
        return out

    def acts_of(self, model: str) -> str:
        return acts_unit(self.cfg.corpus, model, self.hook)

    def _transfer_names(self) -> list[str]:
        return [safe_name(b) for b in self.cfg.transfer_models]

    # ---- stage contract -------------------------------------------------------------------------
    def units(self, store: Store) -> dict[str, dict[str, Any]]:
        ainfo = store.info(self.acts_of(self.cfg.model))
        return {
            self.unit: {
                "corpus": self.cfg.corpus,
                "model": self.cfg.model,
                "sae": self.sae_name,
                "sae_architecture": self.sae.cfg.architecture(),
                "hook": self.hook,
                "n_feat": self.n_feat,
                "d_model": int(ainfo["d_model"]),
                "encode_dtype": str(self.sae.dtype).removeprefix("torch."),
                "acts_dtype": ainfo["dtype"],
                "n_tok": int(ainfo["n_tok"]),
                "ctx": int(ainfo["ctx"]),
                "chunk_seqs": int(ainfo["chunk_seqs"]),
                "tokenizer_fingerprint": ainfo["tokenizer_fingerprint"],
                "corpus_fingerprint": ainfo["corpus_fingerprint"],
                "transfer_models": list(self.cfg.transfer_models),
                "sae_input": self.input_transform(store)[0],
                "sae_input_why": self.input_transform(store)[1],
            }
        }

    def inputs(self, store: Store) -> dict[str, Input]:
        cfg = self.cfg
        out = {
            "tokens": unit_input(store, self.tokens),
            "activations": unit_input(store, self.acts_of(cfg.model)),
            "sae": sae_input(cfg.sae, cfg.sae_id, cfg.sae_path),
        }
        for b in cfg.transfer_models:
            out[f"activations of {b}"] = unit_input(store, self.acts_of(b))
        return out

    def dense_reads(self, store: Store) -> list[str]:
        return [self.acts_of(self.cfg.model), *(self.acts_of(b) for b in self._transfer_names())]

    def consumed_chunks(self, store: Store) -> set[int]:
        return store.done_chunks(self.unit) if store.has(self.unit) else set()

    def needs_complete(self, store: Store) -> list[str]:
        """``exclude_norm_above`` scales by A's median norm over the whole corpus."""
        return [self.acts_of(self.cfg.model)] if self.cfg.exclude_norm_above is not None else []

    def _require_acts(self, store: Store, model: str) -> dict[str, Any]:
        if not RESID_HOOK.match(self.hook):
            raise XprobeError(
                f"the SAE reads hook {self.hook!r}, which xprobe cannot store: {RESID_HOOK_ADVICE}. "
                "Use an SAE trained on a residual stream hook."
            )
        unit = self.acts_of(model)
        if not store.has(unit) or "xprobe" not in store.group(unit).attrs:
            prefix = f"acts/{safe_name(self.cfg.corpus)}/{safe_name(model)}"
            have = sorted(
                p.removeprefix(prefix + "/") for p, _ in store.units() if p.startswith(prefix + "/")
            )
            raise XprobeError(
                f"{unit} is not in the store (the SAE reads hook {self.hook!r}; stored hooks of "
                f"{model!r}: {have or 'none'}). Run the activations stage with hooks = [{self.hook!r}], "
                "or set hook to one that is stored."
            )
        info = store.info(unit)
        if not info.get("complete") and self.segment is None:
            # a segmented run (pipeline.segments) encodes each segment as soon as it is stored
            raise XprobeError(f"{unit} is not complete; resume the activations stage first")
        return info

    def validate(self, store: Store) -> None:
        ainfo = self._require_acts(store, self.cfg.model)
        self.input_transform(store)
        d_in = int(self.sae.cfg.d_in)
        if d_in != int(ainfo["d_model"]):
            raise XprobeError(
                f"the SAE reads d_in = {d_in} but {self.acts_of(self.cfg.model)} has d_model = "
                f"{ainfo['d_model']}: this SAE was trained on another model or hook. Use an SAE for "
                f"{self.cfg.model!r} at {self.hook!r}."
            )
        if self.cfg.k is not None and not 1 <= self.cfg.k <= self.n_feat:
            raise XprobeError(f"k must be in 1..{self.n_feat} (the SAE's d_sae), got {self.cfg.k}")
        if self.cfg.exclude_norm_above is not None:
            self.norm_threshold(store)
        for b in self.cfg.transfer_models:
            binfo = self._require_acts(store, b)
            if int(binfo["d_model"]) != int(ainfo["d_model"]):
                raise XprobeError(
                    f"transfer model {b!r} has d_model = {binfo['d_model']}, but the SAE and "
                    f"{self.cfg.model!r} have {ainfo['d_model']}; direct transfer needs the same width"
                )
            if binfo["corpus_fingerprint"] != ainfo["corpus_fingerprint"]:
                raise XprobeError(
                    f"transfer model {b!r} was run on another token stream than {self.cfg.model!r} "
                    "(corpus fingerprints differ); rerun its activations stage on this corpus"
                )

    def norm_threshold(self, store: Store) -> float | None:
        """``exclude_norm_above`` × the median residual norm of A's activations, or None."""
        if self.cfg.exclude_norm_above is None:
            return None
        return excluded_threshold(store, self.acts_of(self.cfg.model), self.cfg.exclude_norm_above)

    def _chunk_rows(self, info: dict[str, Any]) -> int:
        return int(info["chunk_seqs"]) * int(info["ctx"])

    def _resolve_k(self, store: Store) -> int:
        if self.cfg.k is not None:
            return self.cfg.k
        if store.has(f"{self.unit}/idx"):  # resuming: the width was fixed when the run started
            return int(store.array(f"{self.unit}/idx").shape[1])
        sae_k = getattr(self.sae.cfg, "k", None)
        if sae_k is not None:
            return min(int(sae_k), self.n_feat)
        acts, mask = self._chunk_inputs(store, self.cfg.model, 0)
        sample = acts[mask][:CALIBRATION_TOKENS]
        l0 = max(
            (int(self._encode(a).ne(0).sum(1).max()) for a in self._batches(sample)), default=1
        )
        return calibrated_k(l0, self.n_feat)

    def prepare(self, store: Store) -> int | None:
        info = store.info(self.unit)
        rows, n_tok, n_feat = self._chunk_rows(info), int(info["n_tok"]), self.n_feat
        n_chunks = int(store.info(self.tokens)["n_chunks"])
        self.k = self._resolve_k(store)
        store.update_info(self.unit, k=self.k)
        info = store.info(self.unit)
        # mostly padding: zstd level 1 shrinks them ~7x at a fraction of the default level's cost
        fast = zarr.codecs.ZstdCodec(level=1)
        store.create_array(
            f"{self.unit}/idx",
            (n_tok, self.k),
            (rows, self.k),
            "int32",
            info,
            fill_value=-1,
            compressors=fast,
        )
        store.create_array(
            f"{self.unit}/val", (n_tok, self.k), (rows, self.k), "float32", info, compressors=fast
        )
        if self.cfg.exclude_norm_above is not None:
            store.create_array(f"{self.unit}/excluded", (n_tok,), (rows,), "bool", info)
        store.create_array(
            f"{self.unit}/chunk_stats",
            (n_chunks, len(STATS), n_feat),
            (1, len(STATS), n_feat),
            "float64",
            info,
        )
        d = int(info["d_model"])
        for b in self._transfer_names():
            store.create_array(
                f"{self.unit}/chunk_transfer_{b}_pair",
                (n_chunks, len(PAIR), n_feat),
                (1, len(PAIR), n_feat),
                "float64",
                info,
            )
            store.create_array(
                f"{self.unit}/chunk_transfer_{b}_scalars",
                (n_chunks, len(SCALARS) + 2 * d),
                (1, len(SCALARS) + 2 * d),
                "float64",
                info,
            )
        return n_chunks

    def load_prepared(self, store: Store) -> None:
        self.k = int(store.array(f"{self.unit}/idx").shape[1])  # fixed by prepare()

    def tokens_todo(self, store: Store, done: set[int]) -> int | None:
        info = store.info(self.unit)
        rows, n_tok = self._chunk_rows(info), int(info["n_tok"])
        n_chunks = int(store.info(self.tokens)["n_chunks"])
        return sum(min(rows, n_tok - i * rows) for i in range(n_chunks) if i not in done)

    # ---- encoding ---------------------------------------------------------------------------------
    def _chunk_inputs(
        self, store: Store, model: str, index: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        acts = load_acts(store, self.acts_of(model), index)
        mask = torch.from_numpy(store.read_chunk(f"{self.tokens}/mask", index).reshape(-1))
        if model == self.cfg.model and self.cfg.exclude_norm_above is not None:
            mask = mask & ~torch.from_numpy(high_norm(acts, self.norm_threshold(store)))
        if (
            self.input_transform(store)[0] == "centered"
        ):  # as TransformerLens's center_writing_weights
            acts = acts.float()
            acts = acts - acts.mean(dim=1, keepdim=True)
        return acts, mask

    def _batches(self, acts: torch.Tensor) -> Iterator[torch.Tensor]:
        for start in range(0, len(acts), self.cfg.batch_tokens):
            yield acts[start : start + self.cfg.batch_tokens].to(self.device, self.sae.dtype)

    @inference_mode
    def _encode(self, x: torch.Tensor) -> torch.Tensor:
        feats = self.sae.encode(x)
        return (feats.to_dense() if feats.is_sparse else feats).float()

    @inference_mode
    def compute(self, store: Store, todo: Callable[[int], bool]) -> Iterator[ChunkResult]:
        n_chunks = int(store.info(self.tokens)["n_chunks"])
        for index in range(n_chunks):
            if todo(index):
                yield self._compute_chunk(store, index)

    def _compute_chunk(self, store: Store, index: int) -> ChunkResult:
        acts, mask = self._chunk_inputs(store, self.cfg.model, index)
        n, f, k = len(acts), self.n_feat, self.k
        idx, val = np.full((n, k), -1, np.int32), np.zeros((n, k), np.float32)
        stats = new_feature_stats(f)
        dropped = total = 0.0
        b_inputs = {b: self._chunk_inputs(store, b, index)[0] for b in self.cfg.transfer_models}
        pair = {b: torch.zeros(len(PAIR), f, dtype=torch.float64) for b in b_inputs}
        scalars = {
            b: torch.zeros(len(SCALARS) + 2 * acts.shape[1], dtype=torch.float64) for b in b_inputs
        }
        bs = self.cfg.batch_tokens
        for start in range(0, n, bs):
            keep = mask[start : start + bs].to(self.device)
            x = acts[start : start + bs].to(self.device, self.sae.dtype)
            feats = self._encode(x)
            i, v, cols, vals = pack_sparse(feats, keep, k)
            stop = start + len(x)
            idx[start:stop], val[start:stop] = i.cpu().numpy(), v.cpu().numpy()
            mass = float(vals.abs().double().sum())
            total += mass
            dropped += mass - float(v.abs().double().sum())
            add_feature_stats(stats, cols.cpu(), vals.double().cpu(), int(keep.sum()))
            for b, b_acts in b_inputs.items():
                xb = b_acts[start:stop].to(self.device, self.sae.dtype)
                add_transfer_sums(self.sae, self._encode, x, feats, xb, keep, pair[b], scalars[b])
        fraction = dropped / total if total > 0 else 0.0
        if fraction > self.cfg.max_dropped_fraction:
            raise XprobeError(
                f"chunk {index} of {self.unit}: top-{k} storage drops {fraction:.3g} of the activation mass "
                f"(max_dropped_fraction = {self.cfg.max_dropped_fraction}). Set a larger k (the SAE's L0 "
                "exceeds it) or raise max_dropped_fraction, and rerun with --force."
            )
        arrays = {
            f"{self.unit}/idx": idx,
            f"{self.unit}/val": val,
            f"{self.unit}/chunk_stats": stats.numpy()[None],
        }
        for b, name in zip(self.cfg.transfer_models, self._transfer_names(), strict=True):
            arrays[f"{self.unit}/chunk_transfer_{name}_pair"] = pair[b].numpy()[None]
            arrays[f"{self.unit}/chunk_transfer_{name}_scalars"] = scalars[b].numpy()[None]
        record = {"dropped_mass": dropped, "total_mass": total, "dropped_fraction": fraction}
        if self.cfg.exclude_norm_above is not None:
            counted = store.read_chunk(f"{self.tokens}/mask", index).reshape(-1)
            excluded = counted & ~mask.numpy()
            arrays[f"{self.unit}/excluded"] = excluded
            record["n_excluded"] = int(excluded.sum())
        return ChunkResult(index, arrays, n_tok=n, record=record)

    # ---- finalize ---------------------------------------------------------------------------------
    def finalize(self, store: Store, n_chunks: int | None) -> dict[str, Any]:
        info = store.info(self.unit)
        n_tok, n_feat = int(info["n_tok"]), self.n_feat
        n_counted = int(store.info(self.tokens)["n_counted"])
        records = [store.chunk_record(self.unit, i) or {} for i in range(n_chunks)]
        n_excluded = sum(int(r.get("n_excluded", 0)) for r in records)
        n_counted -= n_excluded  # excluded positions count as masked
        # sums in chunk order: the same bits whether or not the run was resumed
        out = feature_stats(store.array(f"{self.unit}/chunk_stats")[:], n_counted, n_feat)
        for name, data in out.items():
            self._write_whole(store, f"{self.unit}/stats/{name}", data, info)
        dropped = sum(r.get("dropped_mass", 0.0) for r in records)
        total = sum(r.get("total_mass", 0.0) for r in records)
        k = int(store.array(f"{self.unit}/idx").shape[1])
        stored = store.nbytes_stored(f"{self.unit}/idx") + store.nbytes_stored(f"{self.unit}/val")
        extra = {
            "n_counted": n_counted,
            "n_dead": int(out["dead"].sum()),
            "dropped_mass": dropped,
            "dropped_fraction": dropped / total if total > 0 else 0.0,
            "bytes_per_token": 8 * k,  # idx int32 + val float32, uncompressed
            "bytes_per_token_on_disk": stored / max(n_tok, 1),
            "dense_bytes_per_token": 4 * n_feat,
        }
        if self.cfg.exclude_norm_above is not None:
            extra["exclude_norm_above"] = self.cfg.exclude_norm_above
            extra["norm_threshold"] = self.norm_threshold(store)
            extra["n_excluded"] = n_excluded
        if self.cfg.transfer_models:
            extra["transfer"] = {
                b: self._finalize_transfer(store, name, out, info)
                for b, name in zip(self.cfg.transfer_models, self._transfer_names(), strict=True)
            }
        return extra

    def _finalize_transfer(
        self, store: Store, name: str, stats: dict[str, np.ndarray], info: dict[str, Any]
    ) -> dict[str, float]:
        pair = store.array(f"{self.unit}/chunk_transfer_{name}_pair")[:].sum(0)
        scal = store.array(f"{self.unit}/chunk_transfer_{name}_scalars")[:].sum(0)
        d = int(info["d_model"])
        corr, metrics = transfer_metrics(pair, scal, stats["sum"], stats["sum_sq"], d)
        self._write_whole(store, f"{self.unit}/transfer/{name}/corr", corr, info)
        return metrics

    def _write_whole(self, store: Store, path: str, data: np.ndarray, info: dict[str, Any]) -> None:
        arr = store.create_array(path, data.shape, data.shape, data.dtype, info)
        arr[...] = data
        store.sync_chunk(arr, 0)


def run(
    cfg: FeaturesConfig, store: Store, force: bool = False, rebuild_stale: bool = False
) -> dict[str, Any]:
    from pipeline import lifecycle

    return lifecycle.run(
        FeaturesStage(cfg),
        store,
        force=force,
        rebuild_stale=rebuild_stale,
        progress=cfg.progress,
        cluster=lambda: client_for(cfg),  # None unless scheduler / workers is set
    )

"""Fit stage: one least-squares probe per SAE feature, from B's residual stream, out of core.

Reads B's activations ``acts/<corpus>/<model>/<hook>/x`` ``[n_tok, d_B]`` at one or several hooks,
A's sparse features ``feats/<corpus>/<sae>/{idx,val}`` and the tokens' mask. Sequences are split
into train and held-out (deterministic, by sequence); masked positions are skipped. Sufficient
statistics (n, means, centred XᵀX, XᵀY, Σy²; see pipeline/maths/lstsq.py) are accumulated per hook and
split, checkpointed with the list of consumed chunks, and all features are solved at once. λ and
the best hook are chosen by GCV on the training statistics; held-out tokens only score.

Writes ``probes/<name>/<hook>/``:
    direction [F, d_B] float32   B's direction for each feature (the probe: read direction)
    write_direction [F, d_B] float32   slope of B's activations on the feature (write direction)
    write_norm, write_r2 [F]     its scale: norm, and share of B's residual variance it explains
    intercept, lam, r2_train, r2_gcv, r2_held_out, pearson_held_out [F]
    n_active_train, n_active_held_out [F] int64, status [F] int8 (see pipeline/maths/lstsq.py)
    lambdas, df, mean_r2_held_out [L]
    r2_clipped_held_out, auroc_held_out [F] float64    from one pass over the held-out tokens
    r2_held_out_boot, r2_clipped_held_out_boot [F, n_bootstrap] float32   bootstrap replicates
    latent_scale [F]   Latent Scaling baseline, where B's width is the SAE's and the SAE loads
With ``affine_map`` (the affine-map baseline, pipeline/maths/stitch.py), also per hook:
    map_weight [d_A, d_B] float32, map_bias, map_lam, map_r2_train [d_A]   ridge map B -> A
    map_r2_held_out, map_auroc_held_out [F]   A's SAE on mapped held-out activations
    map_r2_held_out_boot [F, n_bootstrap] float32, map_r2_linear_train [F]
and ``probes/<name>/best_hook [F]`` (index into ``hooks``, by GCV R² on training tokens).
With ``classes``
(chat corpora), also ``<hook>/r2_held_out_<class> [F]``: the same probes scored on the held-out
tokens of one token class (``tokens/<corpus>/token_class``), from that class's statistics.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from tqdm.auto import tqdm

from pipeline.cluster import client_for, scheduler_field, workers_field
from pipeline.config import canonical, check_fields, runtime
from pipeline.device import resolve_device
from pipeline.errors import XprobeError
from pipeline.inputs.chat import TOKEN_CLASSES
from pipeline.lazy import torch
from pipeline.lineage import Input, unit_input
from pipeline.maths.evaluate import PredictionScores, ProbeScores, bootstrap_weights
from pipeline.maths.lstsq import (
    STATUS_OK,
    SufficientStats,
    r2_from_stats,
    solve_ridge,
    write_directions,
)
from pipeline.maths.split import held_out_sequences
from pipeline.maths.stitch import linear_r2_through_map, solve_map
from pipeline.stage import WholeStage
from pipeline.store import Store
from pipeline.store.checkpoint import load_checkpoint, save_checkpoint
from pipeline.store.layout import acts_unit, feats_unit, probes_unit, safe_name, tokens_unit
from pipeline.store.reader import excluded_rows, excluded_threshold, high_norm, load_acts
from pipeline.store.sparse import load_sparse, select_rows

CONSUMED_FILE = "consumed.json"
"""Side file of a fit unit: the chunks its checkpoint holds (read by pipeline.segments)."""


@dataclass(frozen=True)
class FitConfig:
    name: str
    """Name of this fit in the store (``probes/<name>``)."""
    corpus: str
    """Corpus the activations and features were computed on."""
    features: str
    """Store name of A's SAE features (``feats/<corpus>/<features>``)."""
    model: str
    """Store name of model B (``acts/<corpus>/<model>/...``)."""
    hooks: tuple[str, ...]
    """B's hook points to probe, e.g. ["blocks.4.hook_resid_post", "blocks.6.hook_resid_post"]."""
    held_out_fraction: float = 0.1
    """Fraction of sequences held out (chosen by a seeded draw per sequence)."""
    split_seed: int = 0
    lambdas: tuple[float, ...] = (0.0, 1e-4, 1e-3, 1e-2, 1e-1)
    """Ridge grid, in units of the mean eigenvalue of the centred XᵀX (scale-free); 0 = least squares."""
    min_active: int = 10
    """Features active on fewer training tokens get status 'too rare' instead of a probe."""
    n_bootstrap: int = 200
    """Bootstrap replicates over held-out sequences (Poisson weights seeded by split_seed, the same
    in every fit of the corpus): intervals for held-out R² and presence. Device memory 32·F·n."""
    compute_dtype: Literal["float32", "float64"] = "float32"
    """Dtype of the per-chunk products (accumulation is always float64)."""
    classes: tuple[str, ...] = ()
    """Chat corpora: also score each probe on the held-out tokens of these token classes
    (``template``, ``system``, ``user``, ``assistant``, ``other``): ``<hook>/r2_held_out_<class>``."""
    exclude_norm_above: float | None = None
    """Skip positions where B's residual L2 norm at any fitted hook exceeds this many times that
    hook's median norm (recorded by the activations stage): attention-sink / BOS-like tokens
    that dominate least squares. Positions A's features stage excluded are always skipped."""
    affine_map: bool = False
    """Affine-map baseline (model stitching, Chen et al. 2025): also fit one ridge map from B's
    residual at each hook to A's residual at the SAE's hook (as the SAE reads it), and score A's
    SAE encoder applied to mapped held-out activations against A's features: ``<hook>/map_*``.
    Reads A's activations too; extra statistics d_B·(d_A + d_B) float64 per hook."""
    device: str = "auto"
    feature_block: int = runtime(16384, "features solved at once")
    checkpoint_every: int = runtime(
        64, "chunks between accumulator checkpoints (also taken every checkpoint_seconds)"
    )
    checkpoint_seconds: float = runtime(
        600.0, "seconds between checkpoints: the statistics of a wide SAE are tens of GB"
    )
    progress: bool = runtime(True, "show a progress bar")
    scheduler: str | None = scheduler_field()
    workers: int | None = workers_field()

    def __post_init__(self) -> None:
        check_fields(self)
        if not self.hooks:
            raise XprobeError("fit needs at least one hook of model B (hooks = [...])")
        if not 0 <= self.held_out_fraction < 1:
            raise XprobeError(f"held_out_fraction must be in [0, 1), got {self.held_out_fraction}")
        if not self.lambdas or any(lam < 0 for lam in self.lambdas):
            raise XprobeError(
                f"lambdas must be a non-empty list of numbers >= 0, got {list(self.lambdas)}"
            )
        for value, what in [
            (self.min_active, "min_active"),
            (self.feature_block, "feature_block"),
            (self.checkpoint_every, "checkpoint_every"),
        ]:
            if value < 1:
                raise XprobeError(f"{what} must be at least 1, got {value}")
        if self.checkpoint_seconds <= 0:
            raise XprobeError(f"checkpoint_seconds must be positive, got {self.checkpoint_seconds}")
        if self.n_bootstrap < 0:
            raise XprobeError(f"n_bootstrap must be >= 0 (0: no intervals), got {self.n_bootstrap}")
        if self.exclude_norm_above is not None and not self.exclude_norm_above > 0:
            raise XprobeError(
                f"exclude_norm_above must be positive (× the median norm), got {self.exclude_norm_above}"
            )


class Fit:
    """The fit of one config on one store: validation, accumulation with checkpoints, solve."""

    def __init__(self, cfg: FitConfig, store: Store):
        self.cfg, self.store = cfg, store
        self.unit = probes_unit(cfg.name)
        self.tokens = tokens_unit(cfg.corpus)
        self.feats = feats_unit(cfg.corpus, cfg.features)
        self.acts = {hook: acts_unit(cfg.corpus, safe_name(cfg.model), hook) for hook in cfg.hooks}
        self.device = torch.device(resolve_device(cfg.device))
        self.dtype = torch.float64 if cfg.compute_dtype == "float64" else torch.float32
        self._thresholds: dict[str, float] | None = None
        self.segment: list[int] | None = None
        """A segmented run (pipeline.segments): the chunks this call consumes; inputs need
        only these, not be complete."""
        self.provider: Callable[[int], None] | None = None
        """A segmented run: called with a chunk index before the evaluation pass reads it, to
        compute again (and later evict) dense chunks that were evicted after accumulation."""
        # the affine-map baseline's target: A's residual at the SAE's hook (None: not asked for)
        self.a_acts: str | None = None
        if cfg.affine_map and store.has(self.feats):
            info = store.info(self.feats)
            if info.get("model") and info.get("hook"):
                self.a_acts = acts_unit(cfg.corpus, safe_name(info["model"]), info["hook"])

    def dense_units(self) -> list[str]:
        """Every activations unit this fit reads: B's hooks, and A's with ``affine_map``."""
        return [*self.acts.values(), *([self.a_acts] if self.a_acts is not None else [])]

    def norm_thresholds(self) -> dict[str, float]:
        """``exclude_norm_above`` × each hook's recorded median norm ({} when unset)."""
        if self._thresholds is None:
            factor = self.cfg.exclude_norm_above
            self._thresholds = (
                {}
                if factor is None
                else {h: excluded_threshold(self.store, u, factor) for h, u in self.acts.items()}
            )
        return self._thresholds

    def counted(self, index: int, xs: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """``[rows] bool``: positions of chunk ``index`` that count: the tokens' mask, less those
        the features stage excluded for their norm, less (``exclude_norm_above``) those where B's
        norm at any fitted hook exceeds its threshold. ``xs``: B's activations, if loaded."""
        store = self.store
        mask = torch.from_numpy(store.read_chunk(f"{self.tokens}/mask", index).reshape(-1))
        excluded = excluded_rows(store, self.feats, index)
        if excluded is not None:
            mask = mask & ~torch.from_numpy(excluded)
        for hook, threshold in self.norm_thresholds().items():
            x = xs[hook] if xs is not None else load_acts(store, self.acts[hook], index)
            mask = mask & ~torch.from_numpy(high_norm(x, threshold))
        return mask

    def validate(self) -> dict[str, Any]:
        store, cfg = self.store, self.cfg
        for unit, what in [
            (self.tokens, "tokenize"),
            (self.feats, "features"),
            *((u, "activations") for u in self.acts.values()),
        ]:
            if not store.has(unit):
                raise XprobeError(f"{unit} is not in the store; run the {what} stage first")
            if not store.info(unit).get("complete") and (
                self.segment is None or what == "tokenize"
            ):
                raise XprobeError(f"{unit} is incomplete; finish the {what} stage first")
        tokens, feats = store.info(self.tokens), store.info(self.feats)
        for unit in [self.feats, *self.acts.values()]:
            if store.info(unit).get("corpus_fingerprint") != tokens["corpus_fingerprint"]:
                raise XprobeError(
                    f"{unit} was computed on another version of corpus {cfg.corpus!r}; recompute it"
                )
        d_models = {store.info(u)["d_model"] for u in self.acts.values()}
        if len(d_models) != 1:
            raise XprobeError(
                f"hooks {list(cfg.hooks)} have different widths {sorted(d_models)}; fit them separately"
            )
        if self.segment is None and self.provider is None:
            self.refuse_evicted()
        held_out_sequences(1, cfg.held_out_fraction, cfg.split_seed)
        affine = self._validate_affine_map() if cfg.affine_map else {}
        self.norm_thresholds()  # refuses activations stored without norms
        if cfg.classes:
            unknown = [c for c in cfg.classes if c not in TOKEN_CLASSES]
            if unknown:
                raise XprobeError(
                    f"classes {unknown} unknown; token classes are {list(TOKEN_CLASSES)}"
                )
            if "token_classes" not in tokens:
                raise XprobeError(
                    f"classes needs a chat corpus: {self.tokens} has no token classes (tokenize "
                    "conversations with chat_template_from)"
                )
        return {
            "corpus": cfg.corpus,
            "model": cfg.model,
            "sae": cfg.features,
            "hooks": list(cfg.hooks),
            "d_model": d_models.pop(),
            "n_feat": int(feats["n_feat"]),
            "n_chunks_planned": int(tokens["n_chunks"]),
            "tokenizer_fingerprint": tokens["tokenizer_fingerprint"],
            "corpus_fingerprint": tokens["corpus_fingerprint"],
            "dtype": "float32",
            **(
                {"exclude_norm_above": cfg.exclude_norm_above, "norm_thresholds": self._thresholds}
                if cfg.exclude_norm_above is not None
                else {}
            ),
            **affine,
        }

    def _validate_affine_map(self) -> dict[str, Any]:
        """Checks and facts of the affine-map baseline: A's activations at the SAE's hook are
        stored, complete, on this corpus, as wide as the SAE's input, and the SAE loads."""
        from pipeline.inputs.sae import load_sae_of

        store, feats = self.store, self.store.info(self.feats)
        if self.a_acts is None:
            raise XprobeError(
                f"affine_map needs A's activations, but {self.feats} records no model and hook"
            )
        if not store.has(self.a_acts) or (
            not store.info(self.a_acts).get("complete") and self.segment is None
        ):
            raise XprobeError(
                f"affine_map needs A's activations {self.a_acts}, which are not (completely) in "
                "the store: run the activations stage of A at the SAE's hook"
            )
        a_info = store.info(self.a_acts)
        if a_info.get("corpus_fingerprint") != store.info(self.tokens)["corpus_fingerprint"]:
            raise XprobeError(f"{self.a_acts} was computed on another version of the corpus")
        sae = load_sae_of(store, self.feats)  # XprobeError when it does not load: no map
        if int(sae.cfg.d_in) != int(a_info["d_model"]):
            raise XprobeError(
                f"the SAE reads d_in = {sae.cfg.d_in} but {self.a_acts} has d_model = "
                f"{a_info['d_model']}"
            )
        return {
            "affine_map": {
                "a_activations": self.a_acts,
                "d_a": int(a_info["d_model"]),
                "sae_input": feats.get("sae_input", "raw"),
            }
        }

    def a_residual(self, index: int, shared: dict | None = None) -> torch.Tensor:
        """A's residual of chunk ``index`` ``[rows, d_A]`` as the SAE reads it (centred over
        d_model where the features stage centred it: ``sae_input``)."""
        assert self.a_acts is not None
        a = self.read(self.a_acts, index, shared)
        if self.store.info(self.feats).get("sae_input", "raw") == "centered":
            a = a.float()
            a = a - a.mean(dim=1, keepdim=True)
        return a

    # ---- accumulation with checkpoints --------------------------------------------------------
    def fresh_stats(self, d: int, n_feat: int) -> dict[str, dict[str, SufficientStats]]:
        """Empty statistics per hook: train, held-out, and with ``classes`` the held-out tokens
        of each class (``held_out/<class>``: another cxx [d, d] and cyx [F, d] each); with
        ``affine_map``, ``map``: train statistics of B's x against A's residual (dense [d_A])."""
        splits = ("train", "held_out", *(f"held_out/{c}" for c in self.cfg.classes))
        out = {
            hook: {split: SufficientStats(d, n_feat, self.device, self.dtype) for split in splits}
            for hook in self.cfg.hooks
        }
        if self.cfg.affine_map:
            d_a = int(self.store.info(self.a_acts)["d_model"])
            for hook in self.cfg.hooks:
                out[hook]["map"] = SufficientStats(d, d_a, self.device, self.dtype)
        return out

    def _load_checkpoint(self, d: int, n_feat: int) -> tuple[list[int], dict]:
        state = load_checkpoint(self.store, self.unit)
        if state is None:
            return [], self.fresh_stats(d, n_feat)
        stats = {
            hook: {
                split: SufficientStats.from_state_dict(sd, self.device, self.dtype)
                for split, sd in splits.items()
            }
            for hook, splits in state["stats"].items()
        }
        return list(state["consumed"]), stats

    def _save_checkpoint(self, consumed: list[int], stats: dict) -> None:
        state = {
            "consumed": consumed,
            "stats": {h: {s: st.state_dict() for s, st in sp.items()} for h, sp in stats.items()},
        }
        save_checkpoint(self.store, self.unit, state)
        # what a segmented run's scheduler reads to know what may be evicted (never ahead of
        # the checkpoint: written after it)
        self.store.write_text(f"{self.unit}/{CONSUMED_FILE}", json.dumps(sorted(consumed)))

    def consumed_chunks(self) -> set[int]:
        """Chunks whose statistics are in the checkpoint (all, once the fit is complete)."""
        store = self.store
        if store.has(self.unit) and store.info(self.unit).get("complete"):
            return set(range(int(store.info(self.unit)["n_chunks"])))
        text = store.read_text(f"{self.unit}/{CONSUMED_FILE}") if store.has(self.unit) else None
        return set(json.loads(text)) if text else set()

    def refuse_evicted(self) -> None:
        """Outside a segmented run: refuse, before anything is written, a fit that would need
        dense chunks a segmented run evicted (a fit already complete needs none)."""
        store = self.store
        if store.has(self.unit) and store.info(self.unit).get("complete"):
            return
        for unit in self.dense_units():
            gone = sorted(store.evicted_chunks(unit)) if store.has(unit) else []
            if gone:
                shown = ", ".join(map(str, gone[:8])) + (", ..." if len(gone) > 8 else "")
                raise XprobeError(
                    f"{len(gone)} chunk(s) of {unit} ({shown}) were consumed and evicted by a "
                    "segmented run (--max-disk), and this fit needs them: `xprobe run CONFIG` "
                    "computes them again (with --max-disk, a segment at a time)"
                )

    def held_out_mask(self) -> torch.Tensor:
        """[n_seq] bool: the held-out sequences of this fit's corpus."""
        tokens = self.store.info(self.tokens)
        return torch.from_numpy(
            held_out_sequences(tokens["n_seq"], self.cfg.held_out_fraction, self.cfg.split_seed)
        )

    def read(self, unit: str, index: int, shared: dict | None = None) -> Any:
        """Chunk ``index`` of a dense unit (``acts/...``: its activations) or of a features unit
        (its sparse rows); ``shared``: chunks already read by another fit of the same segment."""
        if shared is not None and (unit, index) in shared:
            return shared[(unit, index)]
        if unit.startswith("feats/"):
            value = load_sparse(self.store, unit, index)
        else:
            value = load_acts(self.store, unit, index)
        if shared is not None:
            shared[(unit, index)] = value
        return value

    def add_chunk(
        self, stats: dict, index: int, held: torch.Tensor, shared: dict | None = None
    ) -> None:
        """Add chunk ``index`` (every hook, train and held-out tokens) to ``stats``. ``shared``:
        chunks read once for several fits (``FitStage.consume_all``)."""
        store = self.store
        tokens = store.info(self.tokens)
        ctx, chunk_seqs = tokens["ctx"], tokens["chunk_seqs"]
        xs = {hook: self.read(unit, index, shared) for hook, unit in self.acts.items()}
        mask = self.counted(index, xs)
        seq = index * chunk_seqs + torch.arange(len(mask)) // ctx
        rows, cols, vals = self.read(self.feats, index, shared)
        splits = {"train": mask & ~held[seq], "held_out": mask & held[seq]}
        if self.cfg.classes:
            cls = torch.from_numpy(
                store.read_chunk(f"{self.tokens}/token_class", index).reshape(-1)
            )
            for c in self.cfg.classes:
                splits[f"held_out/{c}"] = splits["held_out"] & (cls == TOKEN_CLASSES.index(c))
        if self.cfg.affine_map:  # the map's targets: A's residual on the training tokens
            train = splits["train"]
            a = self.a_residual(index, shared)[train].to(self.device) if bool(train.any()) else None
        for hook, x in xs.items():
            if self.cfg.affine_map and a is not None:
                stats[hook]["map"].update_dense(x[splits["train"]].to(self.device), a)
            for split, keep in splits.items():
                if bool(keep.any()):
                    r, c, v = select_rows(rows, cols, vals, keep)
                    stats[hook][split].update(
                        x[keep].to(self.device),
                        r.to(self.device),
                        c.to(self.device),
                        v.to(self.device),
                    )

    def accumulate(
        self, d: int, n_feat: int, client: Any = None, only: list[int] | None = None
    ) -> dict:
        """Statistics of every chunk (``only``: of these, a segment), resuming from the
        checkpoint; with a dask ``client`` the missing chunks are partition tasks on its
        workers, summed by a tree of merges."""
        store, cfg = self.store, self.cfg
        tokens = store.info(self.tokens)
        ctx, chunk_seqs, n_chunks = tokens["ctx"], tokens["chunk_seqs"], tokens["n_chunks"]
        held = self.held_out_mask()
        consumed, stats = self._load_checkpoint(d, n_feat)
        todo = [i for i in (range(n_chunks) if only is None else only) if i not in set(consumed)]
        rows = {i: min(chunk_seqs, tokens["n_seq"] - i * chunk_seqs) * ctx for i in todo}
        bar = tqdm(
            total=sum(rows.values()),
            unit="tok",
            unit_scale=True,
            desc="fit",
            disable=not cfg.progress,
            mininterval=1.0,
        )
        if client is not None and todo:
            from pipeline.distributed import accumulate_fit

            try:  # the bar moves a partition at a time, as the workers finish them
                partial = accumulate_fit(
                    client,
                    self,
                    todo,
                    d,
                    n_feat,
                    on_partition=lambda part: bar.update(sum(rows[i] for i in part)),
                )
            finally:
                bar.close()
            for hook, splits in partial.items():
                for split, part in splits.items():
                    stats[hook][split].merge(part)
            self._save_checkpoint(consumed + todo, stats)
            return stats
        last_checkpoint = time.monotonic()
        try:
            for n, index in enumerate(todo):
                self.add_chunk(stats, index, held)
                consumed.append(index)
                bar.update(rows[index])
                due = time.monotonic() - last_checkpoint >= cfg.checkpoint_seconds
                if due or len(consumed) % cfg.checkpoint_every == 0 or n == len(todo) - 1:
                    self._save_checkpoint(consumed, stats)
                    last_checkpoint = time.monotonic()
        finally:
            bar.close()
        return stats

    # ---- solve and write ----------------------------------------------------------------------
    def solve_and_write(self, stats: dict, n_feat: int) -> dict[str, Any]:
        """Solve every hook's probes (and, with ``affine_map``, its map), score them in one pass
        over the held-out tokens and write them. Hook by hook; in a segmented run (``provider``
        set) all hooks are scored in one pass, so evicted chunks are computed again once, not
        once per hook (same numbers: each hook's sums run over the chunks in the same order)."""
        store, cfg = self.store, self.cfg
        prov = store.info(self.unit)
        gcv_r2 = []  # [hooks][F]: what picks the best hook (training tokens only)
        summary: dict[str, Any] = {}
        decoder = self.sae_decoder(stats[cfg.hooks[0]]["train"].d)
        through = self.sae_through_map() if cfg.affine_map else None
        solved: dict[str, tuple[dict[str, Any], dict[str, Any] | None]] = {}

        def write(scores: dict[str, dict]) -> None:
            for hook, (result, mapped) in solved.items():
                self.write_hook(hook, result, stats[hook], scores)
                gcv_r2.append(np.asarray(result["r2_gcv"]))
                summary[hook] = self.hook_summary(hook, result, mapped, stats[hook], prov)
            solved.clear()

        for hook in cfg.hooks:
            solved[hook] = self.solve_hook(stats[hook], decoder, through)
            if self.provider is None:
                write(self.held_out_scores(solved, stats, through))
        if solved:
            write(self.held_out_scores(solved, stats, through))
        best = np.argmax(np.stack(gcv_r2), axis=0).astype(np.int32)
        if store.has(f"{self.unit}/best_hook"):
            store.delete(f"{self.unit}/best_hook")
        store.create_array(f"{self.unit}/best_hook", best.shape, best.shape, best.dtype, prov)[
            ...
        ] = best
        return summary

    def solve_hook(
        self, stats: dict, decoder: torch.Tensor | None, through: SaeThroughMap | None
    ) -> tuple[dict[str, Any], dict[str, Any] | None]:
        """One hook's probes from its training statistics (λ by GCV), write directions, the
        Latent Scaling baseline and the affine map (``through``: A's SAE; its solve is returned
        beside the arrays); no held-out token is read."""
        cfg = self.cfg
        train, held = stats["train"], stats["held_out"]
        if train.n == 0:
            raise XprobeError(
                "no training tokens: the corpus is too small for this held_out_fraction"
            )
        scale = float(torch.trace(train.cxx)) / train.cxx.shape[0]
        lambdas = [lam * scale for lam in cfg.lambdas]
        result = solve_ridge(
            train,
            held if held.n > 0 else None,
            lambdas,
            feature_block=cfg.feature_block,
            min_active=cfg.min_active,
        )
        # B's write direction (decoder row) per feature, beside the probe (encoder row)
        ok = np.asarray(result["status"]) == STATUS_OK
        result.update(write_directions(train, ok, cfg.feature_block))
        mapped = None
        if through is not None:
            mapped = solve_map(stats["map"], cfg.lambdas, cfg.feature_block)
            result.update(self.map_arrays(mapped, train, through, ok))
        if decoder is not None:
            result["latent_scale"] = latent_scale(train, decoder, cfg.feature_block)
        return result, mapped

    def write_hook(
        self, hook: str, result: dict[str, Any], stats: dict, scores: dict[str, dict]
    ) -> None:
        """Write one hook's arrays (``probes/<name>/<hook>/...``), its held-out scores included."""
        store = self.store
        prov = store.info(self.unit)
        result.update(scores.get(hook, {}))
        for key, value in result.items():
            value = value.cpu().numpy() if isinstance(value, torch.Tensor) else np.asarray(value)
            if key == "direction":
                value = value.astype(np.float32)
            path = f"{self.unit}/{hook}/{key}"
            if store.has(path):
                store.delete(path)
            chunks = (min(len(value), 4096),) + value.shape[1:] if value.ndim else ()
            arr = store.create_array(path, value.shape, chunks or value.shape, value.dtype, prov)
            arr[...] = value

    def hook_summary(
        self,
        hook: str,
        result: dict[str, Any],
        mapped: dict[str, Any] | None,
        stats: dict,
        prov: dict[str, Any],
    ) -> dict[str, Any]:
        """Medians for the run's summary; with ``classes``, each class's held-out R² (written)."""
        store, cfg = self.store, self.cfg
        r2 = np.asarray(
            result["r2_held_out"].cpu()
            if isinstance(result["r2_held_out"], torch.Tensor)
            else result["r2_held_out"]
        )
        ok = (
            np.asarray(
                result["status"].cpu()
                if isinstance(result["status"], torch.Tensor)
                else result["status"]
            )
            == 0
        )
        out: dict[str, Any] = {
            "median_r2_held_out": float(np.median(r2[ok])) if ok.any() else None,
            "n_ok": int(ok.sum()),
        }
        if mapped is not None:
            out["map_r2_train_total"] = float(mapped["r2_train_total"])
            if "map_r2_held_out" in result and ok.any():
                out["median_map_r2_held_out"] = float(np.nanmedian(result["map_r2_held_out"][ok]))
        for c in cfg.classes:
            by_class = stats[f"held_out/{c}"]
            r2_c = np.where(
                ok, r2_from_stats(by_class, result["direction"], result["intercept"]), 0.0
            )
            path = f"{self.unit}/{hook}/r2_held_out_{c}"
            if store.has(path):
                store.delete(path)
            store.create_array(path, r2_c.shape, r2_c.shape, r2_c.dtype, prov)[...] = r2_c
            defined = ok & np.isfinite(r2_c)
            out[f"n_tok_held_out_{c}"] = int(by_class.n)
            out[f"median_r2_held_out_{c}"] = (
                float(np.median(r2_c[defined])) if defined.any() else None
            )
        return out

    def held_out_scores(
        self,
        solved: dict[str, tuple[dict[str, Any], dict[str, Any] | None]],
        stats: dict,
        through: SaeThroughMap | None = None,
    ) -> dict[str, dict[str, np.ndarray]]:
        """One pass over the held-out tokens with the solved probes of the hooks in ``solved``
        (hook -> (arrays, map solve)): R² of the prediction clipped at 0, firing AUROC, and
        bootstrap replicates of R² (raw and clipped) over held-out sequences
        (pipeline/maths/evaluate.py), per hook. NaN where the probe's status is not ok. With the
        affine map (its solve, and ``through``: A's SAE), the same scores of
        ``sae.encode(x·Mᵀ + c)`` on the same tokens: ``map_*``. Hooks without held-out tokens
        are left out."""
        store, cfg = self.store, self.cfg
        tokens = store.info(self.tokens)
        ctx, chunk_seqs, n_seq = tokens["ctx"], tokens["chunk_seqs"], tokens["n_seq"]
        held = self.held_out_mask()
        hooks = [h for h in solved if stats[h]["held_out"].n > 0]
        if not hooks:
            return {}
        scorers, map_scorers = {}, {}
        for hook in hooks:
            train = stats[hook]["train"]
            result, mapped = solved[hook]
            scorers[hook] = ProbeScores(
                torch.from_numpy(np.ascontiguousarray(result["direction"])),
                torch.from_numpy(result["intercept"]),
                train.mean_y.cpu(),
                torch.sqrt(train.syy.cpu() / train.n),
                self.device,
                self.dtype,
                n_boot=cfg.n_bootstrap,
                feature_block=cfg.feature_block,
            )
            if mapped is not None and through is not None:
                map_scorers[hook] = PredictionScores(
                    through.predictor(mapped["weight"], mapped["bias"], self.device, self.dtype),
                    train.n_feat,
                    train.d,
                    train.mean_y.cpu(),
                    torch.sqrt(train.syy.cpu() / train.n),
                    self.device,
                    self.dtype,
                    n_boot=cfg.n_bootstrap,
                )
        for index in range(tokens["n_chunks"]):
            first = index * chunk_seqs
            n_seqs = min(chunk_seqs, n_seq - first)
            if not bool(held[first : first + n_seqs].any()):
                continue
            if self.provider is not None:
                self.provider(index)
            mask = self.counted(index)
            local_seq = torch.arange(len(mask)) // ctx
            keep = mask & held[first + local_seq]
            rows, cols, vals = select_rows(*load_sparse(store, self.feats, index), keep)
            weights = torch.from_numpy(
                bootstrap_weights(cfg.split_seed, index, n_seqs, cfg.n_bootstrap)
            )
            for hook in hooks:
                x = load_acts(store, self.acts[hook], index)[keep]
                scorers[hook].update(x, rows, cols, vals, weights, groups=local_seq[keep])
                if hook in map_scorers:
                    map_scorers[hook].update(x, rows, cols, vals, weights, groups=local_seq[keep])
        boot = {"r2_boot": "r2_held_out_boot", "r2_clipped_boot": "r2_clipped_held_out_boot"}
        named = {"r2_clipped": "r2_clipped_held_out", "auroc": "auroc_held_out", **boot}
        map_named = {
            "r2": "map_r2_held_out",
            "auroc": "map_auroc_held_out",
            "r2_boot": "map_r2_held_out_boot",
        }
        written: dict[str, dict[str, np.ndarray]] = {}
        for hook in hooks:
            out = scorers[hook].result()
            bad = solved[hook][0]["status"] != STATUS_OK
            written[hook] = {}
            for key, name in named.items():
                if key in out:
                    value = out[key].astype(np.float32 if key in boot else np.float64)
                    value[bad] = np.nan
                    written[hook][name] = value
            if hook in map_scorers:  # encode is >= 0 (ReLU, TopK, JumpReLU): clipped R² is R²
                scored = map_scorers[hook].result()
                for key, name in map_named.items():
                    if key in scored:
                        value = scored[key].astype(np.float32 if key == "r2_boot" else np.float64)
                        value[bad] = np.nan
                        written[hook][name] = value
        return written

    def sae_through_map(self) -> SaeThroughMap:
        """A's SAE (the features' own, in their encode dtype, on this fit's device) for the map."""
        from pipeline.inputs.sae import load_sae_of

        info = self.store.info(self.feats)
        sae = load_sae_of(self.store, self.feats, device=str(self.device))
        dtype = getattr(torch, str(info.get("encode_dtype", "float32")))
        centered = info.get("sae_input", "raw") == "centered"
        return SaeThroughMap(sae.to(dtype=dtype), centered)

    def map_arrays(
        self,
        mapped: dict[str, np.ndarray],
        train: SufficientStats,
        through: SaeThroughMap,
        ok: np.ndarray,
    ) -> dict[str, np.ndarray]:
        """The map as stored (``map_weight [d_A, d_B]`` float32, ``map_bias``, ``map_lam``,
        ``map_r2_train`` [d_A]) and, where the SAE's pre-activation is affine, the training R² of
        that pre-activation read through the map (``map_r2_linear_train [F]``, NaN where the
        probe's status is not ok)."""
        out = {
            "map_weight": mapped["weight"].astype(np.float32),
            "map_bias": mapped["bias"],
            "map_lam": mapped["lam"],
            "map_r2_train": mapped["r2_train"],
        }
        affine = through.affine_preactivation()
        if affine is not None:
            enc_weight, enc_bias = affine
            r2 = linear_r2_through_map(
                train,
                mapped["weight"],
                mapped["bias"],
                enc_weight,
                enc_bias,
                self.cfg.feature_block,
            )
            out["map_r2_linear_train"] = np.where(ok, r2, np.nan)
        return out

    def sae_decoder(self, d: int) -> torch.Tensor | None:
        """A's decoder rows ``W_dec [F, d]`` (float64, on this fit's device) when the SAE the
        features were computed with loads and writes in B's width d; else None (no baseline)."""
        from pipeline.inputs.sae import load_sae_of

        try:
            sae = load_sae_of(self.store, self.feats)
        except XprobeError:  # a shared cache may not come with its SAE: no baseline, no failure
            return None
        w_dec = sae.W_dec.detach()
        if w_dec.shape[1] != d:
            return None
        return w_dec.to(self.device, torch.float64)


class SaeThroughMap:
    """A's SAE read on B's activations through an affine map: ``encode(x·Mᵀ + c)``, the mapped
    activations centred over d_A first where the features stage centred A's (``centered``)."""

    def __init__(self, sae: Any, centered: bool):
        self.sae, self.centered = sae, centered

    def prepare(self, y: torch.Tensor) -> torch.Tensor:
        """The SAE's input from A-space activations ``y [rows, d_A]``."""
        y = y.to(self.sae.W_enc.device, self.sae.dtype)
        return y - y.mean(dim=1, keepdim=True) if self.centered else y

    def predictor(
        self, weight: np.ndarray, bias: np.ndarray, device: torch.device, dtype: torch.dtype
    ) -> Any:
        """``predict(x [rows, d_B]) -> [rows, F]`` float64 on ``device``: the map's GEMM in
        ``dtype`` (the fit's compute dtype), its bias added in float64, then the SAE."""
        m = torch.from_numpy(np.ascontiguousarray(weight)).to(device, dtype)
        c = torch.from_numpy(np.asarray(bias)).to(device, torch.float64)

        def predict(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad():
                y = (x.to(device, dtype) @ m.T).to(torch.float64) + c
                feats = self.sae.encode(self.prepare(y))
                feats = feats.to_dense() if feats.is_sparse else feats
                return feats.to(device, torch.float64)

        return predict

    def affine_preactivation(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(E [d_A, F] float32, e [F] float64)`` with the SAE's pre-activation (its ``hook_sae_acts_pre``,
        after ``prepare``) equal to ``y·E + e``, read off at y = 0 and the unit vectors and checked
        at a random y; None where the SAE has no such hook or its pre-activation is not affine.
        E is as large as W_enc; it holds differences of the SAE's own (float32 or narrower)
        outputs, so float64 would add memory, not precision."""
        sae = self.sae
        hook = getattr(sae, "hook_sae_acts_pre", None)
        if hook is None:
            return None
        d_a = int(sae.cfg.d_in)
        device = sae.W_enc.device
        generator = torch.Generator().manual_seed(0)
        probe = torch.randn(1, d_a, generator=generator, dtype=torch.float64)
        inputs = torch.cat([torch.zeros(1, d_a, dtype=torch.float64), probe]).to(device)
        captured: list[torch.Tensor] = []
        handle = hook.register_forward_hook(lambda _m, _i, out: captured.append(out.detach()))
        try:
            with torch.no_grad():
                sae.encode(self.prepare(inputs))
                pre = captured[-1].to(torch.float64)
                e, at_probe = pre[0], pre[1]
                enc = torch.empty(d_a, pre.shape[1], dtype=torch.float32, device=device)
                step = max(1, (1 << 22) // max(pre.shape[1], 1))
                eye = torch.eye(d_a, dtype=torch.float64, device=device)
                for start in range(0, d_a, step):
                    sae.encode(self.prepare(eye[start : start + step]))
                    enc[start : start + step] = captured[-1].to(torch.float64) - e
        finally:
            handle.remove()
        expected = (probe.to(device, torch.float32)[0] @ enc).to(torch.float64) + e
        tolerance = 1e-3 * float(expected.abs().max().clamp(min=1.0))
        if float((expected - at_probe).abs().max()) > tolerance:
            return None
        return enc, e


def latent_scale(train: SufficientStats, decoder: torch.Tensor, feature_block: int) -> np.ndarray:
    """Latent Scaling (Minder et al. 2025) [F]: the least-squares scale β_f of A's decoder row d_f
    fitted to B's training activations x where the feature fires,
    ``β_f = argmin_β Σ_t ‖x_t − β·y_tf·d_f‖² = d_f·Σ_t y_tf x_t / (‖d_f‖² Σ_t y_tf²)``, from the
    statistics (``Σ y x = cyx + n μy μx``, ``Σ y² = syy + n μy²``); NaN where the feature never
    fires or its decoder row is zero. ``decoder [F, d]``."""
    out = np.full(train.n_feat, np.nan)
    for start in range(0, train.n_feat, feature_block):
        block = slice(start, min(start + feature_block, train.n_feat))
        mean_y = train.mean_y[block]
        cross = train.cyx[block] + train.n * mean_y[:, None] * train.mean_x[None, :]
        rows = decoder[block]
        numerator = (cross * rows).sum(1)
        denominator = rows.square().sum(1) * (train.syy[block] + train.n * mean_y.square())
        beta = torch.where(denominator > 0, numerator / denominator.clamp(min=1e-300), torch.nan)
        out[block] = beta.cpu().numpy()
    return out


class FitStage(WholeStage):
    """The fit as a stage of the lifecycle: one unit ``probes/<name>``."""

    name = "fit"
    cfg: FitConfig

    def identity(self) -> Any:
        """The config, without ``classes`` when unused (fits made before it keep their
        fingerprint)."""
        out = canonical(self.cfg)
        if not self.cfg.classes:
            del out["classes"]
        if self.cfg.exclude_norm_above is None:
            del out["exclude_norm_above"]
        if not self.cfg.affine_map:
            del out["affine_map"]
        return out

    provider: Callable[[int], None] | None = None
    """Set by a segmented run (pipeline.segments): see ``Fit.provider``."""

    def validate(self, store: Store) -> None:
        self.fit = Fit(self.cfg, store)
        self.fit.segment, self.fit.provider = self.segment, self.provider
        self.facts = self.fit.validate()

    def consume(self, store: Store, chunks: list[int], client: Any = None) -> int:
        """A segment of a segmented run: add ``chunks`` (those not yet in it) to the checkpoint."""
        before = self.fit.consumed_chunks()
        self.fit.accumulate(self.facts["d_model"], self.facts["n_feat"], client, only=chunks)
        return len(set(chunks) - before)

    @classmethod
    def consume_all(cls, stages: list[Any], store: Store, chunks: list[int]) -> dict[str, int]:
        """Several fits consume a segment in one pass: each chunk of B's activations (and of the
        features) is read once for every fit that needs it. Every fit's statistics are held at
        once; each checkpoints as ``accumulate`` does. Sums run in the same order as alone."""
        fits = [stage.fit for stage in stages]
        state = []
        for stage, fit in zip(stages, fits, strict=True):
            consumed, stats = fit._load_checkpoint(stage.facts["d_model"], stage.facts["n_feat"])
            state.append((fit, consumed, stats, fit.held_out_mask(), set(consumed)))
        counts = {fit.unit: 0 for fit in fits}
        last = time.monotonic()
        every = min(fit.cfg.checkpoint_every for fit in fits)
        seconds = min(fit.cfg.checkpoint_seconds for fit in fits)
        for n, index in enumerate(chunks):
            shared: dict = {}
            for fit, consumed, stats, held, seen in state:
                if index in seen:
                    continue
                fit.add_chunk(stats, index, held, shared)
                consumed.append(index)
                seen.add(index)
                counts[fit.unit] += 1
            if time.monotonic() - last >= seconds or (n + 1) % every == 0 or n == len(chunks) - 1:
                for fit, consumed, stats, _, _ in state:
                    if counts[fit.unit]:  # a fit with nothing new keeps its checkpoint
                        fit._save_checkpoint(consumed, stats)
                last = time.monotonic()
        return counts

    def units(self, store: Store) -> dict[str, dict[str, Any]]:
        return {self.fit.unit: self.facts}

    def inputs(self, store: Store) -> dict[str, Input]:
        fit = self.fit
        return {
            "tokens": unit_input(store, fit.tokens),
            "features": unit_input(store, fit.feats),
            **{
                f"activations at {hook}": unit_input(store, unit) for hook, unit in fit.acts.items()
            },
            **(
                {"activations of A (affine map)": unit_input(store, fit.a_acts)}
                if fit.a_acts is not None
                else {}
            ),
        }

    def build(self, store: Store, client: Any = None) -> tuple[int, dict[str, Any]]:
        facts = self.facts
        stats = self.fit.accumulate(facts["d_model"], facts["n_feat"], client)
        summary = self.fit.solve_and_write(stats, facts["n_feat"])
        first = stats[self.cfg.hooks[0]]
        n_train, n_held = int(first["train"].n), int(first["held_out"].n)
        # counted tokens the fit skipped for their norm (its own threshold or the features')
        n_counted = int(store.info(self.fit.tokens).get("n_counted", n_train + n_held))
        return facts["n_chunks_planned"], {
            "summary": summary,
            "n_tok_train": n_train,
            "n_tok_held_out": n_held,
            "n_excluded": n_counted - n_train - n_held,
        }


def run(
    cfg: FitConfig, store: Store, force: bool = False, rebuild_stale: bool = False
) -> dict[str, Any]:
    from pipeline import lifecycle

    return lifecycle.run(
        FitStage(cfg),
        store,
        force=force,
        rebuild_stale=rebuild_stale,
        progress=cfg.progress,
        cluster=lambda: client_for(cfg),  # None unless scheduler / workers is set
    )

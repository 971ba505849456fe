"""What a fit reads per chunk: B's activations at its hooks ``[rows, d_B]``, A's sparse features
(COO rows), A's residual at the SAE's hook ``[rows, d_A]`` (the affine map), the tokens' mask and
token classes, and which sequences are held out.

:class:`FitInputs` names the units, checks them before anything is written (``validate``) and
reads one chunk at a time (``read``: with ``shared``, a chunk read once for several fits of one
segmented run); :meth:`FitInputs.counted` says which positions of a chunk count.
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np

from pipeline.device import resolve_device
from pipeline.documents import split_documents
from pipeline.errors import XprobeError
from pipeline.inputs.chat import TOKEN_CLASSES
from pipeline.lazy import torch
from pipeline.maths.split import held_out_sequences
from pipeline.probes.config import FitConfig
from pipeline.store import Store
from pipeline.store.layout import acts_unit, feats_unit, probes_unit, safe_name, tokens_unit
from pipeline.store.reader import excluded_rows, excluded_threshold, high_norm, load_acts
from pipeline.store.sparse import load_sparse

CONSUMED_FILE = "consumed.json"
"""Side file of a fit unit: the chunks its checkpoint holds (read by pipeline.segments)."""


class FitInputs:
    """The units one fit config reads on one store, and how a chunk of them is read."""

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
        self.provider: Any = None
        """A segmented run: called with a chunk index before the evaluation pass reads it, to
        compute again (and later evict) dense chunks that were evicted after accumulation."""
        # A's residual at the SAE's hook: the single-layer model's targets (its pre-activation)
        # and the affine map's (None: neither is asked for)
        self.needs_a = cfg.affine_map or cfg.predictor == "sae"
        self.a_acts: str | None = None
        if self.needs_a and store.has(self.feats):
            info = store.info(self.feats)
            if info.get("model") and info.get("hook"):
                self.a_acts = acts_unit(cfg.corpus, safe_name(info["model"]), info["hook"])

    def dense_units(self) -> list[str]:
        """Every activations unit this fit reads: B's hooks, and A's (the single-layer model,
        the affine map)."""
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

    def token_classes(self, index: int) -> torch.Tensor:
        """``[rows]`` int: the token class of every position of chunk ``index`` (chat corpora)."""
        chunk = self.store.read_chunk(f"{self.tokens}/token_class", index)
        return torch.from_numpy(chunk.reshape(-1))

    def validate(self) -> dict[str, Any]:
        """Check every input before anything is written; return the unit's provenance facts."""
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
        split = "document" if self.documents() is not None else "sequence"  # refuses a bad one
        affine = self.validate_a_residual() if self.needs_a else {}
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
            "split": split,
            **(
                {"exclude_norm_above": cfg.exclude_norm_above, "norm_thresholds": self._thresholds}
                if cfg.exclude_norm_above is not None
                else {}
            ),
            **affine,
        }

    def validate_a_residual(self) -> dict[str, Any]:
        """Checks and facts of A's residual at the SAE's hook (read by the single-layer model
        and the affine map): stored, complete, on this corpus, as wide as the SAE's input, and
        the SAE loads."""
        from pipeline.inputs.sae import load_sae_of

        store, feats = self.store, self.store.info(self.feats)
        what = "affine_map" if self.cfg.affine_map else 'the single-layer model (predictor = "sae")'
        fallback = "" if self.cfg.affine_map else ', or fit with predictor = "linear"'
        if self.a_acts is None:
            raise XprobeError(
                f"{what} needs A's activations, but {self.feats} records no model and hook"
                + fallback
            )
        if not store.has(self.a_acts) or (
            not store.info(self.a_acts).get("complete") and self.segment is None
        ):
            raise XprobeError(
                f"{what} needs A's activations {self.a_acts}, which are not (completely) in "
                f"the store: run the activations stage of A at the SAE's hook{fallback}"
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
        key = "affine_map" if self.cfg.affine_map else "a_residual"
        return {
            key: {
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

    def documents(self) -> np.ndarray | None:
        """[n_seq] int64: each sequence's document where the split is by document (``split_by``),
        else None (by sequence); read once."""
        if not hasattr(self, "_docs"):
            self._docs = split_documents(self.store, self.tokens, self.cfg.split_by)
        return self._docs

    def held_out_mask(self) -> torch.Tensor:
        """[n_seq] bool: the held-out sequences of this fit's corpus (whole documents, split by
        document)."""
        tokens = self.store.info(self.tokens)
        split = held_out_sequences(
            tokens["n_seq"], self.cfg.held_out_fraction, self.cfg.split_seed, self.documents()
        )
        return torch.from_numpy(split)

    def held_chunks(self) -> set[int]:
        """Chunks holding some held-out sequence: what the scoring pass reads again."""
        chunk_seqs = int(self.store.info(self.tokens)["chunk_seqs"])
        held = self.held_out_mask().numpy()
        return {int(i) for i in held.nonzero()[0] // chunk_seqs}

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

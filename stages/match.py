"""Match stage: each feature of A's SAE against every feature of B's SAE, by activation correlation.

The universality analysis of Lan et al. 2024 ("Sparse Autoencoders Reveal Universal Feature
Spaces Across LLMs"), out of core. Reads two features units over the same token stream,
``feats/<corpus>/<features_a>`` and ``feats/<corpus_b>/<features_b>`` (``idx, val [n_tok, K]``),
and ``tokens/<corpus>/mask``. Streams the chunks once per block of A features (one block unless
the pair sums outgrow ``memory_budget_mb``), accumulating per-feature n, Σa, Σa², Σb, Σb² and Σab
over co-active pairs only (pipeline/maths/coactivation.py), with checkpoints, then keeps every A
feature's top-k B features by Pearson correlation over the counted tokens. Only positive correlations are matches: a pair that never fires together has
Σab = 0, hence corr ≤ 0 for non-negative activations, so the top-k positive matches found among
co-active pairs equal those of the dense F_A × F_B correlation matrix. (With signed activations,
counted in the summary's ``n_negative_values``, a never co-active pair could correlate positively
and would be missed.)

Writes ``matches/<name>/``:
    top_idx [F_A, k] int32 (-1: fewer than k positive matches), top_corr [F_A, k] float32 (0 there),
    top_n_coactive [F_A, k] int64   tokens where A's feature and the match both fire
    best_idx, best_corr [F_A]       the first column of top_idx / top_corr
    n_positive [F_A] int64          B features positively correlated with each A feature
    mutual [F_A] bool               A's best match has this A feature as its own best match
    b_best_idx, b_best_corr [F_B]   each B feature's best A match (the reverse direction)
    count_a [F_A], count_b [F_B]    tokens where each feature fires (stored top-K)
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
from tqdm.auto import tqdm

from pipeline.config import check_fields, runtime
from pipeline.device import resolve_device
from pipeline.errors import XprobeError
from pipeline.inputs.sae import load_sae_of
from pipeline.lazy import torch
from pipeline.lineage import Input, unit_input
from pipeline.maths.coactivation import (
    DensePairs,
    Marginals,
    SparsePairs,
    batch_pair_sums,
    pair_correlations,
    row_slices,
    top_k_per_row,
    update_best_per_column,
)
from pipeline.stage import WholeStage
from pipeline.store import Store
from pipeline.store.checkpoint import drop_checkpoint, load_checkpoint, save_checkpoint
from pipeline.store.layout import feats_unit, matches_unit, tokens_unit
from pipeline.store.sparse import load_sparse

DENSE_BYTES_PER_PAIR = 16  # float64 Σab + int64 count
EXTRACT_BYTES_PER_PAIR = 160  # correlations, sort orders and masks while taking the top-k


@dataclass(frozen=True)
class MatchConfig:
    name: str
    """Name of this matching in the store (``matches/<name>``)."""
    corpus: str
    """Corpus both SAEs' features were computed on (``tokens/<corpus>``)."""
    features_a: str
    """Store name of A's SAE features (``feats/<corpus>/<features_a>``): the features to match."""
    features_b: str
    """Store name of B's SAE features, the candidates (``feats/<corpus_b>/<features_b>``)."""
    corpus_b: str | None = None
    """Corpus name B's features are stored under, if not ``corpus``; it must be the same token
    stream (same corpus fingerprint)."""
    k: int = 5
    """B matches kept per A feature, by decreasing correlation."""
    device: str = "auto"
    """torch device for the pair products and accumulators; ``auto`` picks cuda, mps, then cpu."""
    svcca: bool = False
    """Also compare the decoder directions of the matched pairs with SVCCA (Lan et al. 2024), beside
    shuffled pairings; loads both SAEs with sae-lens from the features units' provenance."""
    svcca_min_corr: float = 0.5
    """Pairs used for SVCCA: mutual best matches with activation correlation at least this."""
    memory_budget_mb: float = runtime(4096.0, "memory for the pair accumulator (MB)")
    accumulator: Literal["auto", "dense", "sparse"] = runtime(
        "auto",
        "dense: F_A x F_B sums for a block of A features at a time, one pass over the corpus per "
        "block; sparse: co-active pairs only, one pass (blocks split when they outgrow the budget); "
        "auto: dense if all of F_A x F_B fits the budget, else sparse",
    )
    batch_tokens: int = runtime(8192, "tokens per sparse product")
    checkpoint_every: int = runtime(8, "chunks between accumulator checkpoints")
    progress: bool = runtime(True, "show a progress bar")

    def __post_init__(self) -> None:
        check_fields(self)
        for value, what in [
            (self.k, "k"),
            (self.batch_tokens, "batch_tokens"),
            (self.checkpoint_every, "checkpoint_every"),
        ]:
            if value < 1:
                raise XprobeError(f"{what} must be positive, got {value}")
        if self.memory_budget_mb <= 0:
            raise XprobeError(f"memory_budget_mb must be positive, got {self.memory_budget_mb}")


class Match:
    """One matching on one store: validation, block plan, accumulation with checkpoints, top-k."""

    def __init__(self, cfg: MatchConfig, store: Store):
        self.cfg, self.store = cfg, store
        self.unit = matches_unit(cfg.name)
        self.tokens = tokens_unit(cfg.corpus)
        self.feats_a = feats_unit(cfg.corpus, cfg.features_a)
        self.feats_b = feats_unit(cfg.corpus_b or cfg.corpus, cfg.features_b)
        self.device = torch.device(resolve_device(cfg.device))

    def validate(self) -> dict[str, Any]:
        store, cfg = self.store, self.cfg
        for unit, what in [
            (self.tokens, "tokenize"),
            (self.feats_a, "features"),
            (self.feats_b, "features"),
        ]:
            if not store.has(unit) or "xprobe" not in store.group(unit).attrs:
                raise XprobeError(f"{unit} is not in the store; run the {what} stage first")
            if not store.info(unit).get("complete"):
                raise XprobeError(f"{unit} is incomplete; finish the {what} stage first")
        tokens = store.info(self.tokens)
        n_tok = int(tokens["n_seq"]) * int(tokens["ctx"])
        rows = int(tokens["chunk_seqs"]) * int(tokens["ctx"])
        for unit in (self.feats_a, self.feats_b):
            fp = store.info(unit).get("corpus_fingerprint")
            if fp != tokens["corpus_fingerprint"]:
                raise XprobeError(
                    f"{unit} was computed on another token stream than {self.tokens} (corpus "
                    f"fingerprint {fp} != {tokens['corpus_fingerprint']}). Matching needs both SAEs' "
                    f"features on the same tokens: rerun the features stage on corpus {cfg.corpus!r}."
                )
            idx = store.array(f"{unit}/idx")
            if idx.shape[0] != n_tok or idx.chunks[0] != rows:
                raise XprobeError(
                    f"{unit} holds {idx.shape[0]} tokens in chunks of {idx.chunks[0]}, but "
                    f"{self.tokens} has {n_tok} in chunks of {rows}; recompute it on this corpus"
                )
        n_a = int(store.info(self.feats_a)["n_feat"])
        n_b = int(store.info(self.feats_b)["n_feat"])
        if cfg.k > n_b:
            raise XprobeError(f"k = {cfg.k} exceeds B's {n_b} features")
        return {
            "corpus": cfg.corpus,
            "features_a": cfg.features_a,
            "features_b": cfg.features_b,
            "n_feat_a": n_a,
            "n_feat_b": n_b,
            "k": cfg.k,
            "n_tok": n_tok,
            "n_chunks_planned": int(tokens["n_chunks"]),
            "tokenizer_fingerprint": tokens["tokenizer_fingerprint"],
            "corpus_fingerprint": tokens["corpus_fingerprint"],
        }

    # ---- plan and checkpoints -----------------------------------------------------------------
    def plan(self, n_a: int, n_b: int) -> dict[str, Any]:
        """Accumulator kind and blocks of A features (one pass over the corpus each)."""
        budget = self.cfg.memory_budget_mb * 2**20
        mode = self.cfg.accumulator
        if mode == "auto":
            mode = "dense" if n_a * n_b * DENSE_BYTES_PER_PAIR <= budget else "sparse"
        if mode == "sparse":
            return {"mode": mode, "blocks": [(0, n_a)]}
        rows = max(1, int(budget // (n_b * DENSE_BYTES_PER_PAIR)))
        return {"mode": mode, "blocks": list(row_slices(0, n_a, rows))}

    def _fresh_state(self, n_a: int, n_b: int) -> dict[str, Any]:
        k = self.cfg.k
        return {
            "plan": self.plan(n_a, n_b),
            "block": 0,
            "consumed": [],
            "n": 0,
            "marg_a": Marginals(n_a).state_dict(),
            "marg_b": Marginals(n_b).state_dict(),
            "pairs": None,
            "max_pair_bytes": 0,
            "results": {
                "top_idx": torch.full((n_a, k), -1, dtype=torch.int64),
                "top_corr": torch.zeros((n_a, k), dtype=torch.float64),
                "top_n_coactive": torch.zeros((n_a, k), dtype=torch.int64),
                "n_positive": torch.zeros(n_a, dtype=torch.int64),
                "b_best_idx": torch.full((n_b,), -1, dtype=torch.int64),
                "b_best_corr": torch.zeros(n_b, dtype=torch.float64),
            },
        }

    def _load_state(self, n_a: int, n_b: int) -> dict[str, Any]:
        # the plan stored there is kept even if memory_budget_mb changed: resuming never re-plans.
        # Its inputs cannot have changed: the lifecycle refuses (or restarts) a stale unit.
        state = load_checkpoint(self.store, self.unit)
        return self._fresh_state(n_a, n_b) if state is None else state

    def _save_state(self, state: dict[str, Any]) -> None:
        save_checkpoint(self.store, self.unit, state)

    # ---- accumulation -------------------------------------------------------------------------
    def _chunk(self, index: int) -> tuple[int, tuple, tuple, int]:
        """Chunk ``index``: its length, A's and B's COO on counted tokens, and the counted count."""
        mask = torch.from_numpy(self.store.read_chunk(f"{self.tokens}/mask", index).reshape(-1))
        for unit in (self.feats_a, self.feats_b):  # positions excluded for their norm: masked
            if self.store.has(f"{unit}/excluded"):
                excluded = self.store.read_chunk(f"{unit}/excluded", index).reshape(-1)
                mask = mask & ~torch.from_numpy(excluded.astype(bool))
        out = []
        for unit in (self.feats_a, self.feats_b):
            rows, cols, vals = load_sparse(self.store, unit, index)
            keep = mask[rows]  # features of masked positions are empty already; be sure
            out.append((rows[keep], cols[keep], vals[keep]))
        return len(mask), out[0], out[1], int(mask.sum())

    def _add_chunk(self, pairs, a: tuple, b: tuple, n_rows: int, block: tuple, n_b: int) -> None:
        step = self.cfg.batch_tokens
        for start in range(0, n_rows, step):
            stop = min(n_rows, start + step)
            sel = []
            for tok, feat, val in (a, b):
                lo, hi = torch.searchsorted(tok, torch.tensor([start, stop]))  # tokens are sorted
                sel.append((tok[lo:hi] - start, feat[lo:hi], val[lo:hi]))
            pairs.add(*batch_pair_sums(sel[0], sel[1], stop - start, block, n_b, self.device))

    def _new_pairs(self, mode: str, block: tuple, n_b: int):
        if mode == "dense":
            return DensePairs(block[0], block[1], n_b, self.device)
        return SparsePairs(self.device)

    def accumulate(self, n_a: int, n_b: int) -> dict[str, Any]:
        cfg, store = self.cfg, self.store
        n_chunks = int(store.info(self.tokens)["n_chunks"])
        state = self._load_state(n_a, n_b)
        blocks = state["plan"]["blocks"]
        budget = cfg.memory_budget_mb * 2**20
        bar = tqdm(
            total=(len(blocks) - state["block"]) * n_chunks - len(state["consumed"]),
            unit="chunk",
            desc="match",
            disable=not cfg.progress,
            mininterval=1.0,
        )
        try:
            while state["block"] < len(blocks):
                block = tuple(blocks[state["block"]])
                first_pass = state["block"] == 0
                marg_a = Marginals.from_state_dict(state["marg_a"])
                marg_b = Marginals.from_state_dict(state["marg_b"])
                pairs = self._new_pairs(state["plan"]["mode"], block, n_b)
                if state["pairs"] is not None:
                    pairs.load_state_dict(state["pairs"])
                done = set(state["consumed"])
                todo = [i for i in range(n_chunks) if i not in done]
                for n, index in enumerate(todo):
                    n_rows, a, b, n_counted = self._chunk(index)
                    if first_pass:  # marginals of every feature, once
                        state["n"] += n_counted
                        marg_a.update(a[1], a[2])
                        marg_b.update(b[1], b[2])
                    self._add_chunk(pairs, a, b, n_rows, block, n_b)
                    state["max_pair_bytes"] = max(state["max_pair_bytes"], pairs.nbytes)
                    if pairs.nbytes > budget:
                        self._split_block(state, pairs.nbytes, n_chunks, n_a, n_b)
                        bar.total = bar.n + (len(blocks) - state["block"]) * n_chunks
                        break
                    state["consumed"].append(index)
                    bar.update(1)
                    if len(state["consumed"]) % cfg.checkpoint_every == 0 and n < len(todo) - 1:
                        state["marg_a"], state["marg_b"] = marg_a.state_dict(), marg_b.state_dict()
                        state["pairs"] = pairs.state_dict()
                        self._save_state(state)
                else:  # the block's pass is complete
                    state["marg_a"], state["marg_b"] = marg_a.state_dict(), marg_b.state_dict()
                    self._extract(state, pairs, block, marg_a, marg_b, n_b)
                    state["block"] += 1
                    state["consumed"], state["pairs"] = [], None
                    self._save_state(state)  # the block's results; the next block starts empty
        finally:
            bar.close()
        return state

    def _split_block(self, state: dict, nbytes: int, n_chunks: int, n_a: int, n_b: int) -> None:
        """The current block's pairs outgrew the budget: split it and start its pass over. Its final
        size is guessed from the share of the corpus seen, growing as its square root (co-active
        pairs saturate: most new pairs appear early); a piece that still outgrows it splits again."""
        cfg, blocks, b = self.cfg, state["plan"]["blocks"], state["block"]
        lo, hi = blocks[b]
        if hi - lo == 1:
            raise XprobeError(
                f"A feature {lo} alone has {nbytes / 2**20:.0f} MB of pairs with {self.feats_b}, more "
                f"than memory_budget_mb = {cfg.memory_budget_mb}; raise memory_budget_mb"
            )
        estimate = nbytes * math.sqrt(n_chunks / (len(state["consumed"]) + 1))
        estimate = min(estimate, (hi - lo) * n_b * SparsePairs.BYTES_PER_PAIR)  # every pair
        pieces = min(hi - lo, max(2, math.ceil(2 * estimate / (cfg.memory_budget_mb * 2**20))))
        blocks[b : b + 1] = list(row_slices(lo, hi, math.ceil((hi - lo) / pieces)))
        tqdm.write(
            f"match: co-active pairs of A features {lo}..{hi - 1} outgrew memory_budget_mb = "
            f"{cfg.memory_budget_mb}; splitting them into {pieces} blocks (one pass each)"
        )
        state["consumed"], state["pairs"] = [], None
        if b == 0:  # the marginals are gathered in the first pass: start them over too
            fresh = self._fresh_state(n_a, n_b)
            state["n"], state["marg_a"], state["marg_b"] = 0, fresh["marg_a"], fresh["marg_b"]
        self._save_state(state)

    def _extract(self, state, pairs, block: tuple, marg_a, marg_b, n_b: int) -> None:
        """Top-k of every A row of the block, and the running best A match of every B feature."""
        budget = self.cfg.memory_budget_mb * 2**20
        res = state["results"]
        best_idx = res["b_best_idx"].to(self.device)
        best_corr = res["b_best_corr"].to(self.device)
        if isinstance(pairs, SparsePairs):
            keys = pairs.merged()[0]
            per_slice = max(1, int(budget // EXTRACT_BYTES_PER_PAIR))
            cuts = (keys[::per_slice] // n_b).tolist() if len(keys) else []
            bounds = sorted({block[0], *cuts[1:], block[1]})
            slices = list(zip(bounds[:-1], bounds[1:], strict=False))
        else:
            rows = int(budget // (EXTRACT_BYTES_PER_PAIR * n_b))
            slices = list(row_slices(block[0], block[1], rows))
        for lo, hi in slices:
            keys, sums, counts = pairs.rows(n_b, lo, hi)
            i, j, corr = pair_correlations(keys, sums, state["n"], marg_a, marg_b, n_b)
            top = top_k_per_row(i, j, corr, counts, lo, hi, self.cfg.k)
            res["top_idx"][lo:hi] = top["idx"].cpu()
            res["top_corr"][lo:hi] = top["corr"].cpu()
            res["top_n_coactive"][lo:hi] = top["count"].cpu()
            res["n_positive"][lo:hi] = top["n_positive"].cpu()
            update_best_per_column(i, j, corr, best_idx, best_corr)
        res["b_best_idx"], res["b_best_corr"] = best_idx.cpu(), best_corr.cpu()

    # ---- write --------------------------------------------------------------------------------
    def write(self, state: dict[str, Any]) -> dict[str, Any]:
        store, res = self.store, state["results"]
        prov = store.info(self.unit)
        top_idx = res["top_idx"].numpy().astype(np.int32)
        best_idx = top_idx[:, 0]
        b_best = res["b_best_idx"].numpy().astype(np.int32)
        has = best_idx >= 0
        mutual = np.zeros(len(best_idx), dtype=bool)
        mutual[has] = b_best[best_idx[has]] == np.nonzero(has)[0]
        marg_a = Marginals.from_state_dict(state["marg_a"])
        marg_b = Marginals.from_state_dict(state["marg_b"])
        arrays = {
            "top_idx": top_idx,
            "top_corr": res["top_corr"].numpy().astype(np.float32),
            "top_n_coactive": res["top_n_coactive"].numpy(),
            "best_idx": best_idx,
            "best_corr": res["top_corr"][:, 0].numpy().astype(np.float32),
            "n_positive": res["n_positive"].numpy(),
            "mutual": mutual,
            "b_best_idx": b_best,
            "b_best_corr": res["b_best_corr"].numpy().astype(np.float32),
            "count_a": marg_a.count.numpy(),
            "count_b": marg_b.count.numpy(),
        }
        for key, value in arrays.items():
            path = f"{self.unit}/{key}"
            if store.has(path):
                store.delete(path)
            chunks = (min(len(value), 65536),) + value.shape[1:]
            store.create_array(path, value.shape, chunks, value.dtype, prov)[...] = value
        live = arrays["count_a"] > 0
        best = arrays["best_corr"][live]
        return {
            "n_counted": int(state["n"]),
            "accumulator": state["plan"]["mode"],
            "n_blocks": len(state["plan"]["blocks"]),
            "max_pair_bytes": int(state["max_pair_bytes"]),
            "n_negative_values": marg_a.n_negative + marg_b.n_negative,
            "n_live_a": int(live.sum()),
            "median_best_corr": float(np.median(best)) if len(best) else None,
            "fraction_best_corr_above_0.5": float((best > 0.5).mean()) if len(best) else None,
            "fraction_best_corr_above_0.9": float((best > 0.9).mean()) if len(best) else None,
            "n_mutual": int(mutual.sum()),
            "svcca": self._svcca(arrays) if self.cfg.svcca else None,
        }

    def _svcca(self, arrays: dict[str, np.ndarray]) -> dict[str, Any]:
        """SVCCA of the decoder directions of mutual matches with correlation >= svcca_min_corr."""
        from pipeline.maths.svcca import svcca

        pick = arrays["mutual"] & (arrays["best_corr"] >= self.cfg.svcca_min_corr)
        a_ids = np.nonzero(pick)[0]
        if len(a_ids) < 3:
            return {"n_pairs": int(len(a_ids)), "svcca": None, "why": "fewer than 3 matched pairs"}
        dec_a = self._decoder(self.feats_a)[a_ids]
        dec_b = self._decoder(self.feats_b)[arrays["best_idx"][a_ids]]
        return svcca(dec_a, dec_b)

    def _decoder(self, feats_unit: str) -> np.ndarray:
        """``W_dec`` [n_feat, d_model] of the SAE a features unit was computed with."""
        try:
            sae = load_sae_of(self.store, feats_unit)
        except XprobeError as e:
            raise XprobeError(
                f"{e} (the SAE of {feats_unit}, from its provenance, for SVCCA). "
                "Make it available there, or set svcca = false."
            ) from None
        return sae.W_dec.detach().float().cpu().numpy()


class MatchStage(WholeStage):
    """The matching as a stage of the lifecycle: one unit ``matches/<name>``."""

    name = "match"
    cfg: MatchConfig

    def validate(self, store: Store) -> None:
        self.match = Match(self.cfg, store)
        self.facts = self.match.validate()

    def units(self, store: Store) -> dict[str, dict[str, Any]]:
        return {self.match.unit: self.facts}

    def inputs(self, store: Store) -> dict[str, Input]:
        m = self.match
        return {
            "tokens": unit_input(store, m.tokens),
            "features A": unit_input(store, m.feats_a),
            "features B": unit_input(store, m.feats_b),
        }

    def build(self, store: Store, client: Any = None) -> tuple[int, dict[str, Any]]:
        state = self.match.accumulate(self.facts["n_feat_a"], self.facts["n_feat_b"])
        summary = self.match.write(state)
        drop_checkpoint(store, self.match.unit)  # the results are written: no resume left
        return self.facts["n_chunks_planned"], {"summary": summary}


def run(
    cfg: MatchConfig, store: Store, force: bool = False, rebuild_stale: bool = False
) -> dict[str, Any]:
    from pipeline import lifecycle

    return lifecycle.run(
        MatchStage(cfg), store, force=force, rebuild_stale=rebuild_stale, progress=cfg.progress
    )

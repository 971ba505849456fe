"""How a fit's statistics are accumulated: one loop, one checkpoint cadence, for every path.

Per hook of B and per split (``train``, ``held_out``, ``held_out/<class>`` for chat corpora) one
:class:`~pipeline.maths.lstsq.SufficientStats` of B's activations against A's sparse features;
for the single-layer model and the affine map (``map``) B's training activations against A's
residual (dense), and for the single-layer model A's residual alone (``A_STATS``, per fit).
:func:`add_chunk` is the one place a chunk enters the statistics. :func:`consume` is the one
loop over chunks: a whole local run (one fit), a segment of a segmented run (several fits, each
chunk read once for all) and a dask partition task (no checkpoint: the coordinator merges and
checkpoints) all go through it. Checkpoints hold the statistics and the consumed chunks; they
are taken every ``checkpoint_every`` chunks, every ``checkpoint_seconds`` and after the last.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pipeline.inputs.chat import TOKEN_CLASSES
from pipeline.lazy import torch
from pipeline.maths.lstsq import SufficientStats
from pipeline.probes.encoder import A_STATS
from pipeline.probes.inputs import CONSUMED_FILE, FitInputs
from pipeline.store.checkpoint import load_checkpoint, save_checkpoint
from pipeline.store.sparse import select_rows

Stats = dict[str, dict[str, SufficientStats]]
"""hook -> split -> statistics."""


def fresh_stats(fit: FitInputs, d: int, n_feat: int) -> Stats:
    """Empty statistics per hook: train, held-out, and with ``classes`` the held-out tokens
    of each class (``held_out/<class>``: another cxx [d, d] and cyx [F, d] each); with
    ``affine_map``, ``map``: train statistics of B's x against A's residual (dense [d_A])."""
    cfg = fit.cfg
    splits = ("train", "held_out", *(f"held_out/{c}" for c in cfg.classes))
    out = {
        hook: {split: SufficientStats(d, n_feat, fit.device, fit.dtype) for split in splits}
        for hook in cfg.hooks
    }
    if fit.needs_a:
        d_a = int(fit.store.info(fit.a_acts)["d_model"])
        for hook in cfg.hooks:
            out[hook]["map"] = SufficientStats(d, d_a, fit.device, fit.dtype)
    if cfg.predictor == "sae":  # Σ a aᵀ of A's residual, once per fit (the model's Σ z²)
        d_a = int(fit.store.info(fit.a_acts)["d_model"])
        out[A_STATS] = {"train": SufficientStats(d_a, 0, fit.device, fit.dtype)}
    return out


def add_chunk(
    fit: FitInputs, stats: Stats, index: int, held: torch.Tensor, shared: dict | None = None
) -> None:
    """Add chunk ``index`` (every hook, train and held-out tokens) to ``stats``. ``held``:
    ``[n_seq]`` bool, the held-out sequences; ``shared``: chunks read once for several fits."""
    cfg, tokens = fit.cfg, fit.store.info(fit.tokens)
    ctx, chunk_seqs = tokens["ctx"], tokens["chunk_seqs"]
    xs = {hook: fit.read(unit, index, shared) for hook, unit in fit.acts.items()}
    mask = fit.counted(index, xs)
    seq = index * chunk_seqs + torch.arange(len(mask)) // ctx
    rows, cols, vals = fit.read(fit.feats, index, shared)
    splits = {"train": mask & ~held[seq], "held_out": mask & held[seq]}
    if cfg.classes:
        cls = fit.token_classes(index)
        for c in cfg.classes:
            splits[f"held_out/{c}"] = splits["held_out"] & (cls == TOKEN_CLASSES.index(c))
    dense: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # split -> (keep, dense targets)
    train = splits["train"]
    if fit.needs_a and bool(train.any()):  # A's residual on the training tokens
        a = fit.a_residual(index, shared)[train].to(fit.device)
        dense["map"] = (train, a)
        if A_STATS in stats:
            stats[A_STATS]["train"].update_dense(a, a.new_zeros(a.shape[0], 0))
    for hook, x in xs.items():
        for split, (keep, targets) in dense.items():
            stats[hook][split].update_dense(x[keep].to(fit.device), targets)
        for split, keep in splits.items():
            if bool(keep.any()):
                r, c, v = select_rows(rows, cols, vals, keep)
                stats[hook][split].update(
                    x[keep].to(fit.device), r.to(fit.device), c.to(fit.device), v.to(fit.device)
                )


@dataclass
class Accumulation:
    """One fit's statistics in progress: what they hold (``consumed``) and its held-out mask."""

    fit: FitInputs
    stats: Stats
    consumed: list[int]
    held: torch.Tensor
    new: int = 0
    """Chunks added since the last checkpoint (a fit with none keeps its checkpoint)."""
    seen: set[int] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.seen = set(self.consumed)


def resume(fit: FitInputs, d: int, n_feat: int) -> Accumulation:
    """The fit's statistics from its checkpoint, or fresh ones."""
    state = load_checkpoint(fit.store, fit.unit)
    if state is None:
        return Accumulation(fit, fresh_stats(fit, d, n_feat), [], fit.held_out_mask())
    threads = state.get("threads")
    if threads is not None and int(threads) != torch.get_num_threads():
        print(
            f"warning: {fit.unit} resumes on {torch.get_num_threads()} torch thread(s); its "
            f"checkpoint was written on {threads}. BLAS sums in another order on another thread "
            "count, so the results may differ from an uninterrupted run in the last bits. Set "
            f"OMP_NUM_THREADS={threads} (or torch.set_num_threads({threads})) for the same bits.",
            file=sys.stderr,
        )
    stats = {
        hook: {
            split: SufficientStats.from_state_dict(sd, fit.device, fit.dtype)
            for split, sd in splits.items()
        }
        for hook, splits in state["stats"].items()
    }
    return Accumulation(fit, stats, list(state["consumed"]), fit.held_out_mask())


def checkpoint(acc: Accumulation) -> None:
    """Save the statistics with the chunks they hold; then the side file a segmented run's
    scheduler reads to know what may be evicted (never ahead of the checkpoint)."""
    fit = acc.fit
    state = {
        "consumed": acc.consumed,
        "threads": torch.get_num_threads(),  # the same count, the same float sums on resume
        "stats": {h: {s: st.state_dict() for s, st in sp.items()} for h, sp in acc.stats.items()},
    }
    save_checkpoint(fit.store, fit.unit, state)
    fit.store.write_text(f"{fit.unit}/{CONSUMED_FILE}", json.dumps(sorted(acc.consumed)))
    acc.new = 0


def state_dicts(stats: Stats) -> dict:
    """CPU copies of every statistic (what a dask task returns)."""
    return {h: {s: st.state_dict() for s, st in sp.items()} for h, sp in stats.items()}


def consume(
    accs: Sequence[Accumulation],
    chunks: Sequence[int],
    save: bool = True,
    on_chunk: Callable[[int], None] = lambda index: None,
) -> dict[str, int]:
    """Add ``chunks`` (in this order; each fit skips those it holds) to every accumulation.
    A chunk is read once for all fits (``shared``). With ``save``, each fit checkpoints every
    ``checkpoint_every`` chunks, every ``checkpoint_seconds`` (the smallest of the fits') and
    after the last chunk. ``on_chunk(index)`` after each chunk (a progress bar). Returns the
    chunks each fit added, by unit."""
    counts = {acc.fit.unit: 0 for acc in accs}
    if not accs:
        return counts
    every = min(acc.fit.cfg.checkpoint_every for acc in accs)
    seconds = min(acc.fit.cfg.checkpoint_seconds for acc in accs)
    last = time.monotonic()
    for n, index in enumerate(chunks):
        shared: dict[Any, Any] = {}
        for acc in accs:
            if index in acc.seen:
                continue
            add_chunk(acc.fit, acc.stats, index, acc.held, shared)
            acc.consumed.append(index)
            acc.seen.add(index)
            acc.new += 1
            counts[acc.fit.unit] += 1
        on_chunk(index)
        due = time.monotonic() - last >= seconds or (n + 1) % every == 0
        if save and (due or n == len(chunks) - 1):
            for acc in accs:
                if acc.new:
                    checkpoint(acc)
            last = time.monotonic()
    return counts

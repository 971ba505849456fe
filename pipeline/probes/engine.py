"""The fit of one config on one store: its inputs (``FitInputs``), accumulated with checkpoints
(``accumulate``), solved, scored and written (``solve_and_write``). ``stages/fit.py`` drives it
through the stage lifecycle; ``pipeline/distributed.py`` runs its accumulation as dask tasks.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from tqdm.auto import tqdm

from pipeline.probes import accumulate as acc
from pipeline.probes.encoder import A_STATS, SaeActivation
from pipeline.probes.inputs import FitInputs
from pipeline.probes.sae_map import sae_decoder, sae_through_map
from pipeline.probes.score import held_out_scores
from pipeline.probes.solve import Solved, solve_hook
from pipeline.probes.write import hook_summary, write_best_hook, write_hook


class Fit(FitInputs):
    """Validation, accumulation with checkpoints, solve, score and write."""

    def accumulate(
        self, d: int, n_feat: int, client: Any = None, only: list[int] | None = None
    ) -> acc.Stats:
        """Statistics of every chunk (``only``: of these, a segment), resuming from the
        checkpoint; with a dask ``client`` the missing chunks are partition tasks on its
        workers, summed by a tree of merges."""
        tokens = self.store.info(self.tokens)
        ctx, chunk_seqs, n_chunks = tokens["ctx"], tokens["chunk_seqs"], tokens["n_chunks"]
        state = acc.resume(self, d, n_feat)
        todo = [i for i in (range(n_chunks) if only is None else only) if i not in state.seen]
        rows = {i: min(chunk_seqs, tokens["n_seq"] - i * chunk_seqs) * ctx for i in todo}
        bar = tqdm(
            total=sum(rows.values()),
            unit="tok",
            unit_scale=True,
            desc="fit",
            disable=not self.cfg.progress,
            mininterval=1.0,
        )
        try:
            if client is not None and todo:
                from pipeline.distributed import accumulate_fit

                partial = accumulate_fit(  # the bar moves a partition at a time
                    client,
                    self,
                    todo,
                    d,
                    n_feat,
                    on_partition=lambda part: bar.update(sum(rows[i] for i in part)),
                )
                for hook, splits in partial.items():
                    for split, part in splits.items():
                        state.stats[hook][split].merge(part)
                state.consumed += todo
                acc.checkpoint(state)
            else:
                acc.consume([state], todo, on_chunk=lambda i: bar.update(rows[i]))
        finally:
            bar.close()
        return state.stats

    def solve_and_write(self, stats: acc.Stats, n_feat: int) -> dict[str, Any]:
        """Solve every hook's probes (and, with ``affine_map``, its map), score them in one pass
        over the held-out tokens and write them. Hook by hook; in a segmented run (``provider``
        set) all hooks are scored in one pass, so evicted chunks are computed again once, not
        once per hook (same numbers: each hook's sums run over the chunks in the same order)."""
        cfg = self.cfg
        gcv_r2: list[np.ndarray] = []  # [hooks][F]: what picks the best hook (training tokens)
        summary: dict[str, Any] = {}
        decoder = sae_decoder(self, stats[cfg.hooks[0]]["train"].d)
        sae = sae_through_map(self) if self.needs_a else None
        through = sae if cfg.affine_map else None
        activation = SaeActivation(sae) if sae is not None and cfg.predictor == "sae" else None
        a_stats = stats[A_STATS]["train"] if A_STATS in stats else None
        solved: dict[str, Solved] = {}

        def write(scores: dict[str, dict]) -> None:
            for hook, (result, mapped) in solved.items():
                write_hook(self.store, self.unit, hook, result, scores)
                gcv_r2.append(np.asarray(result["r2_gcv"]))
                summary[hook] = hook_summary(
                    self.store, self.unit, hook, cfg.classes, result, mapped, stats[hook]
                )
            solved.clear()

        for hook in cfg.hooks:
            solved[hook] = solve_hook(cfg, stats[hook], decoder, through, activation, a_stats)
            if self.provider is None:
                write(held_out_scores(self, solved, stats, through, activation))
        if solved:
            write(held_out_scores(self, solved, stats, through, activation))
        write_best_hook(self.store, self.unit, gcv_r2)
        return summary

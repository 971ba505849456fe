"""Fit stage: one least-squares probe per SAE feature, from B's residual stream, out of core.

Reads B's activations ``acts/<corpus>/<model>/<hook>/x`` ``[n_tok, d_B]`` at one or several hooks,
A's sparse features ``feats/<corpus>/<sae>/{idx,val}`` and the tokens' mask. Sequences are split
into train and held-out (deterministic, by sequence); masked positions are skipped. Sufficient
statistics (n, means, centred XᵀX, XᵀY, Σy²; see pipeline/maths/lstsq.py) are accumulated per hook and
split, checkpointed with the list of consumed chunks, and all features are solved at once. λ and
the best hook are chosen by GCV on the training statistics; held-out tokens only score. The
engine is ``pipeline/probes/`` (what is read, accumulated, solved, scored and written); this
module is the stage: its config, its units and inputs, and the hooks a segmented run calls.

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

from typing import Any

from pipeline.cluster import client_for
from pipeline.config import canonical
from pipeline.lineage import Input, unit_input
from pipeline.maths.split import held_out_sequences
from pipeline.probes import accumulate as acc
from pipeline.probes.config import FitConfig
from pipeline.probes.engine import Fit
from pipeline.stage import DiskReserve, WholeStage
from pipeline.store import Store
from pipeline.store.checkpoint import checkpoint_path
from pipeline.store.layout import probes_unit

__all__ = ["Fit", "FitConfig", "FitStage", "held_out_sequences", "run"]


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
        if self.cfg.predictor == "linear":  # fits made before the single-layer model
            del out["predictor"]
        return out

    def __init__(self, cfg: FitConfig):
        super().__init__(cfg)
        self.unit = probes_unit(cfg.name)

    def engine(self, store: Store) -> Fit:
        """The fit on ``store`` (made by ``validate``; made here for a stage not validated yet)."""
        fit = getattr(self, "fit", None)
        if fit is None or fit.store is not store:
            fit = Fit(self.cfg, store)
        fit.segment, fit.provider = self.segment, self.provider
        return fit

    def validate(self, store: Store) -> None:
        self.fit = None
        self.fit = self.engine(store)
        self.facts = self.fit.validate()

    # ---- a segmented run (pipeline.segments) ---------------------------------------------------
    def dense_reads(self, store: Store) -> list[str]:
        return self.engine(store).dense_units()

    def consumed_chunks(self, store: Store) -> set[int]:
        return self.engine(store).consumed_chunks()

    def needs_complete(self, store: Store) -> list[str]:
        """``exclude_norm_above`` scales by each hook's median norm over the whole corpus."""
        if self.cfg.exclude_norm_above is None:
            return []
        return self.engine(store).dense_units()

    def rereads(self, store: Store) -> dict[str, set[int]]:
        """The held-out pass reads B's hooks (the affine map too), at the held-out chunks."""
        fit = self.engine(store)
        held = fit.held_chunks()
        return {unit: held for unit in fit.acts.values()}

    def disk_reserve(self, store: Store) -> DiskReserve:
        """The checkpoint now and at its full size (from the widths, once known), and the
        outputs still to write: float32 directions and write directions ``[F, d]``, bootstrap
        replicates ``[F, n_bootstrap]`` twice, ~20 per-feature arrays, and with the affine map
        its weight ``[d_A, d]``, per hook (0 once complete)."""
        fit, cfg = self.engine(store), self.cfg
        path = checkpoint_path(store, fit.unit)
        now = path.stat().st_size if path.exists() else 0
        dense = [u for u in fit.dense_units() if store.has(u)]
        if not dense or not store.has(fit.feats):
            return DiskReserve(now, now, 0)  # not known before the first segment; small then
        d = int(store.info(dense[-1])["d_model"])  # A's with its residual read, else B's
        n_feat = int(store.info(fit.feats)["n_feat"])
        splits = 2 + len(cfg.classes)
        d_b = int(store.info(dense[0])["d_model"])
        full = len(cfg.hooks) * splits * 8 * (d_b * d_b + n_feat * d_b + 4 * n_feat + 2 * d_b)
        if fit.needs_a:  # B against A's residual per hook; A's own once (the single-layer model)
            full += len(cfg.hooks) * 8 * (d_b * d_b + d * d_b + 2 * d + 2 * d_b) + 8 * d * d
        outputs = 0
        b_units = [u for u in fit.acts.values() if store.has(u)]
        if b_units and not (store.has(fit.unit) and store.info(fit.unit).get("complete")):
            d_b = int(store.info(b_units[0])["d_model"])
            per_hook = n_feat * (2 * 4 * d_b + 2 * 4 * cfg.n_bootstrap + 20 * 8)
            if cfg.affine_map:
                per_hook += 4 * d_b * d_b
            outputs = len(cfg.hooks) * per_hook
        return DiskReserve(now, max(full, now), outputs)

    def consume(self, store: Store, chunks: list[int], client: Any = None) -> int:
        """A segment of a segmented run: add ``chunks`` (those not yet in it) to the checkpoint."""
        before = self.fit.consumed_chunks()
        self.fit.accumulate(self.facts["d_model"], self.facts["n_feat"], client, only=chunks)
        return len(set(chunks) - before)

    @classmethod
    def consume_all(cls, stages: list[Any], store: Store, chunks: list[int]) -> dict[str, int]:
        """Several fits consume a segment in one pass: each chunk of B's activations (and of the
        features) is read once for every fit that needs it. Every fit's statistics are held at
        once; each checkpoints as alone. Sums run in the same order as alone."""
        accs = [acc.resume(s.fit, s.facts["d_model"], s.facts["n_feat"]) for s in stages]
        return acc.consume(accs, chunks)

    # ---- the lifecycle -------------------------------------------------------------------------
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
        self.fit.provider = self.provider
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

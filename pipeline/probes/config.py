"""The fit's configuration: one frozen dataclass, checked at construction (no store needed).

``stages/fit.py`` re-exports it; the engine (``pipeline/probes/``) reads it, so it lives beside
the engine and no module of ``pipeline/`` imports a stage.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from pipeline.cluster import scheduler_field, workers_field
from pipeline.config import check_fields, runtime
from pipeline.errors import XprobeError
from pipeline.maths.split import SPLIT_BY


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
    split_by: str = "auto"
    """Held-out split and bootstrap units: ``document`` (whole documents on one side, replicates
    resample documents), ``sequence``, or ``auto`` (default: ``document`` where some document
    spans several sequences, e.g. ``packing = "pack"``; pipeline/maths/split.py)."""
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
    predictor: Literal["sae", "linear"] = "sae"
    """The per-feature model. ``sae`` (default): the seed's single-layer model
    ``σ_A(w_fᵀ x_B + c_f)`` through A's SAE's own activation, fitted in closed form to A's SAE
    pre-activation (pipeline/probes/encoder.py); A → A it is A's encoder. Its arrays take the
    headline names (``direction``, ``r2_held_out``, ...) and the linear probe of the
    post-activation is written beside it as ``linear_*``. Reads A's activations at the SAE's
    hook. ``linear``: only the linear least-squares probe of the post-activation (as before)."""
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
        if self.split_by not in SPLIT_BY:
            raise XprobeError(f"split_by must be one of {list(SPLIT_BY)}, got {self.split_by!r}")
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

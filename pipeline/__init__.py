"""xprobe from Python: ``import pipeline`` (the distribution is ``xprobe``; its packages are
``pipeline`` and ``stages``).

    import pipeline

    pipeline.run("xprobe.toml")                   # what `xprobe run xprobe.toml` does
    pipeline.run({"store": "s", "tokenize": {...}, "activations": [{...}, {...}]})
    store = pipeline.open_store("s")              # read-only; also a zip or an fsspec URL
    table = pipeline.load_table(store, "main")    # the report's per-feature table (pandas)
    pipeline.best_hook(store, "B", 17)            # B's best hook for A's feature 17
    pipeline.direction(store, "B", 17)            # [d_B] B's read direction (at that hook)
    pipeline.write_direction(store, "B", 17)      # [d_B] B's write direction
    for chunk in pipeline.iter_activations(store, "web", "gpt2", "blocks.6.hook_resid_post"):
        chunk.acts, chunk.mask, chunk.ids         # [n_tok_chunk, d_model], [n_tok_chunk] x 2
    for index, rows, cols, vals in pipeline.iter_features(store, "web", "my-sae"):
        ...                                       # chunk `index`'s sparse feature activations
    cfg = pipeline.FitConfig(name="b", corpus="web", features="my-sae", model="B",
                             hooks=["blocks.6.hook_resid_post"])   # checked when built
    pipeline.run_stage(cfg, "s")                  # one stage, like `xprobe fit`

Names are imported on first use, so ``import pipeline`` (and the CLI) stays fast.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "run": "pipeline.api",
    "run_stage": "pipeline.api",
    "open_store": "pipeline.api",
    "load_table": "pipeline.results",
    "direction": "pipeline.results",
    "write_direction": "pipeline.results",
    "best_hook": "pipeline.results",
    "fit_hooks": "pipeline.results",
    "iter_activations": "pipeline.api",
    "iter_features": "pipeline.api",
    "Store": "pipeline.store",
    "XprobeError": "pipeline.errors",
    "TokenizeConfig": "stages.tokenize",
    "ActivationsConfig": "stages.activations",
    "FeaturesConfig": "stages.features",
    "FitConfig": "pipeline.probes.config",
    "MatchConfig": "stages.match",
    "ReportConfig": "stages.report",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pipeline' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return __all__

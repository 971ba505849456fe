"""The stages xprobe knows, in the order ``xprobe run`` runs them.

Each entry names a module in ``stages/`` with a config dataclass and a
``run(cfg, store, force, rebuild_stale)`` function (which hands the module's stage to
``pipeline.lifecycle.run``). Modules are imported only when used, so the CLI starts fast.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class StageEntry:
    name: str
    module: str
    config: str
    help: str
    stage: str = ""
    """The module's ``pipeline.stage.Stage`` subclass (for ``xprobe run --dry-run``)."""

    def load(self) -> tuple[type, Any]:
        mod = importlib.import_module(self.module)
        return getattr(mod, self.config), mod.run

    def load_stage(self) -> type:
        return getattr(importlib.import_module(self.module), self.stage)


STAGES: list[StageEntry] = [
    StageEntry(
        "tokenize",
        "stages.tokenize",
        "TokenizeConfig",
        "Tokenize a corpus into fixed-length sequences.",
        "TokenizeStage",
    ),
    StageEntry(
        "activations",
        "stages.activations",
        "ActivationsConfig",
        "Store a model's residual activations.",
        "ActivationsStage",
    ),
    StageEntry(
        "features",
        "stages.features",
        "FeaturesConfig",
        "Encode stored activations with an SAE (sparse top-K).",
        "FeaturesStage",
    ),
    StageEntry(
        "fit",
        "stages.fit",
        "FitConfig",
        "Fit every feature's probe from B's activations.",
        "FitStage",
    ),
    StageEntry(
        "match",
        "stages.match",
        "MatchConfig",
        "Match A's SAE features to B's SAE features by activation correlation.",
        "MatchStage",
    ),
    StageEntry(
        "report",
        "stages.report",
        "ReportConfig",
        "Presence scores against the controls: a per-feature table and an HTML report.",
        "ReportStage",
    ),
]


def find(name: str) -> StageEntry:
    for entry in STAGES:
        if entry.name == name:
            return entry
    raise KeyError(name)

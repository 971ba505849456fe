"""Derived controls: the ceiling fit and (``floor = "random"``) the floor, added to a run config.

A report needs the ceiling (A fitted on itself at the SAE's hook) and, to be read with care,
the floor (a randomly initialised model with B's architecture). Neither needs to be written by
hand: ``derive(config, base)`` returns the config's tables with the missing sections added, all
copied from sections the user wrote.

- **ceiling**: when the config has ``[report]`` and ``[features]``, and neither the config nor
  the store holds a fit of A (the features' ``model``) at the SAE's hook on those features, a
  ``[[fit]]`` named ``ceiling`` (or the report's ``ceiling`` name) is added: the first B fit of
  the report's ``fits`` with ``model`` = A, ``hooks`` = the SAE's hook, no affine map. The same
  split and bootstrap as B's fit, as the report requires. The SAE's hook: the features'
  ``hook``, else the SAE folder's ``cfg.json``, else sae-lens's config of the release.
- **floor**: with ``floor = "random"`` in ``[report]`` and no ``[[fit]]`` of that name, a copy
  of B's ``[[activations]]`` section reading a random initialisation of B's architecture
  (``FloorModel``: seeded, written once next to the store as ``<store>.floor/<B>``) at B's
  fitted hooks, and a copy of B's ``[[fit]]`` on it, both named ``random``.

- **token controls** (``token_baseline`` on, ``token_fits`` not written): for A and each model
  the report's fits read (the floor included), a copy of its ``[[activations]]`` section with
  ``context = "token"`` (each position: its token read alone, after BOS) named ``<model>.tokens``
  at the hooks that model is fitted at (A: the SAE's hook), and a copy of the B fit on it, named
  likewise; the report's ``token_fits`` lists them. The report's token baseline is, per feature,
  the best of the per-id mean and these fits: a function of the current token that a model
  whose residual is a function of the current token cannot beat, since for it the control *is*
  its stream (pipeline/report/table.py, ``token_control``).

An explicit section always wins: a ``[[fit]]`` named like the report's ``ceiling``/``floor``,
or any fit of A at the SAE's hook, means nothing is derived for that role; ``token_fits`` in
``[report]`` (``[]``: none) means no token control is derived.
"""

from __future__ import annotations

import copy
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline.config import normalize_path
from pipeline.errors import XprobeError
from pipeline.store.layout import default_name, safe_name

TOKENS = ".tokens"
"""Suffix of a token control's model and fit names (``B.tokens``)."""
RANDOM = "random"
"""``floor = "random"``: derive the floor from B's architecture."""
FLOOR_SEED = 0


@dataclass(frozen=True)
class FloorModel:
    """A random initialisation of ``source``'s architecture (``torch.manual_seed(seed)``, the
    transformers initialiser), with ``source``'s tokenizer, saved as a local model at ``path``."""

    source: str
    path: str
    revision: str | None = None
    trust_remote_code: bool = False
    seed: int = FLOOR_SEED

    def write(self) -> None:
        """Save the model (once: an existing folder with its marker is kept as it is)."""
        marker = Path(self.path) / "xprobe-floor.json"
        if marker.exists():
            return
        import torch
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        kwargs = {"revision": self.revision, "trust_remote_code": self.trust_remote_code}
        try:
            config = AutoConfig.from_pretrained(self.source, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(self.source, **kwargs)
        except (OSError, ValueError) as e:
            raise XprobeError(f"floor: cannot load B's config {self.source!r}: {e}") from None
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            model = AutoModelForCausalLM.from_config(
                config, trust_remote_code=self.trust_remote_code
            )
        tmp = Path(f"{self.path}.{os.getpid()}.tmp")
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        record = {"random_init_of": self.source, "revision": self.revision, "seed": self.seed}
        (tmp / "xprobe-floor.json").write_text(json.dumps(record, indent=1) + "\n")
        Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, self.path)


def _sections(config: dict[str, Any], name: str) -> list[dict[str, Any]]:
    section = config.get(name)
    if section is None:
        return []
    return list(section) if isinstance(section, list) else [section]


def _acts_name(section: dict[str, Any]) -> str:
    return safe_name(section.get("name") or default_name(str(section.get("model", ""))))


def _features_name(section: dict[str, Any], base: Path | None) -> str | None:
    """The store name a ``[features]`` section writes (as ``stages.features`` names it)."""
    if section.get("name"):
        return str(section["name"])
    if section.get("sae_path"):
        return Path(normalize_path(str(section["sae_path"]), "path", base)).resolve().name
    return f"{section.get('sae')}--{section.get('sae_id')}" if section.get("sae") else None


def sae_hook(features: dict[str, Any], base: Path | None) -> str:
    """The hook A's SAE reads: ``hook`` of ``[features]``, the SAE folder's ``cfg.json``, or the
    release's config from sae-lens."""
    if features.get("hook"):
        return str(features["hook"])
    if features.get("sae_path"):
        cfg_file = Path(normalize_path(str(features["sae_path"]), "path", base)) / "cfg.json"
        try:
            cfg = json.loads(cfg_file.read_text())
        except (OSError, ValueError):
            cfg = {}
    elif features.get("sae"):
        try:
            from sae_lens.loading.pretrained_sae_loaders import load_sae_config_from_huggingface

            cfg = load_sae_config_from_huggingface(features["sae"], features.get("sae_id") or "")
        except Exception:  # noqa: BLE001 - any failure here is "not known": ask for the hook
            cfg = {}
    else:
        cfg = {}
    hook = cfg.get("hook_name") or (cfg.get("metadata") or {}).get("hook_name")
    if not hook:
        raise XprobeError(
            "the ceiling fit is derived from the SAE's hook, and it is not known here: set "
            'hook = "blocks.L.hook_resid_post" in [features], or write the ceiling [[fit]]'
        )
    return str(hook)


def _store_fits(store_path: str | None) -> list[dict[str, Any]]:
    """The configs of the fits already in a local store (none if it does not exist)."""
    if not store_path or "://" in store_path or not os.path.isdir(store_path):
        return []
    from pipeline.store import Store

    try:
        store = Store(store_path, mode="r")
        return [
            info["config"]
            for _, info in store.units()
            if info.get("stage") == "fit" and "config" in info
        ]
    except Exception:  # noqa: BLE001 - an unreadable store: the stages will say why
        return []


def floor_path(store_path: str, b_name: str) -> str:
    """Where the random floor of model ``b_name`` lives: ``<store>.floor/<b_name>``."""
    if "://" in store_path:
        raise XprobeError(
            'floor = "random" writes a random model next to the store, and the store is a URL; '
            "run with a local store, or write the floor's [[activations]] and [[fit]] yourself"
        )
    return os.path.join(f"{os.path.normpath(store_path)}.floor", b_name)


def derive(
    config: dict[str, Any], base: Path | None, store_path: str | None = None
) -> tuple[dict[str, Any], list[FloorModel]]:
    """``config`` with the derived ceiling and floor sections added (a new dict; ``config`` is
    not changed), and the floor models the run must write before its activations stage.
    ``store_path``: the store's resolved location (fits already there count as written)."""
    reports = _sections(config, "report")
    features = _sections(config, "features")
    fits = _sections(config, "fit")
    if not reports or not fits:
        return config, []
    out = copy.deepcopy(config)
    out_fits = _sections(out, "fit")
    out_acts = _sections(out, "activations")
    floors: list[FloorModel] = []
    by_name = {f.get("name"): f for f in fits}
    for report, out_report in zip(reports, _sections(out, "report"), strict=True):
        b_fit = next((by_name[n] for n in report.get("fits") or () if n in by_name), None)
        if b_fit is None:
            continue
        feats = next(
            (
                f
                for f in features
                if _features_name(f, base) == report.get("features")
                and f.get("corpus") == report.get("corpus")
            ),
            None,
        )
        if feats is not None and _needs_ceiling(report, feats, out_fits, store_path):
            hook = sae_hook(feats, base)
            name = report.get("ceiling") or "ceiling"
            if not any(f.get("name") == name for f in out_fits):
                derived = {k: v for k, v in b_fit.items() if k not in ("affine_map",)}
                derived.update(name=name, model=feats["model"], hooks=[hook])
                out_fits.append(derived)
        if report.get("floor") == RANDOM and not any(f.get("name") == RANDOM for f in out_fits):
            b_acts = next(
                (a for a in _sections(config, "activations") if _acts_name(a) == b_fit["model"]),
                None,
            )
            if b_acts is None:
                raise XprobeError(
                    f'floor = "random" copies B\'s [[activations]] section, and the config has '
                    f"none named {b_fit['model']!r} (the model of fit {b_fit.get('name')!r})"
                )
            if not store_path:
                raise XprobeError('floor = "random" needs the config\'s store')
            source = normalize_path(str(b_acts["model"]), "path_or_hub", base)
            floor = FloorModel(
                source,
                floor_path(store_path, _acts_name(b_acts)),
                b_acts.get("revision"),
                bool(b_acts.get("trust_remote_code", False)),
            )
            floors.append(floor)
            acts = {
                k: v for k, v in b_acts.items() if k not in ("revision", "layers", "hook", "hooks")
            }
            acts.update(model=floor.path, name=RANDOM, hooks=list(b_fit["hooks"]))
            out_acts.append(acts)
            out_fits.append({**b_fit, "name": RANDOM, "model": RANDOM})
        if report.get("token_baseline", True) and "token_fits" not in report and feats:
            out_report["token_fits"] = _token_controls(
                report, feats, b_fit, out_fits, out_acts, base
            )
    out["fit"] = out_fits
    if out_acts:
        out["activations"] = out_acts
    return out, floors


def _token_controls(
    report: dict[str, Any],
    feats: dict[str, Any],
    b_fit: dict[str, Any],
    out_fits: list[dict[str, Any]],
    out_acts: list[dict[str, Any]],
    base: Path | None,
) -> list[str]:
    """Add the token-control ``[[activations]]`` and ``[[fit]]`` sections (module docstring) for
    A and every model the report's fits read; returns the fits' names. A model without an
    ``[[activations]]`` section in the config (its activations only in the store) gets none."""
    by_name = {f.get("name"): f for f in out_fits}
    ceiling = by_name.get(report.get("ceiling") or "ceiling")
    if ceiling is not None and safe_name(str(ceiling.get("model", ""))) == safe_name(str(feats["model"])):
        a_hooks = list(ceiling.get("hooks") or ())
    else:
        try:
            a_hooks = [sae_hook(feats, base)]
        except XprobeError:  # not known here (the ceiling is in the store): no control of A
            a_hooks = []
    fitted: dict[str, list[str]] = {safe_name(str(feats["model"])): a_hooks}
    for name in [*(report.get("fits") or ()), report.get("floor")]:
        f = by_name.get(name)
        if f is not None and not str(f.get("model", "")).endswith(TOKENS):
            hooks = fitted.setdefault(safe_name(str(f["model"])), [])
            hooks += [h for h in f.get("hooks") or () if h not in hooks]
    names = []
    for model, hooks in fitted.items():
        acts = next((a for a in out_acts if _acts_name(a) == model), None)
        if acts is None or acts.get("context", "corpus") != "corpus" or not hooks:
            continue
        name = f"{model}{TOKENS}"
        if not any(_acts_name(a) == name for a in out_acts):
            control = {k: v for k, v in acts.items() if k not in ("layers", "hook", "hooks")}
            control.update(name=name, hooks=hooks, context="token")
            out_acts.append(control)
        if name not in by_name:
            derived = {k: v for k, v in b_fit.items() if k not in ("affine_map", "classes")}
            derived.update(name=name, model=name, hooks=hooks)
            out_fits.append(derived)
        names.append(name)
    return names


def _needs_ceiling(
    report: dict[str, Any],
    feats: dict[str, Any],
    out_fits: list[dict[str, Any]],
    store_path: str | None,
) -> bool:
    """Whether no fit (in the config, derived already, or in the store) can be the ceiling."""
    named = report.get("ceiling")
    if named and any(f.get("name") == named for f in out_fits):
        return False
    a_model, corpus = safe_name(str(feats["model"])), report.get("corpus")
    candidates = [f for f in out_fits if safe_name(str(f.get("model", ""))) == a_model]
    candidates += [
        c
        for c in _store_fits(store_path)
        if safe_name(str(c.get("model", ""))) == a_model
        and c.get("corpus") == corpus
        and c.get("features") == report.get("features")
    ]
    if named:
        return not any(c.get("name") == named for c in candidates)
    # a fit of A on these features is taken as the ceiling (the report checks its hook)
    return not any(c.get("features") == report.get("features") for c in candidates)

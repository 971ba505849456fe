"""``xprobe demo``: the whole pipeline on small models that ship with xprobe, offline.

The models, tokenizer and SAE in ``pipeline/demo/data/`` were built by ``pipeline/demo/build.py``
(trained on the Python standard library). The demo rebuilds a corpus from this machine's stdlib,
skipping the text the models were trained on, writes the config it runs to ``DIR/xprobe.toml``
and runs every stage on it into ``DIR/store``: tokenize, activations of A and of the models B, A's SAE features, the probes, and the report. Every stage skips finished work, so a
second run only re-reads the results. Then it measures the method against what is known by
construction: which SAE features were removed from ``b_ablated`` (their decoder directions
projected out) and ``b_erased`` (trained to apply their LEACE eraser), and a frequency-matched set
that was kept (their linear information survives the eraser).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.demo.corpus import stdlib_jsonl
from pipeline.store import Store

DEMO_DATA = Path(__file__).parent / "data"
CORPUS = "stdlib"
SAE = "sae_a"
FITS = {  # fit name -> (model folder, role)
    "finetune": ("b_finetune", "A trained further on code only"),
    "scratch": ("b_scratch", "same recipe, another seed"),
    "ablated": ("b_ablated", "A minus {n_ablate} SAE directions"),
    "erased": ("b_erased", "A + LEACE erasure of {n_ablate} features"),
    "random": ("b_random", "untrained (the floor)"),
}


@dataclass
class DemoResult:
    store: Store
    summaries: list[dict[str, Any]] = field(default_factory=list)
    numbers: dict[str, Any] = field(default_factory=dict)
    report_html: str | None = None


def demo_config(root: Path, data: Path, corpus: Path, max_tokens: int) -> dict[str, Any]:
    """The pipeline the demo runs, as the TOML tables ``xprobe run`` reads."""
    build = json.loads((data / "build.json").read_text())
    size = build["size"]
    hook = f"blocks.{size['sae_layer']}.hook_resid_post"
    every_layer = [f"blocks.{i}.hook_resid_post" for i in range(size["n_layer"])]
    fit_common = {
        "corpus": CORPUS,
        "features": SAE,
        "held_out_fraction": 0.2,
        "affine_map": True,  # the model-stitching baseline beside every probe
    }
    model_a = str(data / "model_a")
    return {
        "store": str(root / "store"),
        "tokenize": {
            "corpus": CORPUS,
            "source": [str(corpus)],
            "tokenizer": model_a,
            "ctx": size["ctx"],
            "chunk_seqs": 64,
            "max_tokens": max_tokens,
        },
        "activations": [
            {"corpus": CORPUS, "model": model_a, "name": "A", "hooks": [hook], "dtype": "float32"}
        ]
        + [
            {
                "corpus": CORPUS,
                "model": str(data / folder),
                "name": folder,
                "hooks": every_layer if name == "scratch" else [hook],
                "dtype": "float32",
            }
            for name, (folder, _) in FITS.items()
        ],
        "features": {
            "corpus": CORPUS,
            "model": "A",
            "sae_path": str(data / "sae"),
            "name": SAE,
            "transfer_models": ["b_finetune", "b_ablated", "b_erased"],
        },
        "fit": [{"name": "ceiling", "model": "A", "hooks": [hook], **fit_common}]
        + [
            {
                "name": name,
                "model": folder,
                "hooks": every_layer if name == "scratch" else [hook],
                **fit_common,
            }
            for name, (folder, _) in FITS.items()
        ],
        "report": {
            "corpus": CORPUS,
            "features": SAE,
            "fits": ["finetune", "scratch", "ablated", "erased"],
            "ceiling": "ceiling",
            "floor": "random",
            "name": "demo",
        },
    }


def to_toml(config: dict[str, Any], root: Path) -> str:
    """The demo config as TOML (strings, numbers, lists of strings: all it holds), to be written
    into ``root``: paths under ``root`` are written relative to it, as ``xprobe run`` reads them."""
    inside = str(root).rstrip("/") + "/"

    def value(v: Any) -> str:
        if isinstance(v, list):
            return "[" + ", ".join(value(x) for x in v) + "]"
        if isinstance(v, str) and v.startswith(inside):
            v = v.removeprefix(inside)
        return json.dumps(v)

    lines = [f"store = {value(config['store'])}"]
    for name, section in config.items():
        if name == "store":
            continue
        for table in section if isinstance(section, list) else [section]:
            lines.append(f"\n[[{name}]]" if isinstance(section, list) else f"\n[{name}]")
            lines += [f"{k} = {value(v)}" for k, v in table.items()]
    return "\n".join(lines) + "\n"


def run_demo(
    root: Path,
    data: Path = DEMO_DATA,
    max_tokens: int = 250_000,
    skip_bytes: int | None = None,
    on_summary: Callable[[dict[str, Any]], None] = lambda s: None,
    progress: bool = True,
) -> DemoResult:
    """Run the demo pipeline into ``root`` and measure it; ``on_summary`` sees each stage's summary.

    The corpus starts after the first ``skip_bytes`` of stdlib text (default: what the models
    were trained on), so the features are measured on modules the models never saw.
    """
    from pipeline.config import from_dict
    from pipeline.controls import derive
    from pipeline.errors import XprobeError
    from pipeline.registry import STAGES

    if not (data / "build.json").exists():
        raise XprobeError(f"no demo models in {data}; build them: python -m pipeline.demo.build")
    build = json.loads((data / "build.json").read_text())
    if skip_bytes is None:
        skip_bytes = build["size"]["corpus_bytes"]
    root.mkdir(parents=True, exist_ok=True)
    corpus = root / "corpus" / "stdlib.jsonl"
    if not corpus.exists():
        # ~4 bytes of stdlib text per token; a little more, so max_tokens is the cap that binds
        stdlib_jsonl(corpus, 5 * max_tokens, skip_bytes=skip_bytes)
    config = demo_config(root, data, corpus, max_tokens)
    (root / "xprobe.toml").write_text(to_toml(config, root))
    result = DemoResult(Store(root / "store"))
    derived = derive(config, None, str(root / "store"))[0]  # the token controls, as xprobe run
    for entry in STAGES:
        section = derived.get(entry.name)
        if section is None:
            continue
        cfg_cls, run_fn = entry.load()
        for table in section if isinstance(section, list) else [section]:
            # rebuilt demo models (or an edited corpus) make the units computed from the old
            # ones stale (pipeline.lineage): the demo recomputes exactly those
            cfg = from_dict(cfg_cls, {**table, "progress": progress})
            summary = run_fn(cfg, result.store, rebuild_stale=True)
            on_summary(summary)
            result.summaries.append(summary)
            result.report_html = summary.get("html", result.report_html)
    result.numbers = measure(result.store, data, config)
    return result


# ---- what the demo shows ----------------------------------------------------------------------


def auroc(positive: np.ndarray, negative: np.ndarray) -> float:
    """P(a positive scores above a negative), ties counted half (the Mann-Whitney U statistic)."""
    positive, negative = positive[np.isfinite(positive)], negative[np.isfinite(negative)]
    if len(positive) == 0 or len(negative) == 0:
        return float("nan")
    diff = positive[:, None] - negative[None, :]
    return float((diff > 0).mean() + 0.5 * (diff == 0).mean())


def _best_r2(store: Store, fit: str) -> np.ndarray:
    """Held-out R² of a fit at its best hook per feature ``[F]`` (0 where the probe failed); the
    hook is the fit's ``best_hook``, chosen on training tokens (a max over held-out R² would be
    optimistic)."""
    info = store.info(f"probes/{fit}")
    hooks = info["config"]["hooks"]
    r2 = np.stack([store.array(f"probes/{fit}/{h}/r2_held_out")[:] for h in hooks])
    best = store.array(f"probes/{fit}/best_hook")[:].astype(np.int64)
    return np.take_along_axis(r2, best[None], 0)[0]


GROUND_TRUTH = ("ablated", "erased")
"""Models B built to lack the ablation.json "ablated" features and keep the "kept" ones."""


def _separation(score: np.ndarray, ablated: np.ndarray, kept: np.ndarray) -> dict[str, Any]:
    return {
        "auroc": auroc(score[kept], score[ablated]),
        "kept": float(np.nanmedian(score[kept])),
        "ablated": float(np.nanmedian(score[ablated])),
        "n_kept": int(np.isfinite(score[kept]).sum()),
        "n_ablated": int(np.isfinite(score[ablated]).sum()),
    }


def measure(store: Store, data: Path, config: dict[str, Any]) -> dict[str, Any]:
    """The demo's numbers: how much each B keeps, and ablated vs kept features in the models
    built without them (AUROC of the kept ones scoring higher)."""
    ablation = json.loads((data / "ablation.json").read_text())
    ablated, kept = np.array(ablation["ablated"]), np.array(ablation["kept"])
    hook = ablation["hook"]
    ceiling = store.array(f"probes/ceiling/{hook}/r2_held_out")[:]
    ok = store.array(f"probes/ceiling/{hook}/status")[:] == 0
    ratio = {}
    with np.errstate(divide="ignore", invalid="ignore"):
        for name in FITS:
            ratio[name] = np.where(ok & (ceiling > 0), _best_r2(store, name) / ceiling, np.nan)
    out: dict[str, Any] = {
        "n_feat": int(len(ceiling)),
        "n_ceiling_ok": int(ok.sum()),
        "ceiling_r2_median": float(np.median(ceiling[ok])),
        "ratio_median": {n: float(np.nanmedian(r)) for n, r in ratio.items()},
        "n_ablated": len(ablated),
        "ratio_separation": {n: _separation(ratio[n], ablated, kept) for n in GROUND_TRUTH},
    }
    table = _report_table(store, config)
    if table is None:
        out["presence"] = None
        return out
    scored = (table["status"] == "scored").to_numpy()
    presence = {n: table[f"{'floor' if n == 'random' else n}_presence"].to_numpy() for n in FITS}
    token = np.maximum(np.nan_to_num(table["token_r2"].to_numpy()), 0)
    token_level = ok & (token >= 0.5 * ceiling)
    out["presence"] = {
        "n_scored": int(scored.sum()),
        "median": {n: float(np.nanmedian(p)) for n, p in presence.items()},
        "present": {n: float(np.mean(p[scored] >= 0.7)) for n, p in presence.items()},
        "undetermined": {  # the presence interval straddles a threshold
            n: int((table[f"{'floor' if n == 'random' else n}_class"] == "undetermined").sum())
            for n in FITS
        },
        "separation": {n: _separation(presence[n], ablated, kept) for n in GROUND_TRUTH},
        "separation_all": {
            n: _separation(presence[n], ablated, np.setdiff1d(np.flatnonzero(scored), ablated))
            for n in GROUND_TRUTH
        },
        "n_token_level": int(token_level.sum()),
        "random_ratio_token_level": float(np.nanmedian(ratio["random"][token_level])),
        "random_ratio_contextual": float(np.nanmedian(ratio["random"][ok & ~token_level])),
    }
    return out


def _report_table(store: Store, config: dict[str, Any]) -> Any:
    name = config["report"]["name"]
    path = store.local_path / "report" / name / "table.parquet" if store.local_path else None
    if path is None or not path.exists():
        return None
    import pandas as pd

    return pd.read_parquet(path)


def format_numbers(n: dict[str, Any], data: Path = DEMO_DATA) -> str:
    """The demo's findings as the lines ``xprobe demo`` prints."""
    build = json.loads((data / "build.json").read_text())
    size = build["size"]
    p = n.get("presence")
    lines = [
        "",
        f"xprobe demo: A is a {size['n_layer']}-layer GPT-2 (d_model {size['d_model']}) trained on "
        f"stdlib docstrings and code;",
        f"its SAE: {size['d_sae']} TopK features (k={size['sae_k']}) on "
        f"blocks.{size['sae_layer']}.hook_resid_post. Ceiling A->A: median held-out R² "
        f"{n['ceiling_r2_median']:.2f} over {n['n_ceiling_ok']} features.",
        "",
        f"  {'model B':<10} {'what it is':<34} {'R²/ceiling':>10}"
        + (f" {'presence':>9} {'present':>8} {'undetermined':>13}" if p else ""),
    ]
    for name, (_, what) in FITS.items():
        what = what.format(n_ablate=n["n_ablated"])
        row = f"  {name:<10} {what:<34} {n['ratio_median'][name]:>10.2f}"
        if p:
            row += f" {p['median'][name]:>9.2f} {p['present'][name]:>8.0%}"
            row += f" {p['undetermined'][name]:>13}"
        lines.append(row)
    if p:
        lines.append(
            f"  (R²/ceiling: median over features; presence: the report's score, median; present:"
            f" share of the {p['n_scored']} scored features with presence >= 0.7; undetermined:"
            " features whose 95% bootstrap interval of presence straddles a threshold)"
        )
    lines += [
        "",
        f"Ground truth: {n['n_ablated']} SAE features removed vs {n['n_ablated']} kept "
        f"(frequency-matched; each keeps >= {size['min_survival']:.0%} of its R² beyond the token"
        " through the eraser, on the build corpus); AUROC = P(a kept feature scores above a"
        " removed one):",
    ]
    for name in GROUND_TRUTH:
        scores = [("R²/ceiling", n["ratio_separation"][name])]
        if p:
            scores.insert(0, ("presence", p["separation"][name]))
        for label, sep in scores:
            lines.append(
                f"  {name:<8} {label:<10}  AUROC {sep['auroc']:.3f}   median {sep['kept']:.2f} kept"
                f" vs {sep['ablated']:.2f} removed   (scored {sep['n_kept']} + {sep['n_ablated']})"
            )
    if p:
        lines.append("  removed vs every other scored feature (no matching), by presence:")
        for name in GROUND_TRUTH:
            sep = p["separation_all"][name]
            lines.append(
                f"  {name:<8} {'presence':<10}  AUROC {sep['auroc']:.3f}   median {sep['kept']:.2f}"
                f" others vs {sep['ablated']:.2f} removed   (scored {sep['n_kept']} + {sep['n_ablated']})"
            )
        lines += [
            "",
            f"Random floor: R²/ceiling {p['random_ratio_token_level']:.2f} on the "
            f"{p['n_token_level']} token-level features (the current token explains at least half"
            f" the ceiling's R²) vs {p['random_ratio_contextual']:.2f} on the others; presence"
            f" (beyond the token) median {p['median']['random']:.2f}.",
        ]
    else:
        lines.append("(no report stage in this checkout: presence scores not computed)")
    return "\n".join(lines)

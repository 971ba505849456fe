"""Segmented runs (``--max-disk``, pipeline/segments.py) against an unsegmented run on the same
machine and data: tokens/s of the whole run (activations, features, fits: the interleaving and
the second forward over the held-out sequences are the overhead), peak store size (sampled every
20 ms), and what fits of one B sharing one read of a segment save against reading it per fit."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import torch

from pipeline.bench.common import build_model, corpus_and_tokenizer, dir_bytes

HOOK_OF = "blocks.{}.hook_resid_post"


def _save_sae(out: Path, d_in: int, d_sae: int, hook: str, seed: int) -> Path:
    """A ReLU SAE with random weights whose encoder bias keeps L0 in the tens."""
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(seed)
    sae = StandardSAE(
        StandardSAEConfig(d_in=d_in, d_sae=d_sae, metadata=SAEMetadata(hook_name=hook))
    )
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_in, d_sae) / d_in**0.5)
        sae.W_dec.copy_(torch.randn(d_sae, d_in) / d_in**0.5)
        sae.b_enc.fill_(-2.5)
        sae.b_dec.zero_()
    sae.save_model(str(out))
    return out


def _config(work: Path, store: Path, p: dict, corpus: Path, model: Path, saes: list) -> dict:
    hook = HOOK_OF.format(p["layer"])
    common = {"device": "auto", "progress": False}
    return {
        "store": str(store),
        "tokenize": {
            "corpus": "c",
            "source": [str(corpus)],
            "tokenizer": str(model),
            "ctx": p["ctx"],
            "chunk_seqs": p["chunk_seqs"],
            "max_tokens": p["n_tok"],
            "progress": False,
        },
        "activations": {
            "corpus": "c",
            "model": str(model),
            "name": "b",
            "hooks": [hook],
            "dtype": p["dtype"],
            "batch_seqs": p["batch_seqs"],
            **common,
        },
        "features": [
            {"corpus": "c", "model": "b", "sae_path": str(sae), "name": sae.name, **common}
            for sae in saes
        ],
        "fit": [
            {
                "name": f"fit_{sae.name}",
                "corpus": "c",
                "features": sae.name,
                "model": "b",
                "hooks": [hook],
                "n_bootstrap": 20,
                **common,
            }
            for sae in saes
        ],
    }


def _timed_run(config: dict, store: Path, max_disk: int | None) -> tuple[float, int]:
    """Seconds of ``pipeline.run`` and the store's peak size, sampled every 20 ms."""
    import pipeline

    peak, stop = [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            try:
                peak[0] = max(peak[0], dir_bytes(store))
            except FileNotFoundError:
                pass
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    start = time.perf_counter()
    try:
        pipeline.run(config, progress=False, max_disk=max_disk)
    finally:
        seconds = time.perf_counter() - start
        stop.set()
        sampler.join()
    return seconds, peak[0]


def _read_once_vs_per_fit(config: dict, store_path: Path) -> dict:
    """On the unsegmented store (every dense chunk present): the fits' consumption of every
    chunk, per fit (each reads B's chunk itself) against in one pass (``consume_together``)."""
    from pipeline import lifecycle
    from pipeline.store import Store
    from stages.fit import FitConfig, FitStage

    out = {}
    for mode in ("per_fit", "together"):
        store = Store(store_path, mode="a")
        stages = []
        for i, section in enumerate(config["fit"]):
            cfg = FitConfig(**{**section, "name": f"{mode}_{i}"})
            stages.append(FitStage(cfg))
        n_chunks = int(store.info("tokens/c")["n_chunks"])
        chunks = list(range(n_chunks))
        start = time.perf_counter()
        if mode == "together":
            lifecycle.consume_together(stages, store, chunks)
        else:
            for stage in stages:
                lifecycle.consume_together([stage], store, chunks)
        out[f"{mode}_s"] = time.perf_counter() - start
        for stage in stages:
            store.delete(f"probes/{stage.cfg.name}")
    return out


def bench_segments(work: Path, p: dict) -> dict:
    work.mkdir(parents=True, exist_ok=True)
    corpus, tok_dir = corpus_and_tokenizer(work, p["corpus_bytes"], vocab_size=4096)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[p["dtype"]]
    model = build_model({**p["shape"], "ctx": p["ctx"]}, tok_dir, work / "model", dtype)
    d = p["shape"]["d_model"]
    hook = HOOK_OF.format(p["layer"])
    saes = [
        _save_sae(work / f"sae{width}", d, width, hook, seed=i)
        for i, width in enumerate(p["widths"])
    ]
    whole = work / "whole"
    config = _config(work, whole, p, corpus, model, saes)
    t_whole, peak_whole = _timed_run(config, whole, None)
    from pipeline.store import Store

    store = Store(whole, mode="r")
    n_tok = int(store.info("tokens/c")["n_tok"])
    dense = store.nbytes_stored(f"acts/c/b/{hook}/x")
    # the budget: the finished store with a third of its dense activations, plus room for the
    # fits' statistics, which a segmented run holds for every fit at once (float64 XᵀX [d, d],
    # XᵀY [F, d]... per split, train and held-out) and one temporary copy of the largest
    checkpoints = [2 * 8 * (d * d + width * d + 4 * width + 2 * d) for width in p["widths"]]
    budget = int(store.nbytes_stored("") - 2 * dense / 3 + sum(checkpoints) + max(checkpoints))
    segmented = work / "segmented"
    config_seg = _config(work, segmented, p, corpus, model, saes)
    t_seg, peak_seg = _timed_run(config_seg, segmented, budget)
    shared = _read_once_vs_per_fit(config, whole)
    return {
        "n_tok": n_tok,
        "fits_of_one_B": len(saes),
        "widths": p["widths"],
        "dense_activation_bytes": dense,
        "unsegmented_tok_per_s": n_tok / t_whole,
        "unsegmented_peak_store_bytes": peak_whole,
        "max_disk_bytes": budget,
        "segmented_tok_per_s": n_tok / t_seg,
        "segmented_peak_store_bytes": peak_seg,
        "segmented_over_unsegmented_tok_per_s": t_whole / t_seg,
        "segmented_peak_within_budget": peak_seg <= budget,
        "fits_consume_per_fit_s": shared["per_fit_s"],
        "fits_consume_together_s": shared["together_s"],
        "together_over_per_fit_time": shared["together_s"] / shared["per_fit_s"],
        "dense_reads_together_over_per_fit": 1 / len(saes),
    }

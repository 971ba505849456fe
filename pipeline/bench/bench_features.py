"""Features stage benchmark: tokens/s vs bare ``sae.encode`` on the same activations.

Activations come from a 2-layer random-weight GPT-2 of the given width run by the activations
stage over the stdlib corpus; each SAE is a sae-lens StandardSAE with random weights whose
encoder biases are set for a realistic L0 (``_save_sae``).
"""

from __future__ import annotations

import time
from pathlib import Path

import torch

from pipeline.bench.common import Timer, corpus_and_tokenizer, device

HOOK = "blocks.0.hook_resid_post"
DTYPE = {"cpu": torch.float32, "cuda": torch.bfloat16}


def _build_acts(work: Path, n_tokens: int, d_model: int) -> tuple:
    """Tokens + layer-0 activations of a 2-layer random-weight GPT-2 (d_model), stdlib corpus."""
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    from pipeline.store import Store
    from stages.activations import ActivationsConfig
    from stages.activations import run as activations
    from stages.tokenize import TokenizeConfig
    from stages.tokenize import run as tokenize

    corpus, tok_dir = corpus_and_tokenizer(work, 6 * n_tokens, vocab_size=8192)
    tok = AutoTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(0)
    model = (
        GPT2LMHeadModel(
            GPT2Config(
                vocab_size=len(tok),
                n_layer=2,
                n_embd=d_model,
                n_head=4,
                n_positions=256,
                bos_token_id=0,
                eos_token_id=0,
            )
        )
        .to(DTYPE[device()])
        .eval()
    )
    model_dir = work / "gpt2"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    store = Store(work / "store")
    t0 = time.perf_counter()
    tokenize(
        TokenizeConfig(
            corpus="c",
            source=(str(corpus),),
            tokenizer=str(tok_dir),
            ctx=256,
            chunk_seqs=64,
            max_tokens=n_tokens,
            progress=False,
        ),
        store,
    )
    t1 = time.perf_counter()
    activations(
        ActivationsConfig(
            corpus="c",
            model=str(model_dir),
            name="gpt2",
            layers=(0,),
            device=device(),
            progress=False,
        ),
        store,
    )
    t2 = time.perf_counter()
    return store, {"tokenize_s": round(t1 - t0, 2), "activations_s": round(t2 - t1, 2)}


def _all_acts(store) -> tuple[torch.Tensor, torch.Tensor]:
    from pipeline.store.reader import load_acts

    n_chunks = int(store.info("tokens/c")["n_chunks"])
    acts = torch.cat([load_acts(store, f"acts/c/gpt2/{HOOK}", i) for i in range(n_chunks)])
    mask = torch.cat(
        [
            torch.from_numpy(store.read_chunk("tokens/c/mask", i).reshape(-1))
            for i in range(n_chunks)
        ]
    )
    return acts, mask


def _save_sae(out: Path, acts: torch.Tensor, d_sae: int, target_l0: float) -> dict:
    """A StandardSAE with random weights; per-feature encoder bias set at the (1 - L0/F) quantile
    of that feature's pre-activation on a sample of the activations, so mean L0 ~ target_l0."""
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    d_in = acts.shape[1]
    torch.manual_seed(0)
    sae = StandardSAE(
        StandardSAEConfig(d_in=d_in, d_sae=d_sae, metadata=SAEMetadata(hook_name=HOOK))
    )
    sample = acts[torch.randperm(len(acts))[:8192]].float()
    mean, std = sample.mean(0), sample.std(0).mean()
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_in, d_sae) / (d_in**0.5 * std))
        sae.W_dec.copy_(torch.randn(d_sae, d_in) * std / d_sae**0.5)
        sae.b_dec.copy_(mean)
        sae.b_enc.zero_()
        pre = sae.encode(sample)  # relu(pre); the quantile we want is positive, so unaffected
        q = torch.quantile(pre[:4096], 1 - target_l0 / d_sae, dim=0)
        sae.b_enc.copy_(-q)
        l0 = sae.encode(sample).ne(0).sum(1).float()
    sae.save_model(str(out))
    return {"sample_mean_l0": round(float(l0.mean()), 1), "sample_max_l0": int(l0.max())}


def bench_features(work: Path, p: dict) -> dict:
    """Features stage tokens/s vs bare ``sae.encode`` on the same activations, per SAE width."""
    work.mkdir(parents=True, exist_ok=True)
    store, setup = _build_acts(work, p["n_tok"], d_model=p["d_model"])
    acts, mask = _all_acts(store)
    out = {"setup": setup, "d_model": int(acts.shape[1]), "device": device(), "widths": {}}
    for d_sae in p["widths"]:
        out["widths"][str(d_sae)] = _bench_width(work, store, acts, mask, d_sae, p)
    return out


def _bench_width(work: Path, store, acts, mask, d_sae: int, p: dict) -> dict:
    from sae_lens import SAE

    from stages.features import FeaturesConfig, run

    sae_dir = work / f"sae{d_sae}"
    calib = _save_sae(sae_dir, acts, d_sae, target_l0=p["l0"])
    name = f"sae{d_sae}"
    cfg = FeaturesConfig(
        corpus="c",
        model="gpt2",
        sae_path=str(sae_dir),
        name=name,
        device=device(),
        batch_tokens=p["batch_tokens"],
        progress=False,
    )
    batch = cfg.batch_tokens
    with Timer() as stage:
        run(cfg, store)
    info = store.info(f"feats/c/{name}")
    n_tok = int(info["n_tok"])

    sae = SAE.load_from_disk(str(sae_dir), device=device()).eval()
    l0_sum = 0
    with torch.inference_mode():
        sae.encode(acts[:batch].to(device(), sae.dtype))  # warm-up
        with Timer() as bare:  # inputs in RAM, moved to the device batch by batch as the stage does
            for start in range(0, len(acts), batch):
                f = sae.encode(acts[start : start + batch].to(device(), sae.dtype))
        for start in range(0, len(acts), batch):
            f = sae.encode(acts[start : start + batch].to(device(), sae.dtype))
            l0_sum += int(f[mask[start : start + batch].to(f.device)].ne(0).sum())
    stage_tps, bare_tps = n_tok / stage.s, len(acts) / bare.s
    on_disk = store.nbytes_stored(f"feats/c/{name}/idx") + store.nbytes_stored(
        f"feats/c/{name}/val"
    )
    store.delete(f"feats/c/{name}")
    return {
        "d_sae": d_sae,
        "tokens": n_tok,
        "counted_tokens": int(mask.sum()),
        "batch_tokens": batch,
        "sae_calibration": calib,
        "mean_l0_counted": round(l0_sum / max(int(mask.sum()), 1), 1),
        "stage_s": round(stage.s, 2),
        "stage_tokens_per_s": round(stage_tps),
        "bare_encode_s": round(bare.s, 2),
        "bare_encode_tokens_per_s": round(bare_tps),
        "ratio_stage_vs_bare_encode": round(stage_tps / bare_tps, 3),
        "target_ratio_stage_vs_bare_encode": ">= 0.8",
        "k": int(info["k"]),
        "dropped_fraction": info.get("dropped_fraction"),
        "bytes_per_token_on_disk": round(on_disk / n_tok, 2),
        "bytes_per_token_uncompressed": 8 * int(info["k"]),
        "dense_float32_bytes_per_token": 4 * d_sae,
        "on_disk_vs_dense": round(on_disk / n_tok / (4 * d_sae), 4),
        "note": "stage_s includes loading the SAE, calibrating K (one extra encode of up to "
        "4,096 tokens), reading activations from the store, writing and finalize; bare = "
        "sae.encode only, inputs in RAM",
    }

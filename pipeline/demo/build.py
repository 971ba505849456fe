"""Build the demo's models and SAE from the Python standard library, offline and seeded.

    python -m pipeline.demo.build                 # writes pipeline/demo/data/ (~15 min, 1 thread)
    python -m pipeline.demo.build --size tiny --out /tmp/demo_data   # seconds, for tests

What it makes (every model a plain HF folder with the shared tokenizer, weights in float16):
  model_a      GPT-2 trained on stdlib docstrings + code                      (A)
  sae          sae-lens TopK SAE on A's blocks.<L>.hook_resid_post, trained by sae-lens's
               SAETrainer on activations read back from an xprobe store
  b_finetune   A trained further on the code documents only                   (a finetune)
  b_scratch    the same recipe from another seed                              (separately trained)
  b_random     an untrained model of the same shape                           (the floor)
  b_ablated    A with some SAE decoder directions projected out of every write to the residual
               stream up to layer L: embeddings, attention and MLP out-projections of blocks <= L.
               Those directions are absent from its layer-L residual by construction; the
               features' linear information is not (measured: see the README).
  b_erased     A with its embeddings and blocks <= L trained to output A's layer-L residual with
               the LEACE eraser of the same features applied: an affine map fitted on A's
               cached activations after which no linear readout predicts those features
  ablation.json  the removed features and a frequency-matched "kept" set whose headroom
               (in-sample R² beyond the current token) survives that eraser by construction
  build.json   the size, seed, timings, held-out losses and SAE statistics of this build
The corpus is rebuilt from the stdlib at build and demo time; no text is committed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.demo.ablation import (
    ablation_band,
    choose_ablated,
    fit_eraser,
    held_out_share,
    linear_r2,
    match_kept,
    rounded,
    survival,
    token_r2,
)
from pipeline.demo.corpus import stdlib_jsonl, train_bpe
from pipeline.demo.lm import (
    distill_erased,
    eval_loss,
    log,
    pack_sequences,
    project_out,
    residual_along,
    round_fp16,
    save_model,
    split_held_out,
    train_lm,
)
from pipeline.demo.sae import cache_activations, train_sae

DEMO_DATA = Path(__file__).parent / "data"


@dataclass(frozen=True)
class BuildSize:
    """How big the demo's models are and how long they train."""

    corpus_bytes: int = 4_000_000
    """Stdlib text (docstrings and code) the tokenizer and models are trained on."""
    vocab_size: int = 4096
    d_model: int = 128
    n_layer: int = 4
    n_head: int = 4
    ctx: int = 128
    """Tokens per training sequence (the demo tokenizes with the same ctx)."""
    batch_seqs: int = 32
    train_steps: int = 400
    """AdamW steps for A and for the scratch model."""
    lr: float = 3e-3
    finetune_steps: int = 100
    finetune_lr: float = 1e-3
    sae_layer: int = 2
    """The SAE reads blocks.<sae_layer>.hook_resid_post."""
    d_sae: int = 1024
    sae_k: int = 16
    sae_tokens: int = 400_000
    """Tokens of A's activations cached (in an xprobe store) to train the SAE on."""
    sae_steps: int = 1000
    sae_batch: int = 2048
    sae_lr: float = 1e-3
    n_ablate: int = 8
    """SAE features removed from b_ablated and b_erased (and as many frequency-matched kept ones).
    Not more: the eraser of 16 leaves the other candidates a median 7% of their headroom, so no
    kept set would be kept (measured on this A; see the README)."""
    ablate_frequency: tuple[float, float] = (2e-3, 5e-2)
    """Firing-frequency band the ablated and kept features are drawn from."""
    min_headroom: float = 0.1
    """... and the least in-sample R² A's residual must add over the current token for them."""
    min_survival: float = 0.8
    """... and, for the kept ones, the least share of their headroom that must survive the eraser
    of the ablated ones (see survival): kept by construction, not only by label."""
    erase_steps: int = 800
    """Adam steps that teach b_erased the eraser's output (see demo_lm.distill_erased)."""
    erase_batch: int = 16
    erase_lr: float = 2e-3


SIZES = {
    "full": BuildSize(),
    "tiny": BuildSize(
        corpus_bytes=400_000,
        vocab_size=512,
        d_model=32,
        n_layer=2,
        n_head=2,
        ctx=64,
        batch_seqs=8,
        train_steps=30,
        lr=1e-2,
        finetune_steps=5,
        sae_layer=0,
        d_sae=128,
        sae_k=8,
        sae_tokens=20_000,
        sae_steps=60,
        sae_batch=256,
        sae_lr=3e-3,
        n_ablate=4,
        ablate_frequency=(1e-3, 0.3),
        min_headroom=0.0,
        min_survival=0.3,
        erase_steps=30,
        erase_batch=8,
        erase_lr=1e-2,
    ),
}


def new_model(size: BuildSize, seed: int) -> torch.nn.Module:
    from pipeline.demo.lm import new_model as new_gpt2

    return new_gpt2(size.vocab_size, size.d_model, size.n_layer, size.n_head, size.ctx, seed)


# ---- the build --------------------------------------------------------------------------------


def build(out: Path, size: BuildSize, seed: int = 0, work: Path | None = None) -> dict[str, Any]:
    """Build every demo artifact into ``out`` (replacing it); returns what build.json records."""
    from transformers import AutoTokenizer

    start = time.time()
    timings: dict[str, float] = {}
    record: dict[str, Any] = {"size": dataclasses.asdict(size), "seed": seed}

    def lap(name: str, t0: float) -> None:
        timings[name] = round(time.time() - t0, 1)
        log(f"{name}: {timings[name]} s")

    with tempfile.TemporaryDirectory(dir=work) as tmp_name:
        tmp = Path(tmp_name)
        staging = tmp / "demo_data"
        t0 = time.time()
        corpus = stdlib_jsonl(tmp / "train.jsonl", size.corpus_bytes)
        docs = [json.loads(line) for line in corpus.open()]
        tok = AutoTokenizer.from_pretrained(train_bpe(corpus, tmp / "tok", size.vocab_size))
        train_all, held_all = split_held_out(
            pack_sequences([d["text"] for d in docs], tok, size.ctx)
        )
        code = [d["text"] for d in docs if d["kind"] == "code"]
        prose = [d["text"] for d in docs if d["kind"] == "prose"]
        train_code, held_code = split_held_out(pack_sequences(code, tok, size.ctx))
        _, held_prose = split_held_out(pack_sequences(prose, tok, size.ctx))
        record["corpus"] = {
            "documents": len(docs),
            "bytes_code": sum(map(len, code)),
            "bytes_prose": sum(map(len, prose)),
            "train_seqs": len(train_all),
            "train_code_seqs": len(train_code),
        }
        lap("corpus_and_tokenizer", t0)

        t0 = time.time()
        log(f"model_a: {size.train_steps} steps on {len(train_all)} sequences")
        model_a = new_model(size, seed)
        train_lm(model_a, train_all, size.train_steps, size.batch_seqs, size.lr, seed)
        round_fp16(model_a)
        save_model(model_a, tok, staging / "model_a")
        lap("model_a", t0)

        t0 = time.time()
        acts, ids = cache_activations(tmp, staging / "model_a", corpus, size)
        lap("cache_activations", t0)
        t0 = time.time()
        stats = train_sae(acts, size, seed, staging / "sae")
        lap("sae", t0)

        t0 = time.time()
        log(f"b_finetune: {size.finetune_steps} steps on code only")
        finetune = new_model(size, seed)
        finetune.load_state_dict(model_a.state_dict())
        train_lm(
            finetune, train_code, size.finetune_steps, size.batch_seqs, size.finetune_lr, seed + 1
        )
        save_model(round_fp16(finetune), tok, staging / "b_finetune")
        lap("b_finetune", t0)

        t0 = time.time()
        log(f"b_scratch: {size.train_steps} steps, seed {seed + 1000}")
        scratch = new_model(size, seed + 1000)
        train_lm(scratch, train_all, size.train_steps, size.batch_seqs, size.lr, seed + 1000)
        save_model(round_fp16(scratch), tok, staging / "b_scratch")
        lap("b_scratch", t0)

        random = round_fp16(new_model(size, seed + 2000).eval())
        save_model(random, tok, staging / "b_random")

        from sae_lens import SAE

        sae = SAE.load_from_disk(staging / "sae", device="cpu")
        frequency = np.array(stats["frequency"])
        # what A's residual predicts of each feature beyond the current token (in-sample)
        token = np.maximum(token_r2(sae, acts, ids, size.vocab_size), 0)
        room = linear_r2(acts, sae, acts) - token
        band = ablation_band(frequency, room, size.ablate_frequency, size.min_headroom)
        ablated_ids = choose_ablated(band, size.n_ablate, seed)
        eraser = fit_eraser(sae, acts, ablated_ids)
        share = survival(sae, acts, eraser, room, token)
        kept_ids = match_kept(frequency, band[share[band] >= size.min_survival], ablated_ids)
        directions = sae.W_dec.detach()[ablated_ids]
        ablated = new_model(size, seed)
        ablated.load_state_dict(model_a.state_dict())
        changed = project_out(ablated, directions, size.sae_layer)
        round_fp16(ablated).eval()
        save_model(ablated, tok, staging / "b_ablated")
        basis, _ = torch.linalg.qr(directions.double().T)
        leftover = residual_along(ablated, held_all[:16], size.sae_layer, basis)
        before = residual_along(model_a, held_all[:16], size.sae_layer, basis)
        t0 = time.time()
        log(
            f"b_erased: {size.erase_steps} steps learning the eraser of {len(ablated_ids)} features"
        )
        erased = new_model(size, seed)
        erased.load_state_dict(model_a.state_dict())
        distance = distill_erased(
            erased,
            model_a,
            eraser,
            train_all,
            size.sae_layer,
            size.erase_steps,
            size.erase_batch,
            size.erase_lr,
            seed + 3000,
        )
        round_fp16(erased).eval()
        save_model(erased, tok, staging / "b_erased")
        held_share = held_out_share(model_a, erased, sae, held_all, size.sae_layer)
        lap("b_erased", t0)
        tenth = max(1, len(distance) // 10)
        (staging / "ablation.json").write_text(
            json.dumps(
                {
                    "hook": f"blocks.{size.sae_layer}.hook_resid_post",
                    "ablated": ablated_ids,
                    "kept": kept_ids,
                    "frequency_ablated": [float(frequency[f]) for f in ablated_ids],
                    "frequency_kept": [float(frequency[f]) for f in kept_ids],
                    "band": len(band),
                    "band_surviving": int((share[band] >= size.min_survival).sum()),
                    "survival_ablated": [rounded(share[f]) for f in ablated_ids],
                    "survival_kept": [rounded(share[f]) for f in kept_ids],
                    "survival_band_median": rounded(np.nanmedian(share[band])),
                    "eraser_rank": int(
                        torch.linalg.matrix_rank(torch.eye(len(eraser[0])).double() - eraser[0])
                    ),
                    "projected": changed,
                    "max_relative_component_before": before,
                    "max_relative_component_after": leftover,
                    "erased_distance_first_last_tenth": [
                        rounded(np.mean(distance[:tenth])),
                        rounded(np.mean(distance[-tenth:])),
                    ],
                    "erased_held_out_r2_share_ablated": [
                        rounded(held_share[f]) for f in ablated_ids
                    ],
                    "erased_held_out_r2_share_kept": [rounded(held_share[f]) for f in kept_ids],
                },
                indent=1,
            )
        )

        models = {
            "model_a": model_a,
            "b_finetune": finetune,
            "b_scratch": scratch,
            "b_random": random,
            "b_ablated": ablated,
            "b_erased": erased,
        }
        record["held_out_loss"] = {
            name: {
                "all": round(eval_loss(m, held_all), 4),
                "code": round(eval_loss(m, held_code), 4),
                "prose": round(eval_loss(m, held_prose), 4),
            }
            for name, m in models.items()
        }
        record["sae"] = {k: v for k, v in stats.items() if k != "frequency"}
        record["sae"]["alive_in_band"] = int(
            sum(
                size.ablate_frequency[0] <= f <= size.ablate_frequency[1]
                for f in stats["frequency"]
            )
        )
        timings["total"] = round(time.time() - start, 1)
        record["timings_s"] = timings
        record["torch"] = torch.__version__
        record["threads"] = torch.get_num_threads()
        (staging / "build.json").write_text(json.dumps(record, indent=1))
        if out.exists():
            shutil.rmtree(out)
        shutil.copytree(staging, out)
    log(f"wrote {out} in {timings['total']} s")
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEMO_DATA)
    parser.add_argument("--size", choices=sorted(SIZES), default="full")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    record = build(args.out, SIZES[args.size], args.seed)
    print(json.dumps({k: record[k] for k in ("held_out_loss", "sae", "timings_s")}, indent=1))


if __name__ == "__main__":
    main()

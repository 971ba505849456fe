"""Build the demo's models and SAE from the Python standard library, offline and seeded.

    python -m pipeline.demo_build                 # writes pipeline/demo_data/ (~15 min, 1 thread)
    python -m pipeline.demo_build --size tiny --out /tmp/demo_data   # seconds, for tests

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
import math
import shutil
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.demo_corpus import stdlib_jsonl, train_bpe
from pipeline.demo_lm import (
    block_output,
    distill_erased,
    eval_loss,
    leace_eraser,
    log,
    pack_sequences,
    project_out,
    residual_along,
    round_fp16,
    save_model,
    split_held_out,
    train_lm,
)

DEMO_DATA = Path(__file__).parent / "demo_data"


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
    """... and the least R² A's residual must add over the current token for them (see headroom)."""
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
    from pipeline.demo_lm import new_model as new_gpt2

    return new_gpt2(size.vocab_size, size.d_model, size.n_layer, size.n_head, size.ctx, seed)


# ---- the SAE ----------------------------------------------------------------------------------


def cache_activations(
    work: Path, model_dir: Path, corpus: Path, size: BuildSize
) -> tuple[torch.Tensor, torch.Tensor]:
    """A's residual at the SAE's hook on ``sae_tokens`` tokens, through xprobe's own stages:
    tokenize and activations into a store, read back with ``iter_chunks``: ``(acts [n_tok,
    d_model], token ids [n_tok])`` of the counted positions."""
    from pipeline.reader import iter_chunks
    from pipeline.store import Store
    from stages.activations import ActivationsConfig
    from stages.activations import run as run_activations
    from stages.tokenize import TokenizeConfig
    from stages.tokenize import run as run_tokenize

    store = Store(work / "store")
    hook = f"blocks.{size.sae_layer}.hook_resid_post"
    run_tokenize(
        TokenizeConfig(
            corpus="train",
            source=(str(corpus),),
            tokenizer=str(model_dir),
            ctx=size.ctx,
            chunk_seqs=64,
            max_tokens=size.sae_tokens,
            progress=False,
        ),
        store,
    )
    run_activations(
        ActivationsConfig(
            corpus="train",
            model=str(model_dir),
            name="A",
            hooks=(hook,),
            dtype="float32",
            device="cpu",
            progress=False,
        ),
        store,
    )
    chunks = list(iter_chunks(store, "train", "A", hook))
    return torch.cat([c.acts[c.mask] for c in chunks]), torch.cat([c.ids[c.mask] for c in chunks])


def shuffled_batches(acts: torch.Tensor, batch: int, seed: int) -> Iterator[torch.Tensor]:
    """Endless epochs of ``acts`` rows in a seeded random order: sae-lens's DataProvider."""
    gen = torch.Generator().manual_seed(seed)
    while True:
        order = torch.randperm(len(acts), generator=gen)
        for i in range(0, len(order) - batch + 1, batch):
            yield acts[order[i : i + batch]]


def train_sae(acts: torch.Tensor, size: BuildSize, seed: int, out: Path) -> dict[str, Any]:
    """A TopK SAE trained with sae-lens's SAETrainer on ``acts``; saved for ``SAE.load_from_disk``."""
    from sae_lens import SAE
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(seed)
    hook = f"blocks.{size.sae_layer}.hook_resid_post"
    sae = TopKTrainingSAE(
        TopKTrainingSAEConfig(
            d_in=size.d_model,
            d_sae=size.d_sae,
            k=size.sae_k,
            normalize_activations="expected_average_only_in",
            metadata=SAEMetadata(
                model_name="xprobe-demo/model_a",
                hook_name=hook,
                context_size=size.ctx,
                prepend_bos=True,
            ),
        )
    )
    # Start b_dec at the mean (in the trainer's scaled units: sqrt(d_in) / mean norm), or the
    # residual's large constant component makes a few features fire always and the rest die.
    with torch.no_grad():
        sae.b_dec.copy_(acts.mean(0) * size.d_model**0.5 / acts.norm(dim=1).mean())
    trainer = SAETrainer(
        SAETrainerConfig(
            total_training_samples=size.sae_steps * size.sae_batch,
            train_batch_size_samples=size.sae_batch,
            lr=size.sae_lr,
            lr_end=size.sae_lr / 10,
            lr_warm_up_steps=size.sae_steps // 20,
            lr_decay_steps=size.sae_steps // 5,
            device="cpu",
            dead_feature_window=max(20, size.sae_steps // 10),
            feature_sampling_window=max(20, size.sae_steps // 5),
            n_batches_for_norm_estimate=min(50, len(acts) // size.sae_batch),
        ),
        sae,
        shuffled_batches(acts, size.sae_batch, seed),
    )
    trainer.fit().save_inference_model(out)
    sae = SAE.load_from_disk(out, device="cpu").eval()
    return sae_stats(sae, acts)


@torch.no_grad()
def sae_stats(sae: Any, acts: torch.Tensor) -> dict[str, Any]:
    """Per-feature firing frequency, L0 and variance explained of ``sae`` on ``acts``."""
    fired = torch.zeros(sae.cfg.d_sae, dtype=torch.int64)
    sq_err = total = 0.0
    mean = acts.mean(0)
    l0 = 0.0
    for x in acts.split(8192):
        f = sae.encode(x)
        fired += (f > 0).sum(0)
        l0 += float((f > 0).sum())
        sq_err += float((sae.decode(f) - x).pow(2).sum())
        total += float((x - mean).pow(2).sum())
    return {
        "frequency": (fired.double() / len(acts)).tolist(),
        "l0": l0 / len(acts),
        "variance_explained": 1 - sq_err / total,
        "dead": int((fired == 0).sum()),
        "n_tok": len(acts),
    }


# ---- the ablation -----------------------------------------------------------------------------


@torch.no_grad()
def linear_r2(x: torch.Tensor, sae: Any, acts: torch.Tensor) -> np.ndarray:
    """[n_feat]: in-sample R² of a linear readout (with intercept) from ``x`` [n, d] of each
    feature of ``sae.encode(acts)``; ``x`` may be ``acts`` itself or a transform of it."""
    n = len(x)
    mean = x.double().mean(0)
    xtx = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
    xty = torch.zeros(x.shape[1], sae.cfg.d_sae, dtype=torch.float64)
    sum_y = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
    sum_yy = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
    for start in range(0, n, 8192):
        xc = x[start : start + 8192].double() - mean
        y = sae.encode(acts[start : start + 8192]).double()
        xtx += xc.T @ xc
        xty += xc.T @ y
        sum_y += y.sum(0)
        sum_yy += (y * y).sum(0)
    sst = (sum_yy - sum_y**2 / n).clamp_min(1e-12)
    return ((xty * (torch.linalg.pinv(xtx, hermitian=True) @ xty)).sum(0) / sst).numpy()


@torch.no_grad()
def token_r2(sae: Any, acts: torch.Tensor, ids: torch.Tensor, vocab_size: int) -> np.ndarray:
    """[n_feat]: in-sample R² of the per-token-id mean of each feature of ``sae.encode(acts)``."""
    n = len(acts)
    per_token = torch.zeros(vocab_size, sae.cfg.d_sae, dtype=torch.float64)
    sum_y = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
    sum_yy = torch.zeros(sae.cfg.d_sae, dtype=torch.float64)
    for start in range(0, n, 8192):
        y = sae.encode(acts[start : start + 8192]).double()
        per_token.index_add_(0, ids[start : start + 8192].long(), y)
        sum_y += y.sum(0)
        sum_yy += (y * y).sum(0)
    sst = (sum_yy - sum_y**2 / n).clamp_min(1e-12)
    count = torch.bincount(ids.long(), minlength=vocab_size).double().clamp_min(1)
    return (((per_token**2 / count[:, None]).sum(0) - sum_y**2 / n) / sst).numpy()


def headroom(
    sae: Any, acts: torch.Tensor, ids: torch.Tensor, vocab_size: int, x: torch.Tensor | None = None
) -> np.ndarray:
    """[n_feat]: in-sample R² of a linear readout of each feature (of ``sae.encode(acts)``) from
    ``x`` (default ``acts``) minus that of the per-token-id mean (floored at 0), i.e. what the
    residual predicts beyond the current token."""
    token = np.maximum(token_r2(sae, acts, ids, vocab_size), 0)
    return linear_r2(acts if x is None else x, sae, acts) - token


@torch.no_grad()
def fit_eraser(
    sae: Any, acts: torch.Tensor, features: list[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The LEACE eraser ``(M, c)`` of ``features`` of ``sae.encode(acts)`` from ``acts``."""
    z = torch.cat([sae.encode(x)[:, features] for x in acts.split(8192)])
    return leace_eraser(acts, z)


def survival(
    sae: Any,
    acts: torch.Tensor,
    ids: torch.Tensor,
    vocab_size: int,
    eraser: tuple[torch.Tensor, torch.Tensor],
) -> np.ndarray:
    """[n_feat]: the share of each feature's headroom (in-sample R² beyond the current token) that
    is left after ``eraser``: <= 0 for the erased features, near 1 for features it leaves alone
    (NaN where there is no headroom to keep). What the presence score measures, in-sample."""
    m, c = eraser
    erased = (acts.double() @ m.T + c).float()
    before = headroom(sae, acts, ids, vocab_size)
    after = headroom(sae, acts, ids, vocab_size, erased)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(before > 1e-6, after / before, np.nan)


def ablation_band(frequency: np.ndarray, room: np.ndarray, size: BuildSize) -> np.ndarray:
    """Features in the firing-frequency band with headroom beyond the token (the only ones a
    presence score can judge)."""
    lo, hi = size.ablate_frequency
    return np.flatnonzero((frequency >= lo) & (frequency <= hi) & (room >= size.min_headroom))


def choose_ablated(band: np.ndarray, size: BuildSize, seed: int) -> list[int]:
    """``n_ablate`` features of ``band`` drawn at random."""
    if len(band) < 2 * size.n_ablate:
        raise RuntimeError(f"only {len(band)} SAE features in the frequency band with headroom")
    rng = np.random.default_rng(seed)
    return sorted(rng.choice(band, size.n_ablate, replace=False).tolist())


def match_kept(frequency: np.ndarray, candidates: np.ndarray, ablated: list[int]) -> list[int]:
    """For each ablated feature, the unchosen candidate nearest in log frequency."""
    pool = [int(f) for f in candidates if f not in set(ablated)]
    if len(pool) < len(ablated):
        raise RuntimeError(f"only {len(pool)} candidates for {len(ablated)} kept features")
    kept = []
    for f in ablated:
        best = min(pool, key=lambda g: abs(math.log(frequency[g]) - math.log(frequency[f])))
        kept.append(best)
        pool.remove(best)
    return sorted(kept)


def _round(v: float) -> float:
    return round(float(v), 4)


@torch.no_grad()
def held_out_share(
    reference: torch.nn.Module, model: torch.nn.Module, sae: Any, seqs: torch.Tensor, layer: int
) -> np.ndarray:
    """[n_feat]: on ``seqs`` (not trained on), the in-sample linear R² of each feature of ``sae``
    (encoded from the reference's residual) from ``model``'s residual, over that from the
    reference's own: how much of each feature ``model`` kept."""
    ref = torch.cat([block_output(reference, s, layer)[:, 1:] for s in seqs.split(32)]).flatten(
        0, 1
    )
    got = torch.cat([block_output(model, s, layer)[:, 1:] for s in seqs.split(32)]).flatten(0, 1)
    before = linear_r2(ref, sae, ref)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(before > 1e-6, linear_r2(got, sae, ref) / before, np.nan)


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
        band = ablation_band(frequency, headroom(sae, acts, ids, size.vocab_size), size)
        ablated_ids = choose_ablated(band, size, seed)
        eraser = fit_eraser(sae, acts, ablated_ids)
        share = survival(sae, acts, ids, size.vocab_size, eraser)
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
                    "survival_ablated": [_round(share[f]) for f in ablated_ids],
                    "survival_kept": [_round(share[f]) for f in kept_ids],
                    "survival_band_median": _round(np.nanmedian(share[band])),
                    "eraser_rank": int(
                        torch.linalg.matrix_rank(torch.eye(len(eraser[0])).double() - eraser[0])
                    ),
                    "projected": changed,
                    "max_relative_component_before": before,
                    "max_relative_component_after": leftover,
                    "erased_distance_first_last_tenth": [
                        _round(np.mean(distance[:tenth])),
                        _round(np.mean(distance[-tenth:])),
                    ],
                    "erased_held_out_r2_share_ablated": [
                        _round(held_share[f]) for f in ablated_ids
                    ],
                    "erased_held_out_r2_share_kept": [_round(held_share[f]) for f in kept_ids],
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

"""The demo's SAE: A's activations cached through xprobe's own tokenize and activations stages,
a sae-lens TopK SAE trained on them with sae-lens's ``SAETrainer``, and its statistics.

Used by ``pipeline/demo/build.py``.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from pipeline.demo.build import BuildSize


def cache_activations(
    work: Path, model_dir: Path, corpus: Path, size: BuildSize
) -> tuple[torch.Tensor, torch.Tensor]:
    """A's residual at the SAE's hook on ``sae_tokens`` tokens, through xprobe's own stages:
    tokenize and activations into a store, read back with ``iter_chunks``: ``(acts [n_tok,
    d_model], token ids [n_tok])`` of the counted positions."""
    from pipeline.store import Store
    from pipeline.store.reader import iter_chunks
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

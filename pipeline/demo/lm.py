"""The demo's small language models: packing text, training, evaluation, float16 saving, and the
projection that removes directions from a GPT-2's residual stream (the ablated model B), and the
LEACE concept eraser that the erased model B is trained to apply.

Used by ``pipeline/demo/build.py``; plain torch and transformers, nothing xprobe-specific.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch


def log(msg: str) -> None:
    print(f"[demo_build {time.strftime('%H:%M:%S')}] {msg}", flush=True)


# ---- data ------------------------------------------------------------------------------------


def pack_sequences(texts: list[str], tok: Any, ctx: int) -> torch.Tensor:
    """Documents packed like the tokenize stage does: ``[n_seq, ctx]`` int64, each sequence a BOS
    and then ``ctx - 1`` tokens of the document stream, documents separated by EOS."""
    stream: list[int] = []
    for ids in tok(texts, add_special_tokens=False)["input_ids"]:
        stream.extend(ids)
        stream.append(tok.eos_token_id)
    body = ctx - 1
    n_seq = len(stream) // body
    seqs = torch.tensor(stream[: n_seq * body], dtype=torch.int64).view(n_seq, body)
    return torch.cat([torch.full((n_seq, 1), tok.bos_token_id), seqs], dim=1)


def split_held_out(seqs: torch.Tensor, fraction: float = 0.05) -> tuple[torch.Tensor, torch.Tensor]:
    n_held = max(1, int(len(seqs) * fraction))
    return seqs[:-n_held], seqs[-n_held:]


# ---- language models --------------------------------------------------------------------------


def new_model(
    vocab_size: int, d_model: int, n_layer: int, n_head: int, ctx: int, seed: int
) -> torch.nn.Module:
    """A GPT-2 without dropout, initialised from ``seed``."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(
        vocab_size=vocab_size,
        n_positions=ctx,
        n_embd=d_model,
        n_layer=n_layer,
        n_head=n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=0,
        eos_token_id=0,
    )
    return GPT2LMHeadModel(cfg)


def train_lm(
    model: torch.nn.Module, seqs: torch.Tensor, steps: int, batch: int, lr: float, seed: int
) -> list[float]:
    """AdamW with warmup and cosine decay on random batches of ``seqs``; returns the losses."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, steps // 20)

    def schedule(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.1 + 0.45 * (1 + math.cos(math.pi * (step - warmup) / max(1, steps - warmup)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, schedule)
    model.train()
    losses = []
    for step in range(steps):
        x = seqs[torch.randint(len(seqs), (batch,), generator=gen)]
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        sched.step()
        losses.append(loss.item())
        if (step + 1) % max(1, steps // 8) == 0 or step + 1 == steps:
            log(f"  step {step + 1}/{steps}  loss {np.mean(losses[-20:]):.3f}")
    model.eval()
    return losses


@torch.no_grad()
def eval_loss(model: torch.nn.Module, seqs: torch.Tensor, batch: int = 32) -> float:
    model.eval()
    total = [model(input_ids=x, labels=x).loss.item() for x in seqs.split(batch)]
    return float(np.mean(total))


def round_fp16(model: torch.nn.Module) -> torch.nn.Module:
    """Round the weights to float16 and back, so the model used is exactly the model saved."""
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.half().float())
    return model


def save_model(model: torch.nn.Module, tok: Any, out: Path) -> None:
    model.to(torch.float16).save_pretrained(out)
    model.float()
    tok.save_pretrained(out)


# ---- ablation -------------------------------------------------------------------------------


@torch.no_grad()
def project_out(model: torch.nn.Module, directions: torch.Tensor, up_to_layer: int) -> list[str]:
    """Remove span(``directions`` [n, d_model]) from every write to the residual stream of a
    GPT-2 up to block ``up_to_layer``: token and position embeddings, and the attention and MLP
    output projections (weights and biases). Returns the parameters changed."""
    basis, _ = torch.linalg.qr(directions.double().T)  # [d_model, n], orthonormal columns
    proj = torch.eye(basis.shape[0], dtype=torch.float64) - basis @ basis.T
    changed = []

    def apply(name: str, param: torch.Tensor) -> None:
        # Every one of these maps into the residual along its last axis (Conv1D: x @ W + b).
        param.copy_((param.double() @ proj).to(param.dtype))
        changed.append(name)

    tr = model.transformer
    apply("transformer.wte.weight", tr.wte.weight)
    apply("transformer.wpe.weight", tr.wpe.weight)
    for layer in range(up_to_layer + 1):
        block = tr.h[layer]
        for part in ("attn.c_proj", "mlp.c_proj"):
            module = block.get_submodule(part)
            apply(f"transformer.h.{layer}.{part}.weight", module.weight)
            apply(f"transformer.h.{layer}.{part}.bias", module.bias)
    return changed


@torch.no_grad()
def residual_along(model: torch.nn.Module, seqs: torch.Tensor, layer: int, basis: torch.Tensor):
    """Largest |component| of ``model``'s blocks.<layer>.hook_resid_post along ``basis`` columns,
    relative to the residual's norm (0: the directions are gone)."""
    hidden = block_output(model, seqs, layer).double()
    along = (hidden @ basis).abs().amax(-1)
    return float((along / hidden.norm(dim=-1)).max())


def block_output(model: torch.nn.Module, ids: torch.Tensor, layer: int) -> torch.Tensor:
    """blocks.<layer>.hook_resid_post of a GPT-2 (the block's output, before any final norm)."""
    out = {}

    def hook(module, args, output):
        out["x"] = output[0] if isinstance(output, tuple) else output

    handle = model.transformer.h[layer].register_forward_hook(hook)
    try:
        model(input_ids=ids)
    finally:
        handle.remove()
    return out["x"]


# ---- linear concept erasure ---------------------------------------------------------------------


def leace_eraser(x: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The LEACE eraser (Belrose et al. 2023, "LEACE: Perfect linear concept erasure in closed
    form") of ``z`` [n, k] from ``x`` [n, d]: the affine map ``x -> x @ M.T + c`` that changes
    ``x`` least (in the Mahalanobis sense) while making its covariance with ``z`` exactly zero, so
    no linear readout of ``x`` predicts ``z`` better than a constant. Returns ``(M [d, d], c
    [d])``, float64. ``M = I - P`` with ``P`` an oblique projection of rank <= k."""
    x, z = x.double(), z.double()
    mean = x.mean(0)
    xc, zc = x - mean, z - z.mean(0)
    sxx = xc.T @ xc / len(x)
    sxz = xc.T @ zc / len(x)
    evals, evecs = torch.linalg.eigh(sxx)
    keep = evals > evals.max() * 1e-10  # whiten on the covariance's support only
    v, e = evecs[:, keep], evals[keep]
    whiten = v @ torch.diag(e.rsqrt()) @ v.T
    unwhiten = v @ torch.diag(e.sqrt()) @ v.T
    u, s, _ = torch.linalg.svd(whiten @ sxz, full_matrices=False)
    u = u[:, s > s.max() * 1e-8] if len(s) and s.max() > 0 else u[:, :0]
    proj = unwhiten @ u @ u.T @ whiten
    eye = torch.eye(len(mean), dtype=torch.float64)
    return eye - proj, proj @ mean


def distill_erased(
    model: torch.nn.Module,
    reference: torch.nn.Module,
    eraser: tuple[torch.Tensor, torch.Tensor],
    seqs: torch.Tensor,
    layer: int,
    steps: int,
    batch: int,
    lr: float,
    seed: int,
) -> list[float]:
    """Train the embeddings and blocks <= ``layer`` of ``model`` (a copy of ``reference``) until
    its blocks.<layer> residual is the reference's with ``eraser`` ``(M, c)`` applied:
    ``resid @ M.T + c``. A GPT-2 block reads its input through a LayerNorm, so an affine map of
    the residual can't be written into the weights exactly: mapping every write to the stream
    instead makes every block up to the layer read the erased stream too, which (measured on the
    demo's A) wrecks the model (held-out loss 4.8 -> 29) and most other features. So the model
    learns it. Loss: mean squared distance
    to the erased residual relative to its mean squared norm. Returns the loss per step."""
    m, c = (t.float() for t in eraser)
    trained = ["transformer.wte.", "transformer.wpe."]
    trained += [f"transformer.h.{i}." for i in range(layer + 1)]
    params = []
    for name, p in model.named_parameters():
        p.requires_grad_(any(name.startswith(t) for t in trained))
        if p.requires_grad:
            params.append(p)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(params, lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1 - 0.9 * s / max(1, steps))
    reference.eval()
    model.train()
    history = []
    for step in range(steps):
        ids = seqs[torch.randint(len(seqs), (batch,), generator=gen)]
        with torch.no_grad():
            target = block_output(reference, ids, layer) @ m.T + c
            scale = target.pow(2).sum(-1).mean()
        loss = (block_output(model, ids, layer) - target).pow(2).sum(-1).mean() / scale
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        history.append(loss.item())
        if (step + 1) % max(1, steps // 6) == 0 or step + 1 == steps:
            log(f"  step {step + 1}/{steps}  relative distance {np.mean(history[-20:]):.4f}")
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    return history

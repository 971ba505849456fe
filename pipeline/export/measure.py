"""Measure SAEs on B's held-out tokens like any SAE: reconstruction and next-token loss spliced in.

On the fit's held-out sequences (at most ``max_tokens`` counted tokens, whole chunks in order),
for each SAE (the export, and A's SAE applied directly to B where d_model matches):

- ``explained_variance = 1 − Σ‖x − sae(x)‖² / Σ‖x − x̄‖²`` over counted tokens of B's stored
  activations at the hook (x̄: their mean), and ``l0``: mean number of active features;
- next-token loss of B with ``sae(x)`` spliced in at the hook on counted positions (others left
  clean): ``ce`` (nats per token), ``kl`` = KL(B clean ‖ B spliced), both over positions t whose
  next token t+1 also counts; beside B clean (``ce_clean``) and B with the hook mean-ablated
  (``ce_mean_ablated``: every counted position replaced by x̄), and
  ``ce_recovered = (ce_mean_ablated − ce) / (ce_mean_ablated − ce_clean)``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from typing import Any

import torch

from pipeline.errors import XprobeError
from pipeline.export.sae import FitSource
from pipeline.inputs.model import find_blocks

_HOOK = re.compile(r"^blocks\.(\d+)\.hook_resid_(post|pre)$")


@dataclass
class SaeFigures:
    """One SAE's figures on B's held-out tokens."""

    explained_variance: float
    l0: float
    ce: float
    kl: float
    ce_recovered: float


@dataclass
class Measurement:
    n_tok: int  # counted held-out tokens (reconstruction)
    n_next: int  # positions scored for next-token loss
    ce_clean: float
    ce_mean_ablated: float
    saes: dict[str, SaeFigures]

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def load_model(name: str, revision: str | None, device: str) -> Any:
    """An HF causal LM in float32, eval mode, on ``device``."""
    from transformers import AutoModelForCausalLM

    try:
        model = AutoModelForCausalLM.from_pretrained(name, revision=revision, dtype=torch.float32)
    except (OSError, ValueError) as e:
        raise XprobeError(f"cannot load model {name!r}: {e}") from None
    return model.to(device).eval()


@contextmanager
def splice(
    model: Any, hook: str, replace: Callable[[torch.Tensor], torch.Tensor] | None
) -> Iterator[None]:
    """Within the block, the residual stream at ``hook`` [batch, ctx, d] is ``replace(x)``
    (``None``: untouched). ``resid_post``: the block's output; ``resid_pre``: its input."""
    match = _HOOK.match(hook)
    if match is None:
        raise XprobeError(f"hook {hook!r} is not a residual stream hook (blocks.<L>.hook_resid_*)")
    if replace is None:
        yield
        return
    layer, kind = int(match.group(1)), match.group(2)
    block = find_blocks(model, int(model.config.get_text_config().num_hidden_layers))[layer]

    def post(module, args, output):
        if isinstance(output, tuple):
            return (replace(output[0]), *output[1:])
        return replace(output)

    def pre(module, args, kwargs):
        if args:
            return (replace(args[0]), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": replace(kwargs["hidden_states"])}

    handle = (
        block.register_forward_hook(post)
        if kind == "post"
        else block.register_forward_pre_hook(pre, with_kwargs=True)
    )
    try:
        yield
    finally:
        handle.remove()


def measure(
    source: FitSource,
    saes: dict[str, Any],
    max_tokens: int = 20_000,
    device: str = "cpu",
    batch_seqs: int = 16,
) -> Measurement:
    """Reconstruction and spliced next-token figures of each SAE in ``saes`` on B (see module)."""
    info = source.store.info(source.acts_b)
    model = load_model(info["model"], info.get("revision"), device)
    chunks = list(source.sequences(held_out=True, max_tokens=max_tokens))
    if not chunks:
        raise XprobeError(f"fit {source.fit!r} has no held-out sequences to measure on")
    counted = torch.cat([x[m] for _, m, x in chunks]).to(torch.float64)
    mean = counted.mean(0)
    spread = float(((counted - mean) ** 2).sum())
    sse = dict.fromkeys(saes, 0.0)
    active = dict.fromkeys(saes, 0.0)
    names = ["clean", "mean", *saes]
    ce = dict.fromkeys(names, 0.0)
    kl = dict.fromkeys(names, 0.0)
    n_next = 0
    mean32 = mean.to(device, torch.float32)
    for ids, mask, x in chunks:
        for start in range(0, len(ids), batch_seqs):
            b_ids = ids[start : start + batch_seqs].to(device)
            b_mask = mask[start : start + batch_seqs].to(device)
            with torch.no_grad():
                for name, sae in saes.items():
                    xs = x[start : start + batch_seqs][b_mask.cpu()].to(device)
                    feats = sae.encode(xs)
                    sse[name] += float(((xs - sae.decode(feats)).double() ** 2).sum())
                    active[name] += float((feats != 0).sum())
                scored = b_mask[:, :-1] & b_mask[:, 1:]  # position t predicts t+1; both count
                targets = b_ids[:, 1:][scored]
                clean = _log_probs(model, source.hook, b_ids, None)[:, :-1][scored]
                n_next += len(targets)
                ce["clean"] += float(-clean.gather(1, targets[:, None]).sum())
                replacements = {"mean": lambda h: mean32.expand_as(h)}
                replacements |= {name: sae for name, sae in saes.items()}
                for name, fn in replacements.items():
                    replace = _on_counted(fn, b_mask)
                    spliced = _log_probs(model, source.hook, b_ids, replace)[:, :-1][scored]
                    ce[name] += float(-spliced.gather(1, targets[:, None]).sum())
                    kl[name] += float((clean.exp() * (clean - spliced)).sum())
    n_tok = len(counted)
    n = max(n_next, 1)
    ce_clean, ce_mean = ce["clean"] / n, ce["mean"] / n
    gap = ce_mean - ce_clean
    figures = {
        name: SaeFigures(
            explained_variance=1 - sse[name] / spread if spread > 0 else float("nan"),
            l0=active[name] / n_tok,
            ce=ce[name] / n,
            kl=kl[name] / n,
            ce_recovered=(ce_mean - ce[name] / n) / gap if gap != 0 else float("nan"),
        )
        for name in saes
    }
    return Measurement(n_tok, n_next, ce_clean, ce_mean, figures)


def _on_counted(
    fn: Callable[[torch.Tensor], torch.Tensor], mask: torch.Tensor
) -> Callable[[torch.Tensor], torch.Tensor]:
    """``fn`` applied at the counted positions (``mask [batch, ctx]``) only."""
    return lambda h: torch.where(mask[..., None], fn(h), h)


def _log_probs(
    model: Any,
    hook: str,
    ids: torch.Tensor,
    replace: Callable[[torch.Tensor], torch.Tensor] | None,
) -> torch.Tensor:
    """Next-token log-probabilities [batch, ctx, vocab] of ``model`` on ``ids``, spliced."""
    with splice(model, hook, replace):
        logits = model(input_ids=ids, use_cache=False).logits
    return torch.log_softmax(logits.to(torch.float64), dim=-1)


def format_measurement(m: Measurement, labels: dict[str, str]) -> str:
    """The figures as a small table, one row per SAE."""
    lines = [
        f"B's held-out tokens: {m.n_tok} (next-token loss on {m.n_next}); "
        f"CE clean {m.ce_clean:.4f}, hook mean-ablated {m.ce_mean_ablated:.4f} nats/token",
        f"  {'SAE':<34} {'expl. var':>9} {'L0':>7} {'CE':>8} {'KL':>8} {'CE recovered':>12}",
    ]
    for name, f in m.saes.items():
        lines.append(
            f"  {labels.get(name, name):<34} {f.explained_variance:>9.3f} {f.l0:>7.1f} "
            f"{f.ce:>8.4f} {f.kl:>8.4f} {f.ce_recovered:>12.3f}"
        )
    return "\n".join(lines)

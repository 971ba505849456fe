"""Build the README's worked example offline: a corpus, a tokenizer, three tiny models and an SAE.

    python examples/build_example.py          # writes examples/work/
    xprobe run examples/xprobe.toml           # runs the whole pipeline on it

A: a random-weight 2-layer GPT-2 (d_model 64). B: A with 10% relative noise on every weight
(a stand-in for a finetune). random: an independently initialised model (the floor). The SAE is
a sae-lens StandardSAE on A's blocks.1.hook_resid_post with random weights. Nothing here is
trained, so the numbers show the method's mechanics, not findings about real models.
"""

from __future__ import annotations

from pathlib import Path

import torch
from sae_lens import StandardSAE, StandardSAEConfig
from sae_lens.saes.sae import SAEMetadata
from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

from pipeline.demo.corpus import stdlib_corpus, train_bpe

ROOT = Path(__file__).parent / "work"


def main() -> None:
    corpus = stdlib_corpus(ROOT / "stdlib.jsonl", 1_000_000)
    tok = AutoTokenizer.from_pretrained(train_bpe(corpus, ROOT / "tok", vocab_size=2048))
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tok), n_layer=2, n_embd=64, n_head=4, n_positions=256)
    a = GPT2LMHeadModel(cfg).eval()
    b = GPT2LMHeadModel(cfg).eval()
    b.load_state_dict(a.state_dict())
    with torch.no_grad():
        for p in b.parameters():
            p.add_(0.002 * torch.randn_like(p))
    torch.manual_seed(1)
    random = GPT2LMHeadModel(cfg).eval()
    for name, model in (("model_a", a), ("model_b", b), ("model_random", random)):
        model.save_pretrained(ROOT / name)
        tok.save_pretrained(ROOT / name)
    torch.manual_seed(0)
    sae = StandardSAE(
        StandardSAEConfig(
            d_in=64, d_sae=512, metadata=SAEMetadata(hook_name="blocks.1.hook_resid_post")
        )
    )
    with torch.no_grad():
        sae.W_enc.copy_(4.0 * torch.randn(64, 512))
        sae.W_dec.copy_(torch.randn(512, 64) / (4.0 * 512))
        sae.b_enc.fill_(-2.5)
        sae.b_dec.copy_(0.01 * torch.randn(64))
    sae.save_model(str(ROOT / "sae_a"))
    print(f"wrote {ROOT}")


if __name__ == "__main__":
    main()

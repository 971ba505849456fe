"""What every benchmark section shares: offline material, memory peaks, device timing."""

from __future__ import annotations

import os
import resource
import time
from pathlib import Path
from typing import Any

import torch

from pipeline.demo.corpus import stdlib_corpus, train_bpe


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, MiB (Linux reports KiB)."""
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def peak_gpu_mib() -> float | None:
    """Peak CUDA memory allocated by torch in this process, MiB; None without CUDA."""
    if not torch.cuda.is_available():
        return None
    return round(torch.cuda.max_memory_allocated() / 2**20, 1)


def device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def sync() -> None:
    """Wait for queued GPU work, so wall-clock timings cover it."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class Timer:
    """``with Timer() as t: ...`` then ``t.s``: wall seconds, GPU work included."""

    def __enter__(self) -> Timer:
        sync()
        self.start = time.perf_counter()
        return self

    def __exit__(self, *exc: Any) -> None:
        sync()
        self.s = time.perf_counter() - self.start


def dir_bytes(path: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(dirpath, f)) for f in files)
    return total


def corpus_and_tokenizer(work: Path, corpus_bytes: int, vocab_size: int) -> tuple[Path, Path]:
    """A jsonl corpus of at least ``corpus_bytes`` characters and a BPE tokenizer, offline.

    The text is the stdlib's top-level sources (a few MB); a larger request repeats them
    (throughput does not care, and the GPU size needs 10M tokens).
    """
    corpus = stdlib_corpus(work / "stdlib.jsonl", corpus_bytes)
    tok_dir = train_bpe(corpus, work / "tok", vocab_size=vocab_size)
    lines = corpus.read_text().splitlines(keepends=True)
    size = sum(len(line) for line in lines)
    if size >= corpus_bytes or not lines:
        return corpus, tok_dir
    repeated = work / "stdlib-repeated.jsonl"
    with repeated.open("w") as f:
        for _ in range(-(-corpus_bytes // size)):
            f.writelines(lines)
    return repeated, tok_dir


def build_model(shape: dict[str, Any], tok_dir: Path, out: Path, dtype: torch.dtype) -> Path:
    """A causal LM with random weights (seeded) and the given shape, saved with its tokenizer.

    ``shape["family"]``: ``gpt2`` (n_layer, d_model, n_head) or ``gemma2`` (gemma-2-2b's
    widths: d_model, n_layer, intermediate, heads, kv heads, head_dim).
    """
    from transformers import (
        AutoTokenizer,
        Gemma2Config,
        Gemma2ForCausalLM,
        GPT2Config,
        GPT2LMHeadModel,
    )

    tok = AutoTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(0)
    common = {
        "vocab_size": len(tok),
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": tok.eos_token_id,
    }
    if shape["family"] == "gpt2":
        config = GPT2Config(
            n_layer=shape["n_layer"],
            n_embd=shape["d_model"],
            n_head=shape["n_head"],
            n_positions=shape["ctx"],
            **common,
        )
        model = GPT2LMHeadModel(config)
    elif shape["family"] == "gemma2":
        config = Gemma2Config(
            hidden_size=shape["d_model"],
            num_hidden_layers=shape["n_layer"],
            intermediate_size=shape["intermediate"],
            num_attention_heads=shape["n_head"],
            num_key_value_heads=shape["n_kv_head"],
            head_dim=shape["head_dim"],
            max_position_embeddings=max(shape["ctx"], 8192),
            pad_token_id=tok.pad_token_id or 0,
            **common,
        )
        model = Gemma2ForCausalLM(config)
    else:
        raise ValueError(f"unknown model family {shape['family']!r}")
    model.to(dtype).eval().save_pretrained(out)
    tok.save_pretrained(out)
    return out

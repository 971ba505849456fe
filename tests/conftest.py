"""Session fixtures: a BPE tokenizer trained on a few KB, tiny GPT-2 and Llama models saved to disk.

Everything is built locally from a seeded generator: no network, same bytes every run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

# MKL/OpenMP may use fewer threads when the machine is busy, which changes float sums in the last
# bit; runs compared bit for bit (kill and resume, segmented vs whole) need the same count
os.environ.setdefault("MKL_DYNAMIC", "FALSE")
os.environ.setdefault("OMP_DYNAMIC", "FALSE")
# ... and with a fixed count, pytest-xdist workers must not oversubscribe the cores: two workers
# of two threads each on two cores spin-wait on each other in every small parallel op (index_add_
# of a [128, 96] block took 13 ms instead of 10 us; test_fit and test_chat took 3x the CPU). Each
# worker gets its share of the cores (OMP_NUM_THREADS, if set, wins). Set before torch is
# imported (tests.helpers imports it), and inherited by the subprocesses tests start.
_N_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _N_WORKERS > 1:
    _cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    _threads = str(max(1, (_cores or 1) // _N_WORKERS))
    os.environ.setdefault("OMP_NUM_THREADS", _threads)
    os.environ.setdefault("MKL_NUM_THREADS", os.environ["OMP_NUM_THREADS"])

from tests.helpers import make_documents  # noqa: E402 (imports torch: after the thread counts)

if "OMP_NUM_THREADS" in os.environ:  # torch imported earlier (a plugin) would not have read it:
    import torch  # noqa: E402  (this process must sum on the count its subprocesses inherit)

    if torch.get_num_threads() != int(os.environ["OMP_NUM_THREADS"]):
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))


@pytest.fixture(scope="session")
def documents() -> list[str]:
    return make_documents(400)


@pytest.fixture(scope="session")
def corpus_jsonl(tmp_path_factory, documents) -> Path:
    path = tmp_path_factory.mktemp("corpus") / "docs.jsonl"
    path.write_text(
        "".join(json.dumps({"text": d, "id": i}) + "\n" for i, d in enumerate(documents))
    )
    return path


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, documents) -> Path:
    """A byte-level BPE tokenizer (~600 tokens) trained on the documents, saved as an HF tokenizer."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(documents, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>"
    )
    out = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def other_tokenizer_dir(tmp_path_factory, documents) -> Path:
    """A different tokenizer (smaller vocabulary) for mismatch tests."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(documents[::-1], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>"
    )
    out = tmp_path_factory.mktemp("tokenizer_other")
    fast.save_pretrained(out)
    return out


def _save_model(model, tokenizer_dir: Path, out: Path) -> Path:
    from transformers import AutoTokenizer

    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A 2-layer GPT-2 with d_model=64 and random weights, with the test tokenizer."""
    import torch
    from transformers import AutoTokenizer, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    cfg = GPT2Config(
        vocab_size=vocab,
        n_layer=2,
        n_embd=64,
        n_head=4,
        n_positions=128,
        bos_token_id=0,
        eos_token_id=0,
    )
    return _save_model(GPT2LMHeadModel(cfg).eval(), tokenizer_dir, tmp_path_factory.mktemp("gpt2"))


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory, tokenizer_dir) -> Path:
    """A 2-layer Llama with d_model=64 and random weights, with the test tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(1)
    vocab = len(AutoTokenizer.from_pretrained(tokenizer_dir))
    cfg = LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=0,
        eos_token_id=0,
    )
    return _save_model(
        LlamaForCausalLM(cfg).eval(), tokenizer_dir, tmp_path_factory.mktemp("llama")
    )

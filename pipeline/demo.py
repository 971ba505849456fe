"""``xprobe demo``: an offline run on material every machine has.

The corpus is the Python standard library found on this machine (its sources, one document per
module); the tokenizer is a byte-level BPE trained on it with ``tokenizers``. Nothing is
downloaded. The demo grows with the pipeline: today it runs every stage that exists and shows
what the store holds.
"""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

from pipeline.store import Store


def stdlib_corpus(out: Path, max_bytes: int) -> Path:
    """Write the stdlib's top-level ``*.py`` sources (sorted, up to ``max_bytes``) as jsonl."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    total = 0
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        for path in sorted(lib.glob("*.py")):
            text = path.read_text(errors="replace")
            f.write(json.dumps({"text": text}) + "\n")
            total += len(text)
            if total >= max_bytes:
                break
    return out


def train_bpe(corpus: Path, out: Path, vocab_size: int = 4096) -> Path:
    """A byte-level BPE tokenizer trained on a jsonl corpus, saved as an HF tokenizer folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [json.loads(line)["text"] for line in corpus.open()]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>"
    )
    fast.save_pretrained(out)
    return out


def run_demo(root: Path, max_bytes: int = 2_000_000) -> Store:
    from stages.tokenize import TokenizeConfig, run

    root.mkdir(parents=True, exist_ok=True)
    corpus = root / "corpus" / "stdlib.jsonl"
    if not corpus.exists():
        stdlib_corpus(corpus, max_bytes)
    tok_dir = root / "tokenizer"
    if not (tok_dir / "tokenizer.json").exists():
        train_bpe(corpus, tok_dir)
    store = Store(root / "store")
    run(
        TokenizeConfig(
            corpus="stdlib", source=(str(corpus),), tokenizer=str(tok_dir), ctx=256, chunk_seqs=64
        ),
        store,
    )
    return store

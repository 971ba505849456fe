"""Tokenize stage benchmark: stage tokens/s vs the bare tokenizer call on the same documents."""

from __future__ import annotations

import json
import time
from pathlib import Path

from pipeline.bench.common import corpus_and_tokenizer


def bench_tokenize(work: Path, p: dict) -> dict:
    """Tokenize stage tokens/s vs the bare tokenizer call on the same documents."""
    from transformers import AutoTokenizer

    from pipeline.store import Store
    from stages.tokenize import TokenizeConfig, run

    corpus, tok_dir = corpus_and_tokenizer(work, p["corpus_bytes"], vocab_size=8192)
    texts = [json.loads(line)["text"] for line in corpus.open()]
    tok = AutoTokenizer.from_pretrained(tok_dir)
    t0 = time.perf_counter()
    n_bare = sum(
        len(ids)
        for i in range(0, len(texts), 512)
        for ids in tok(texts[i : i + 512], add_special_tokens=False)["input_ids"]
    )
    bare_s = time.perf_counter() - t0
    store = Store(work / "store")
    cfg = TokenizeConfig(
        corpus="stdlib",
        source=(str(corpus),),
        tokenizer=str(tok_dir),
        ctx=1024,
        chunk_seqs=64,
        progress=False,
    )
    t0 = time.perf_counter()
    run(cfg, store)
    stage_s = time.perf_counter() - t0
    n_tok = store.info("tokens/stdlib")["n_tok"]
    return {
        "corpus_bytes": sum(len(t) for t in texts),
        "tokens": n_tok,
        "stage_tokens_per_s": round(n_tok / stage_s),
        "bare_tokenizer_tokens_per_s": round(n_bare / bare_s),
        "ratio_stage_vs_bare_tokenizer": round((n_tok / stage_s) / (n_bare / bare_s), 3),
        "bytes_per_token_stored": round(store.nbytes_stored("tokens/stdlib") / n_tok, 3),
    }

"""`make bench`: every stage against its limit, measured in one run; prints one JSON document.

Sizes: ``--size cpu`` (default, minutes on a laptop). Each figure is a ratio of two throughputs
taken in this run on this machine, so it means the same thing anywhere.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from pipeline.demo import stdlib_corpus, train_bpe  # noqa: E402


def bench_tokenize(work: Path, max_bytes: int) -> dict:
    """Tokenize stage tokens/s vs the bare tokenizer call on the same documents."""
    from transformers import AutoTokenizer

    from pipeline.store import Store
    from stages.tokenize import TokenizeConfig, run

    corpus = stdlib_corpus(work / "stdlib.jsonl", max_bytes)
    tok_dir = train_bpe(corpus, work / "tok", vocab_size=8192)
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", choices=["cpu"], default="cpu")
    parser.add_argument("--out", default="bench-results/bench.json")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        results = {
            "size": args.size,
            "python": sys.version.split()[0],
            "tokenize": bench_tokenize(Path(tmp), 20_000_000),
        }
    text = json.dumps(results, indent=2)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()

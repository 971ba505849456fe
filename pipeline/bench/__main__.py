"""`make bench`: every stage against its limit and against today's tools, in one run; one JSON.

    python -m pipeline.bench [--size cpu|gpu] [--smoke] [--only SECTION ...] [--out FILE]

Each section (tokenize, activations, features, fit, segments, real) runs in its own subprocess,
so its peak RAM (``ru_maxrss``) and peak GPU memory are its own. Every throughput figure comes with the
limit it is compared against, measured in the same process on the same data, so the ratios
mean the same thing on any machine.

Sizes: ``cpu`` (default; a few minutes on 2 cores) and ``gpu`` (a gemma-2-2b-shaped model
with random weights, d_model 2304, 10M tokens; SAEs 16,384 and 131,072 wide; a fitter-only
case at 1,048,576 features). ``real`` runs on a real GGUF checkpoint (``bench_real.py``;
skipped without one: ``make real-example`` extracts SmolLM2-135M). ``--smoke`` shrinks a size to
seconds to check the code paths (the test suite runs it); its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SECTIONS = ("tokenize", "activations", "features", "fit", "segments", "real")

GEMMA2_2B = {
    "family": "gemma2",
    "d_model": 2304,
    "n_layer": 26,
    "intermediate": 9216,
    "n_head": 8,
    "n_kv_head": 4,
    "head_dim": 256,
}

SIZES: dict[str, dict[str, dict]] = {
    "cpu": {
        "tokenize": {"corpus_bytes": 20_000_000},
        "activations": {
            "shape": {"family": "gpt2", "n_layer": 4, "d_model": 256, "n_head": 4},
            "layer": 1,
            "ctx": 128,
            "n_seq": 3072,  # 393k tokens: the model load is a small part of the stage's time
            "saelens_n_seq": 3072,
            "batch_seqs": 32,
            "chunk_seqs": 64,
            "dtype": "float32",
            "corpus_bytes": 3_000_000,
        },
        "features": {
            "d_model": 256,
            "widths": [4096],
            "n_tok": 200_000,
            "l0": 45,
            "batch_tokens": 4096,
        },
        "fit": {
            "n_tok": 200_000,
            "buffer_rows": 200_000,
            "d": 256,
            "n_feat": 4096,
            "per_tok": 40,
            "chunk": 8192,
            "alpha": 10.0,
            "sklearn_rows": 200_000,
            "sklearn_feat": 256,
            "wide_feat": None,
        },
        "segments": {
            "shape": {"family": "gpt2", "n_layer": 4, "d_model": 256, "n_head": 4},
            "layer": 1,
            "ctx": 128,
            "chunk_seqs": 16,
            "batch_seqs": 16,
            "n_tok": 131_072,  # 64 chunks: the dense activations outweigh the fits' statistics
            "widths": [512, 1024, 2048],  # three fits of one B (as Gemma Scope's 16k/65k/1M)
            "dtype": "float32",
            "corpus_bytes": 1_000_000,
        },
        "real": {  # a GGUF checkpoint (bench_real.py): SmolLM2-135M, d_model 576, 30 layers
            "gguf": None,
            "layer": 14,
            "ctx": 128,
            "n_seq": 64,
            "batch_seqs": 16,
            "d_sae": 2304,
            "k": 32,
        },
    },
    "gpu": {
        "tokenize": {"corpus_bytes": 20_000_000},
        "activations": {
            "shape": GEMMA2_2B,
            "layer": 12,
            "ctx": 1024,
            "n_seq": 9800,  # 10.0M tokens
            "saelens_n_seq": 1000,  # its float32 cache of 10M tokens would not fit the disk
            "batch_seqs": 16,
            "chunk_seqs": 64,
            "dtype": "bfloat16",
            "corpus_bytes": 60_000_000,
        },
        "features": {
            "d_model": 2304,
            "widths": [16384, 131072],
            "n_tok": 4_000_000,
            "l0": 80,
            "batch_tokens": 8192,
        },
        "fit": {
            "n_tok": 10_000_000,
            "buffer_rows": 2_000_000,
            "d": 2304,
            "n_feat": 16384,
            "per_tok": 64,
            "chunk": 65536,
            "alpha": 10.0,
            "sklearn_rows": 200_000,
            "sklearn_feat": 256,
            "wide_feat": 1_048_576,
            "wide_tokens": 524_288,
            "feature_block": 16384,
        },
        "segments": {
            "shape": GEMMA2_2B,
            "layer": 12,
            "ctx": 1024,
            "chunk_seqs": 64,
            "batch_seqs": 16,
            "n_tok": 1_048_576,  # 16 chunks
            "widths": [16384, 65536],
            "dtype": "bfloat16",
            "corpus_bytes": 8_000_000,
        },
        "real": {
            "gguf": None,
            "layer": 14,
            "ctx": 1024,
            "n_seq": 2048,
            "batch_seqs": 32,
            "d_sae": 16384,
            "k": 64,
        },
    },
}


def smoke(params: dict[str, dict]) -> dict[str, dict]:
    """The same code paths at toy sizes (seconds on a laptop)."""
    p = json.loads(json.dumps(params))
    p["tokenize"]["corpus_bytes"] = 300_000
    a = p["activations"]
    tiny = {"n_layer": 2, "d_model": 64, "n_head": 4}
    if a["shape"]["family"] == "gemma2":
        tiny.update(intermediate=128, n_kv_head=2, head_dim=16)
    a["shape"] = {"family": a["shape"]["family"], **tiny}
    a.update(
        layer=0,
        ctx=64,
        n_seq=48,
        saelens_n_seq=48,
        batch_seqs=8,
        chunk_seqs=16,
        corpus_bytes=300_000,
    )
    p["features"].update(d_model=64, widths=[512], n_tok=8192, l0=20, batch_tokens=1024)
    p["fit"].update(
        n_tok=20_000,
        buffer_rows=12_000,
        d=32,
        n_feat=512,
        per_tok=8,
        chunk=4096,
        sklearn_rows=8000,
        sklearn_feat=64,
    )
    s = p["segments"]
    s["shape"] = {"family": s["shape"]["family"], **tiny}
    s.update(layer=0, ctx=32, chunk_seqs=4, batch_seqs=4, n_tok=2048, widths=[128, 256])
    s.update(corpus_bytes=200_000)
    p["real"].update(n_seq=4, ctx=32, batch_seqs=4, d_sae=256, k=8)
    if p["fit"].get("wide_feat"):
        p["fit"].update(wide_feat=4096, wide_tokens=8192, feature_block=1024)
    return p


def run_section(name: str, params: dict, work: Path) -> dict:
    """One section in this process; adds its peak memory."""
    from pipeline.bench.common import peak_gpu_mib, peak_rss_mib

    if name == "tokenize":
        from pipeline.bench.bench_tokenize import bench_tokenize as bench
    elif name == "activations":
        from pipeline.bench.bench_activations import bench_activations as bench
    elif name == "features":
        from pipeline.bench.bench_features import bench_features as bench
    elif name == "segments":
        from pipeline.bench.bench_segments import bench_segments as bench
    elif name == "real":
        from pipeline.bench.bench_real import bench_real as bench
    else:
        from pipeline.bench.bench_fit import bench_fit as bench
    result = bench(work, params)
    result.setdefault("peak_rss_MiB", peak_rss_mib())
    result.setdefault("peak_gpu_MiB", peak_gpu_mib())
    return result


def _finite(value):
    return value if not isinstance(value, float) or math.isfinite(value) else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="cpu")
    parser.add_argument("--smoke", action="store_true", help="toy sizes: checks code paths only")
    parser.add_argument("--only", nargs="*", choices=SECTIONS, help="sections to run")
    parser.add_argument("--out", help="JSON file (default bench-results/bench-<size>.json)")
    parser.add_argument("--section", help=argparse.SUPPRESS)  # internal: run one in-process
    args = parser.parse_args()
    params = SIZES[args.size]
    if args.smoke:
        params = smoke(params)

    if args.section:  # child: one section, JSON on the last stdout line
        with tempfile.TemporaryDirectory() as tmp:
            result = run_section(args.section, params[args.section], Path(tmp))
        print(json.dumps(result, default=_finite))
        return

    import torch

    results: dict = {
        "size": args.size + (" (smoke: figures mean nothing)" if args.smoke else ""),
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "torch_threads": torch.get_num_threads(),
    }
    for name in args.only or SECTIONS:
        cmd = [sys.executable, "-m", "pipeline.bench", "--size", args.size, "--section", name]
        if args.smoke:
            cmd.append("--smoke")
        start = time.perf_counter()
        print(f"bench: {name} ...", file=sys.stderr, flush=True)
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode == 0:
            results[name] = json.loads(proc.stdout.strip().splitlines()[-1])
        else:
            results[name] = {"error": proc.stderr.strip().splitlines()[-12:]}
        results[name]["section_wall_s"] = round(time.perf_counter() - start, 1)
    text = json.dumps(results, indent=2, default=_finite)
    out = Path(args.out or f"bench-results/bench-{args.size}{'-smoke' if args.smoke else ''}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()

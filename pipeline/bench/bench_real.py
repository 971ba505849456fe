"""Real-model benchmark: the activations stage and the fit on a real pretrained checkpoint.

The model is a GGUF file (``gguf`` in the parameters, or ``$XPROBE_REAL_GGUF``; default: the
SmolLM2-135M-Instruct Q4_1 file that ``make real-example`` extracts to
``examples/real/work/a/``); without it the section reports ``skipped`` and why. The tokens are
real text from this machine (``/usr/share/doc`` READMEs and changelogs, cut to 12 KB each)
through the file's own tokenizer. Measured in one process, on the same tokens:

* ``stage``: xprobe's activations stage at ``blocks.<layer>.hook_resid_post``, reading the GGUF
  (header check, dequantization and model load included: ``gguf_load_s`` times that alone);
* ``bare``: the same weights (saved once as safetensors) run by the stage's own
  ``forward_capture``, stopped after that block, nothing stored;
* ``saelens``: sae-lens's ``CacheActivationsRunner`` on the safetensors copy and the same
  sequences (``AutoModelForCausalLM`` in ``HookedProxyLM``), as in the ``activations`` section;
* ``fit``: xprobe's features and fit stages (through their configs) at the real d_model and a
  TopK SAE of ``d_sae`` latents (random weights: the fit's cost does not depend on training).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from pipeline.bench.common import Timer, device

DEFAULT_GGUF = (
    Path(__file__).resolve().parents[2] / "examples/real/work/a/SmolLM2-135M-Instruct.Q4_1.gguf"
)


def _real_text(out: Path, max_bytes: int) -> Path:
    import gzip
    import json

    total = 0
    with out.open("w") as f:
        for path in sorted(Path("/usr/share/doc").glob("*/changelog*.gz")) + sorted(
            Path("/usr/share/doc").glob("*/README*")
        ):
            if path.is_symlink() or not path.is_file():
                continue
            raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
            text = raw[:12_000].decode("utf-8", errors="replace")
            f.write(json.dumps({"text": text}) + "\n")
            total += len(text)
            if total >= max_bytes:
                break
    return out


def _fit(store, work: Path, p: dict, d_model: int) -> dict:
    from sae_lens.saes.sae import SAEMetadata
    from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig

    from pipeline.api import run_stage
    from pipeline.config import from_dict
    from pipeline.registry import STAGES

    hook = f"blocks.{p['layer']}.hook_resid_post"
    torch.manual_seed(0)
    sae = TopKSAE(
        TopKSAEConfig(
            d_in=d_model, d_sae=p["d_sae"], k=p["k"], metadata=SAEMetadata(hook_name=hook)
        )
    )
    sae.save_model(work / "sae")
    cfgs = {s.name: s.load()[0] for s in STAGES}
    run_stage(
        from_dict(
            cfgs["features"],
            {"corpus": "real", "model": "A", "sae_path": str(work / "sae"), "name": "sae",
             "progress": False},
        ),
        store,
    )  # fmt: skip
    fit_cfg = from_dict(
        cfgs["fit"],
        {"name": "A", "corpus": "real", "features": "sae", "model": "A", "hooks": [hook],
         "progress": False},
    )  # fmt: skip
    with Timer() as t:
        run_stage(fit_cfg, store)
    n_tok = int(store.info("tokens/real")["n_counted"])
    return {
        "d_model": d_model,
        "d_sae": p["d_sae"],
        "k": p["k"],
        "counted_tokens": n_tok,
        "fit_s": round(t.s, 3),
        "fit_tokens_per_s": round(n_tok / t.s),
        "note": "the whole fit stage (statistics, ridge grid, held-out scores, bootstrap) on one "
        "hook; its fixed costs weigh more at few tokens",
    }


def bench_real(work: Path, p: dict) -> dict:
    """Extraction tokens/s: stage vs bare forward vs sae-lens, and the fit's tokens/s, on a GGUF."""
    from pipeline.bench.bench_activations import _bare_forward, _saelens
    from pipeline.inputs.model import load_causal_lm, plain_copy
    from pipeline.inputs.tokenizer import load_tokenizer
    from pipeline.store import Store
    from stages.activations import ActivationsConfig
    from stages.activations import run as run_acts
    from stages.tokenize import TokenizeConfig
    from stages.tokenize import run as run_tokenize

    gguf = Path(p.get("gguf") or os.environ.get("XPROBE_REAL_GGUF") or DEFAULT_GGUF)
    if not gguf.is_file():
        return {"skipped": f"no GGUF file at {gguf}: run `make real-example` first, or set "
                "XPROBE_REAL_GGUF"}  # fmt: skip
    work.mkdir(parents=True, exist_ok=True)
    ctx, batch, layer = p["ctx"], p["batch_seqs"], p["layer"]
    store = Store(work / "store")
    run_tokenize(
        TokenizeConfig(
            corpus="real",
            source=(str(_real_text(work / "text.jsonl", p["n_seq"] * ctx * 8)),),
            tokenizer=str(gguf),
            ctx=ctx,
            chunk_seqs=batch,
            max_tokens=p["n_seq"] * ctx,
            progress=False,
        ),
        store,
    )
    tinfo = store.info("tokens/real")
    ids = np.concatenate(
        [store.read_chunk("tokens/real/ids", i) for i in range(int(tinfo["n_chunks"]))]
    ).astype(np.int64)
    n_tok = len(ids) * ctx

    with Timer() as load:
        model = load_causal_lm(str(gguf), dtype=torch.float32)
    plain = plain_copy(model)
    plain.save_pretrained(work / "model")
    load_tokenizer(str(gguf)).save_pretrained(work / "model")
    d_model, n_layer = int(plain.config.hidden_size), int(plain.config.num_hidden_layers)
    del model, plain
    batches = [torch.from_numpy(ids[s : s + batch]) for s in range(0, len(ids), batch)]
    shape = {"family": "llama", "d_model": d_model}
    bare_s, _ = _bare_forward(work / "model", batches, {"layer": layer, "dtype": "float32"})

    with Timer() as stage:
        run_acts(
            ActivationsConfig(
                corpus="real", model=str(gguf), name="A", layers=(layer,), dtype="float32",
                device=device(), batch_seqs=batch, progress=False,
            ),
            store,
        )  # fmt: skip
    unit = f"acts/real/A/blocks.{layer}.hook_resid_post"
    x_bytes = store.nbytes_stored(unit)
    first_row = np.asarray(store.array(f"{unit}/x")[:ctx])
    sae = _saelens(  # whole batches: sae-lens fills its buffer by batches of batch_seqs
        work / "model",
        ids[: max(batch, len(ids) // batch * batch)],
        work / "saelens",
        {"ctx": ctx, "shape": shape, "layer": layer, "batch_seqs": batch},
    )
    first = sae.pop("_first_row", None)
    if first is not None:
        sae["matches_xprobe_row0_max_abs_diff"] = float(
            (torch.from_numpy(first_row) - first.float()).abs().max()
        )
    stage_tps, bare_tps = n_tok / stage.s, n_tok / bare_s
    out = {
        "model": gguf.name,
        "gguf_load_s": round(load.s, 2),
        "d_model": d_model,
        "n_layer": n_layer,
        "hook": f"blocks.{layer}.hook_resid_post",
        "device": device(),
        "torch_threads": torch.get_num_threads(),
        "tokens": n_tok,
        "ctx": ctx,
        "batch_seqs": batch,
        "stage_s": round(stage.s, 3),
        "stage_tokens_per_s": round(stage_tps),
        "bare_forward_s": round(bare_s, 3),
        "bare_forward_tokens_per_s": round(bare_tps),
        "ratio_stage_vs_bare_forward": round(stage_tps / bare_tps, 3),
        "note": "stage_s includes reading and dequantizing the GGUF (gguf_load_s alone); "
        "bare_forward_s is the forward alone",
        "xprobe_bytes_per_token": round(x_bytes / n_tok, 1),
        "saelens": sae,
    }
    if "error" not in sae:
        out["ratio_xprobe_vs_saelens_tokens_per_s"] = round(stage_tps / sae["tokens_per_s"], 3)
        out["ratio_xprobe_vs_saelens_bytes_per_token"] = round(
            x_bytes / n_tok / sae["bytes_per_token"], 3
        )
    out["fit"] = _fit(store, work, p, d_model)
    return out

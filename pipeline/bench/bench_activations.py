"""Activations stage benchmark: xprobe vs the bare truncated forward vs sae-lens' cache runner.

One run, one model with random weights saved locally, one set of token sequences (the stdlib
corpus tokenized by a BPE trained on it). Measured:

* ``stage``: xprobe's activations stage at one layer's ``resid_post``, model loading included;
* ``bare``: the same model's forward on the same batches, stopped after that block by the
  stage's own ``forward_capture`` helper, nothing stored (the ceiling for the stage);
* ``saelens``: ``sae_lens.CacheActivationsRunner`` on the same local model
  (``AutoModelForCausalLM``, wrapped by sae-lens in ``HookedProxyLM``) and the same sequences
  (``override_dataset``), possibly on a prefix of them (``saelens_n_seq``: its cache is float32
  and must fit the disk).
"""

from __future__ import annotations

import traceback
from pathlib import Path

import numpy as np
import torch

from pipeline.bench.common import Timer, build_model, corpus_and_tokenizer, device, dir_bytes

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _bare_forward(model_dir: Path, batches: list, p: dict) -> tuple[float, float]:
    """Seconds for the truncated forward over ``batches`` (after one warm-up batch), and
    seconds to load the model."""
    from transformers import AutoModelForCausalLM

    from stages.activations import find_blocks, forward_capture

    dev = device()
    with Timer() as load:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=DTYPES[p["dtype"]]).to(dev)
    model.eval()
    blocks = find_blocks(model, model.config.num_hidden_layers)
    wanted = [(p["layer"], "post")]
    forward_capture(model, blocks, batches[0].to(dev), wanted)  # warm-up
    with Timer() as t:
        for ids in batches:
            acts = forward_capture(model, blocks, ids.to(dev, non_blocking=True), wanted)
            assert acts[(p["layer"], "post")].shape[:2] == ids.shape
    del model
    return t.s, load.s


def _saelens(model_dir: Path, ids, out: Path, p: dict) -> dict:
    """sae-lens CacheActivationsRunner on the same model and sequences."""
    try:
        import torch
        from datasets import Dataset
        from sae_lens import CacheActivationsRunner, CacheActivationsRunnerConfig

        ctx, d_model = p["ctx"], p["shape"]["d_model"]
        n_tok = int(ids.shape[0]) * ctx
        # HookedProxyLM (the AutoModelForCausalLM wrapper) names its hook points after the HF
        # submodules: the output of GPT-2 block L (= blocks.L.hook_resid_post) is transformer.h.L.
        blocks = "transformer.h" if p["shape"]["family"] == "gpt2" else "model.layers"
        hook = f"{blocks}.{p['layer']}"
        dataset = Dataset.from_dict({"input_ids": ids.tolist()})
        cfg = CacheActivationsRunnerConfig(
            dataset_path=str(out / "unused-dataset-path"),  # override_dataset is used instead
            model_name=str(model_dir),
            model_class_name="AutoModelForCausalLM",
            model_batch_size=p["batch_seqs"],
            hook_name=hook,
            d_in=d_model,
            training_tokens=n_tok,
            context_size=ctx,
            new_cached_activations_path=str(out / "cache"),
            shuffle=False,
            # its cache is a HF dataset, and pyarrow has no bfloat16: float32 is what it can do
            dtype="float32",
            device=device(),
            # one shard holding exactly n_tok tokens (the default 2 GB buffer would make the
            # runner loop over the dataset again until 2 GB of activations are gathered)
            buffer_size_gb=(n_tok * d_model * 4 + 512) / 1e9,
            prepend_bos=False,  # the sequences already start with BOS
        )
        assert cfg.n_buffers == 1 and cfg.n_tokens_in_buffer == n_tok, (
            cfg.n_buffers,
            cfg.n_tokens_in_buffer,
        )
        with Timer() as init:
            runner = CacheActivationsRunner(cfg, override_dataset=dataset)
        with Timer() as run:
            ds = runner.run()
        t_init, t_run = init.s, run.s
        wall = t_init + t_run
        n_rows = len(ds)
        stored = dir_bytes(out / "cache")
        # sanity: the cached activations equal the model's block-1 output
        first = torch.tensor(ds[0][hook])
        return {
            "hook_name": hook,
            "tokens": n_rows * ctx,
            "wall_s": round(wall, 3),
            "init_s": round(t_init, 3),
            "run_s": round(t_run, 3),
            "tokens_per_s": round(n_rows * ctx / wall),
            "bytes_on_disk": stored,
            "bytes_per_token": round(stored / (n_rows * ctx), 3),
            "note": "bytes include the int32 token_ids column sae-lens stores beside the activations",
            "_first_row": first,
        }
    except Exception as e:  # noqa: BLE001
        return {
            "error": f"{type(e).__name__}: {e}",
            "traceback_tail": traceback.format_exc().splitlines()[-6:],
        }


def bench_activations(work: Path, p: dict) -> dict:
    """Activations stage tokens/s vs the bare truncated forward and vs sae-lens; bytes/token."""
    from pipeline.store import Store
    from stages.activations import ActivationsConfig
    from stages.activations import run as run_acts
    from stages.tokenize import TokenizeConfig
    from stages.tokenize import run as run_tokenize

    work.mkdir(parents=True, exist_ok=True)
    ctx, batch, chunk_seqs, layer = p["ctx"], p["batch_seqs"], p["chunk_seqs"], p["layer"]
    corpus, tok_dir = corpus_and_tokenizer(work, p["corpus_bytes"], vocab_size=4096)
    model_dir = build_model({**p["shape"], "ctx": ctx}, tok_dir, work / "model", DTYPES[p["dtype"]])

    store = Store(work / "store")
    run_tokenize(
        TokenizeConfig(
            corpus="stdlib",
            source=(str(corpus),),
            tokenizer=str(model_dir),
            ctx=ctx,
            chunk_seqs=chunk_seqs,
            max_tokens=p["n_seq"] * ctx,
            progress=False,
        ),
        store,
    )
    tinfo = store.info("tokens/stdlib")
    n_seq = int(tinfo["n_seq"])
    ids = np.concatenate(
        [store.read_chunk("tokens/stdlib/ids", i) for i in range(int(tinfo["n_chunks"]))]
    ).astype(np.int64)
    n_tok = n_seq * ctx
    # the stage's batches: batch_seqs within each chunk of chunk_seqs
    batches = [
        torch.from_numpy(ids[c + s : min(c + s + batch, c + chunk_seqs, n_seq)])
        for c in range(0, n_seq, chunk_seqs)
        for s in range(0, chunk_seqs, batch)
        if c + s < n_seq
    ]
    bare_s, load_s = _bare_forward(model_dir, batches, p)

    cfg = ActivationsConfig(
        corpus="stdlib",
        model=str(model_dir),
        name="model",
        layers=(layer,),
        hook="resid_post",
        dtype=p["dtype"],
        device=device(),
        batch_seqs=batch,
        progress=False,
    )
    with Timer() as stage:
        run_acts(cfg, store)
    unit = f"acts/stdlib/model/blocks.{layer}.hook_resid_post"
    x_bytes = store.nbytes_stored(unit)
    first_row = np.asarray(store.array(f"{unit}/x")[:ctx])
    store.delete(unit)  # the sae-lens cache needs the disk

    saelens_ids = ids[: p["saelens_n_seq"]]
    sae = _saelens(model_dir, saelens_ids, work / "saelens", p)
    first = sae.pop("_first_row", None)
    if first is not None and p["dtype"] == "float32":
        sae["matches_xprobe_row0_max_abs_diff"] = float(
            (torch.from_numpy(first_row) - first.float()).abs().max()
        )

    stage_tps, bare_tps, x_bpt = n_tok / stage.s, n_tok / bare_s, x_bytes / n_tok
    out = {
        "model": p["shape"],
        "dtype": p["dtype"],
        "device": device(),
        "torch_threads": torch.get_num_threads(),
        "tokens": n_tok,
        "ctx": ctx,
        "batch_seqs": batch,
        "hook": f"blocks.{layer}.hook_resid_post",
        "stage_s": round(stage.s, 3),
        "stage_tokens_per_s": round(stage_tps),
        "bare_forward_s": round(bare_s, 3),
        "bare_forward_tokens_per_s": round(bare_tps),
        "ratio_stage_vs_bare_forward": round(stage_tps / bare_tps, 3),
        "model_load_s": round(load_s, 3),
        "note": "stage_s includes loading the model (model_load_s, timed separately) and "
        "checking the tokenizer; bare_forward_s is the forward alone",
        "xprobe_bytes_per_token": round(x_bpt, 3),
        "saelens": sae,
    }
    if "error" not in sae:
        out["ratio_xprobe_vs_saelens_tokens_per_s"] = round(stage_tps / sae["tokens_per_s"], 3)
        out["ratio_xprobe_vs_saelens_bytes_per_token"] = round(x_bpt / sae["bytes_per_token"], 3)
    out["targets"] = {
        "ratio_stage_vs_bare_forward": ">= 0.9",
        "ratio_xprobe_vs_saelens_tokens_per_s": ">= 3",
        "ratio_xprobe_vs_saelens_bytes_per_token": "<= 0.5",
    }
    return out

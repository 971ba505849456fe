"""Shared test builders, imported as a module (``from tests.helpers import ...``).

Documents, waiting for chunk markers, a small tokenized corpus, and tiny sae-lens SAEs with
seeded random weights saved with ``save_model`` for ``SAE.load_from_disk``.
"""

from __future__ import annotations

import random
from pathlib import Path

import torch

WORDS = (
    "the a model layer feature sparse probe token corpus vector residual stream attention head "
    "linear direction activation of in to and is that for with on as by this we it be are from "
    "python function class return value list dict import def self none true false if else while "
    "research network learn train data store chunk array write read resume fast slow small large"
).split()


def make_documents(n_docs: int, seed: int = 0) -> list[str]:
    """Seeded pseudo-text documents of varied length (some punctuation, digits, unicode)."""
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        sentences = []
        for _ in range(rng.randint(1, 12)):
            words = [rng.choice(WORDS) for _ in range(rng.randint(3, 14))]
            if rng.random() < 0.2:
                words.append(str(rng.randint(0, 999)))
            if rng.random() < 0.05:
                words.append("café")
            sentences.append(" ".join(words).capitalize() + rng.choice([".", "!", "?", ":"]))
        docs.append(" ".join(sentences))
    return docs


def wait_for_markers(done_dir: Path, n: int, timeout: float = 180.0) -> int:
    """Wait until `done_dir` holds at least `n` committed chunk markers; return how many it holds.

    Only `<i>.json` counts: a marker being written is a hidden temp file until it is renamed.
    The timeout is generous because a subprocess importing torch on a loaded 2-core machine has
    taken over 60 s.
    """
    import os
    import time

    deadline = time.time() + timeout
    count = 0
    while time.time() < deadline:
        if done_dir.is_dir():
            count = sum(1 for f in os.listdir(done_dir) if f.endswith(".json") and f[0] != ".")
            if count >= n:
                break
        time.sleep(0.005)
    return count


def tokenize_small(
    store, corpus_jsonl: Path, tokenizer_dir: Path, max_tokens: int, corpus: str = "c"
) -> None:
    """Tokenize a jsonl corpus into ``store`` as ``tokens/<corpus>``: ctx 32, 4 sequences a chunk."""
    from stages.tokenize import TokenizeConfig
    from stages.tokenize import run as tokenize

    tokenize(
        TokenizeConfig(
            corpus=corpus,
            source=(str(corpus_jsonl),),
            tokenizer=str(tokenizer_dir),
            ctx=32,
            chunk_seqs=4,
            max_tokens=max_tokens,
            progress=False,
        ),
        store,
    )


def save_standard_sae(
    out: Path,
    d_in: int = 64,
    d_sae: int = 256,
    hook: str = "blocks.0.hook_resid_post",
    seed: int = 0,
    bias: float = -1.0,
    enc_scale: float = 4.0,
) -> Path:
    """A StandardSAE (ReLU) whose negative encoder bias keeps L0 moderate (tens of features) on the
    test GPT-2's residual stream (|x| ~ 0.25, so pre-activations have std ~ enc_scale * 0.25)."""
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(seed)
    sae = StandardSAE(
        StandardSAEConfig(d_in=d_in, d_sae=d_sae, metadata=SAEMetadata(hook_name=hook))
    )
    with torch.no_grad():
        sae.W_enc.copy_(enc_scale * torch.randn(d_in, d_sae))
        sae.W_dec.copy_(torch.randn(d_sae, d_in) / (enc_scale * d_sae))
        sae.b_enc.fill_(bias)
        sae.b_dec.copy_(0.01 * torch.randn(d_in))
    sae.save_model(str(out))
    return out


def save_topk_sae(
    out: Path,
    d_in: int = 64,
    d_sae: int = 256,
    k: int = 8,
    hook: str = "blocks.0.hook_resid_post",
    seed: int = 1,
) -> Path:
    """A TopK SAE with random weights: exactly ``k`` features fire on every token."""
    from sae_lens import TopKSAE, TopKSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(seed)
    sae = TopKSAE(TopKSAEConfig(d_in=d_in, d_sae=d_sae, k=k, metadata=SAEMetadata(hook_name=hook)))
    with torch.no_grad():
        sae.W_enc.copy_(torch.randn(d_in, d_sae) / d_in**0.5)
        sae.W_dec.copy_(sae.W_enc.T.clone())
        sae.b_enc.fill_(0.0)
    sae.save_model(str(out))
    return out


def save_jumprelu_sae(
    out: Path,
    d_in: int = 64,
    d_sae: int = 256,
    hook: str = "blocks.0.hook_resid_post",
    seed: int = 2,
) -> Path:
    """A JumpReLU SAE: pre-activations of std ~1 on the test residual stream, thresholds ~1.5."""
    from sae_lens import JumpReLUSAE, JumpReLUSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(seed)
    sae = JumpReLUSAE(
        JumpReLUSAEConfig(d_in=d_in, d_sae=d_sae, metadata=SAEMetadata(hook_name=hook))
    )
    with torch.no_grad():
        sae.W_enc.copy_(4.0 * torch.randn(d_in, d_sae))
        sae.W_dec.copy_(torch.randn(d_sae, d_in) / (4.0 * d_sae))
        sae.b_enc.fill_(0.0)
        sae.threshold.copy_(1.0 + torch.rand(d_sae))
        sae.b_dec.copy_(0.01 * torch.randn(d_in))
    sae.save_model(str(out))
    return out


def save_gated_sae(
    out: Path,
    d_in: int = 64,
    d_sae: int = 256,
    hook: str = "blocks.0.hook_resid_post",
    seed: int = 3,
) -> Path:
    """A gated SAE (gate and magnitude paths share W_enc; r_mag rescales the magnitude path)."""
    from sae_lens import GatedSAE, GatedSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(seed)
    sae = GatedSAE(GatedSAEConfig(d_in=d_in, d_sae=d_sae, metadata=SAEMetadata(hook_name=hook)))
    with torch.no_grad():
        sae.W_enc.copy_(4.0 * torch.randn(d_in, d_sae))
        sae.W_dec.copy_(torch.randn(d_sae, d_in) / (4.0 * d_sae))
        sae.b_gate.fill_(-1.0)
        sae.r_mag.copy_(0.1 * torch.randn(d_sae))
        sae.b_mag.copy_(0.1 * torch.randn(d_sae))
        sae.b_dec.copy_(0.01 * torch.randn(d_in))
    sae.save_model(str(out))
    return out


def pipeline_config(
    root: Path,
    corpus: Path,
    tokenizer: Path,
    model: Path,
    sae: Path,
    sae_b: Path | None = None,
    hook: str = "blocks.0.hook_resid_post",
    n_bootstrap: int = 20,
) -> Path:
    """A TOML running every stage on a tiny corpus into ``root/store``: tokens ``c``, activations
    of ``model`` as ``a``, features ``sae_a`` (and ``sae_b``, matched against ``sae_a``, with a
    second fit and a report when ``sae_b`` is given), and the fit ``B`` of ``a`` at ``hook``.
    The fits draw ``n_bootstrap`` replicates (the stage's 200 where an interval is under test;
    the tests using this config test none)."""
    config = root / "x.toml"
    text = (
        f'store = "{root / "store"}"\n\n'
        f'[tokenize]\ncorpus = "c"\nsource = ["{corpus}"]\ntokenizer = "{tokenizer}"\n'
        "ctx = 32\nchunk_seqs = 4\nmax_tokens = 1536\nprogress = false\n\n"
        f'[activations]\ncorpus = "c"\nmodel = "{model}"\nname = "a"\nhooks = ["{hook}"]\n'
        'dtype = "float32"\ndevice = "cpu"\nprogress = false\n\n'
    )
    for name, path in [("sae_a", sae), ("sae_b", sae_b)]:
        if path is not None:
            text += (
                f'[[features]]\ncorpus = "c"\nmodel = "a"\nsae_path = "{path}"\nname = "{name}"\n'
                'device = "cpu"\nprogress = false\n\n'
            )
    for fit in ["B"] + (["B2"] if sae_b is not None else []):
        text += (
            f'[[fit]]\nname = "{fit}"\ncorpus = "c"\nfeatures = "sae_a"\nmodel = "a"\n'
            f'hooks = ["{hook}"]\ndevice = "cpu"\nmin_active = 1\nprogress = false\n'
            f"lambdas = [{0.0 if fit == 'B' else 0.01}]\nn_bootstrap = {n_bootstrap}\n\n"
        )
    if sae_b is not None:
        text += (
            '[match]\nname = "ab"\ncorpus = "c"\nfeatures_a = "sae_a"\nfeatures_b = "sae_b"\n'
            'device = "cpu"\nprogress = false\n\n'
            '[report]\ncorpus = "c"\nfeatures = "sae_a"\nfits = ["B2"]\nceiling = "B"\n'
            "n_shown = 1\nencoder_cosine = false\nprogress = false\n"
            "token_fits = []\n"  # no derived token controls: these tests count the stages' units
        )
    config.write_text(text)
    return config


CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
"""A ChatML chat template (Qwen-style): role headers and ends are the added tokens."""


def save_instruct_variant(model_dir: Path, out: Path) -> Path:
    """B_instruct as a chat finetune ships it: ``model_dir``'s weights with a tokenizer that adds
    two special tokens (``<|im_start|>``, ``<|im_end|>``; the embedding resized to hold them),
    makes ``<|im_end|>`` the eos, sets a pad token and a ChatML chat template."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.eos_token = "<|im_end|>"
    tok.pad_token = tok.convert_ids_to_tokens(0)
    tok.chat_template = CHATML
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.resize_token_embeddings(len(tok))
    model.config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def swap_vocab_ids(model_dir: Path, out: Path, a: int, b: int) -> Path:
    """A copy of ``model_dir`` whose tokenizer swaps the token strings of ids ``a`` and ``b``
    (same weights): a vocabulary that truly differs on those two ids."""
    import json
    import shutil

    shutil.copytree(model_dir, out)
    spec = json.loads((out / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    by_id = {i: t for t, i in vocab.items()}
    vocab[by_id[a]], vocab[by_id[b]] = b, a
    (out / "tokenizer.json").write_text(json.dumps(spec))
    return out


def save_rotated_llama(model_dir: Path, out: Path, seed: int = 0) -> torch.Tensor:
    """Save a copy of the Llama at ``model_dir`` whose residual stream is exactly R · A's at every
    layer, for a seeded random orthogonal R [d, d] (returned, float32): every weight that reads
    the stream is right-multiplied by Rᵀ, every one that writes it left-multiplied by R. Exact
    because RMSNorm's scale is rotation invariant and its gains are all 1 (as initialised; other
    gains are refused). The model has every feature of A, in another basis."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(model_dir, torch_dtype=torch.float32).eval()
    d = model.config.hidden_size
    generator = torch.Generator().manual_seed(seed)
    rotation, _ = torch.linalg.qr(torch.randn(d, d, generator=generator, dtype=torch.float64))
    r = rotation.float()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                assert torch.equal(p, torch.ones_like(p)), f"{name}: gains must be 1 to rotate"
            elif name.endswith(("o_proj.weight", "down_proj.weight")):
                p.copy_(r @ p)  # writes the stream: [d, *]
            elif p.ndim == 2:  # embed_tokens, q/k/v, gate/up, lm_head: read (or are) the stream
                p.copy_(p @ r.T)
            else:
                raise AssertionError(f"{name}: unexpected parameter for a rotation")
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return r


def held_out_split(
    store, n_seq: int, fraction: float, seed: int = 0, corpus: str = "c", split_by: str = "auto"
):
    """[n_seq] bool: the held-out sequences of a fit with this ``split_by`` (default "auto", as a
    fit's: whole documents where documents span several sequences; pipeline/maths/split.py)."""
    from pipeline.documents import split_documents
    from pipeline.maths.split import held_out_sequences

    docs = split_documents(store, f"tokens/{corpus}", split_by)
    return held_out_sequences(n_seq, fraction, seed, docs)


def xprobe(*args: str):
    """``xprobe ARGS`` in this process, as the console script runs it (``pipeline.cli.main``: one
    ``error:`` line and exit 2 for an XprobeError): a ``CompletedProcess`` with the exit code and
    the captured stdout and stderr. For tests that need no real signal nor a fresh interpreter
    (the slow lane's newcomer tests run the real ``python -m pipeline.cli``)."""
    import contextlib
    import io
    import signal
    import subprocess
    import sys

    from pipeline.cli import main

    out, err = io.StringIO(), io.StringIO()
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGHUP)}  # main sets them
    argv, sys.argv = sys.argv, ["xprobe", *args]
    code: int | str | None = 0
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            main()
    except SystemExit as e:
        code = e.code
    finally:
        sys.argv = argv
        for s, handler in handlers.items():
            signal.signal(s, handler)
    returncode = code if isinstance(code, int) else (0 if code is None else 1)
    return subprocess.CompletedProcess(
        ["xprobe", *args], returncode, out.getvalue(), err.getvalue()
    )

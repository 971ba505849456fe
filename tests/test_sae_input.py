"""SAEs trained on TransformerLens activations: what their metadata says decides what they are given.

TransformerLens's ``center_writing_weights`` (its default) centres the residual stream of LayerNorm
models; xprobe stores raw HF activations and centres them for such an SAE. Checked against
TransformerLens itself on a tiny GPT-2, and left alone on a Llama (RMSNorm)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.errors import XprobeError
from pipeline.inputs.sae import sae_input_transform
from pipeline.store import Store
from stages.activations import ActivationsConfig
from stages.activations import run as activations
from stages.features import FeaturesConfig
from stages.features import run as features
from tests.helpers import tokenize_small

HOOK = "blocks.0.hook_resid_post"
TL_TRAINED = {"model_class_name": "HookedTransformer", "model_from_pretrained_kwargs": {}}


def _sae(out, **metadata):
    from sae_lens import StandardSAE, StandardSAEConfig
    from sae_lens.saes.sae import SAEMetadata

    torch.manual_seed(0)
    sae = StandardSAE(
        StandardSAEConfig(d_in=64, d_sae=128, metadata=SAEMetadata(hook_name=HOOK, **metadata))
    )
    with torch.no_grad():
        sae.W_enc.copy_(4.0 * torch.randn(64, 128))
        sae.b_enc.fill_(-0.5)
        sae.b_dec.copy_(0.02 * torch.randn(64))
    sae.save_model(str(out))
    return out


def _dense(store: Store, unit: str, n_feat: int = 128) -> np.ndarray:
    idx, val = store.array(f"{unit}/idx")[:], store.array(f"{unit}/val")[:]
    out = np.zeros((len(idx), n_feat), np.float32)
    rows = np.repeat(np.arange(len(idx)), idx.shape[1])
    keep = idx.reshape(-1) >= 0
    out[rows[keep], idx.reshape(-1)[keep]] = val.reshape(-1)[keep]
    return out


def _run(store: Store, model_dir, sae_dir, name: str, **kw) -> None:
    activations(
        ActivationsConfig(
            corpus="c", model=str(model_dir), name=name, hooks=(HOOK,), device="cpu", progress=False
        ),
        store,
    )
    features(
        FeaturesConfig(
            corpus="c",
            model=name,
            sae_path=str(sae_dir),
            name=f"{name}_{sae_dir.name}",
            k=128,
            device="cpu",
            progress=False,
            **kw,
        ),
        store,
    )


def _transformer_lens_resid(gpt2_dir, ids: np.ndarray) -> torch.Tensor:
    """blocks.0.hook_resid_post of HookedTransformer with its default processing ([n_tok, 64])."""
    from transformer_lens import HookedTransformer, HookedTransformerConfig
    from transformer_lens.pretrained.weight_conversions import convert_gpt2_weights
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(gpt2_dir, dtype=torch.float32).eval()
    c = hf.config
    cfg = HookedTransformerConfig(
        n_layers=c.n_layer,
        d_model=c.n_embd,
        n_heads=c.n_head,
        d_head=c.n_embd // c.n_head,
        d_mlp=4 * c.n_embd,
        d_vocab=c.vocab_size,
        n_ctx=c.n_positions,
        act_fn="gelu_new",
        normalization_type="LN",
        original_architecture="GPT2LMHeadModel",
    )
    tl = HookedTransformer(cfg)
    tl.load_and_process_state_dict(
        convert_gpt2_weights(hf, cfg), fold_ln=True, center_writing_weights=True
    )
    with torch.inference_mode():
        _, cache = tl.eval().run_with_cache(torch.from_numpy(ids.astype(np.int64)))
    return cache[HOOK].reshape(-1, 64)


def test_tl_trained_sae_gets_transformer_lens_activations(
    tmp_path, corpus_jsonl, tokenizer_dir, gpt2_dir, llama_dir
):
    from sae_lens import SAE

    store = Store(tmp_path / "s")
    tokenize_small(store, corpus_jsonl, tokenizer_dir, max_tokens=256)
    tl_sae, plain_sae = _sae(tmp_path / "tl", **TL_TRAINED), _sae(tmp_path / "plain")
    _run(store, gpt2_dir, tl_sae, "gpt2")
    _run(store, gpt2_dir, plain_sae, "gpt2")
    sae = SAE.load_from_disk(str(tl_sae)).eval()

    info = store.info("feats/c/gpt2_tl")
    assert info["sae_input"] == "centered" and "center_writing_weights" in info["sae_input_why"]
    assert info["config"]["sae_input_transform"] == "centered"
    tl = _transformer_lens_resid(gpt2_dir, store.array("tokens/c/ids")[:])
    raw = torch.from_numpy(store.array(f"acts/c/gpt2/{HOOK}/x")[:])
    assert (tl - raw).abs().max() > 1e-2  # the processing matters on this model
    mask = store.array("tokens/c/mask")[:].reshape(-1)
    with torch.inference_mode():
        ref_tl, ref_raw = sae.encode(tl).numpy(), sae.encode(raw).numpy()
    got = _dense(store, "feats/c/gpt2_tl")
    np.testing.assert_allclose(got[mask], ref_tl[mask], atol=1e-4)
    assert np.abs(got[mask] - ref_raw[mask]).max() > 1e-2
    # no such metadata: the raw residual, exactly as before
    assert store.info("feats/c/gpt2_plain")["sae_input"] == "raw"
    with torch.inference_mode():
        plain = SAE.load_from_disk(str(plain_sae)).eval().encode(raw).numpy()
    np.testing.assert_array_equal(_dense(store, "feats/c/gpt2_plain")[mask], plain[mask])

    # RMSNorm (Llama): TransformerLens does not centre, so neither does xprobe
    _run(store, llama_dir, tl_sae, "llama")
    info = store.info("feats/c/llama_tl")
    assert info["sae_input"] == "raw" and "RMSNorm" in info["sae_input_why"]
    assert "sae_input_transform" not in info["config"]

    # an explicit setting overrules the metadata (and is another computation: refused unforced)
    with pytest.raises(XprobeError, match="sae_input_transform"):
        features(
            FeaturesConfig(
                corpus="c",
                model="llama",
                sae_path=str(tl_sae),
                name="llama_tl",
                k=128,
                sae_input="centered",
                device="cpu",
                progress=False,
            ),
            store,
        )


def test_metadata_rules():
    centred = {"model_class_name": "HookedTransformer", "model_from_pretrained_kwargs": {}}
    assert sae_input_transform(centred, "gpt_neox", "auto")[0] == "centered"
    assert sae_input_transform(centred, "gemma2", "auto")[0] == "raw"
    off = {**centred, "model_from_pretrained_kwargs": {"center_writing_weights": False}}
    assert sae_input_transform(off, "gpt2", "auto")[0] == "raw"
    assert sae_input_transform({}, "gpt2", "auto")[0] == "raw"
    assert sae_input_transform({}, "gpt2", "centered")[0] == "centered"
    with pytest.raises(XprobeError, match=r"model type 'mystery' uses LayerNorm: set sae_input"):
        sae_input_transform(centred, "mystery", "auto")

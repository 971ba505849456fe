"""GGUF files as a model source: a tiny Llama written with the ``gguf`` package's own writer
(llama.cpp's tensor names and q/k row order), read back through the activations stage.

The reference is the same weights loaded from safetensors: float32 tensors give bit-identical
activations; Q8_0 tensors give bit-identical activations to a safetensors copy of their
dequantized values (what transformers computes from is what gguf dequantizes)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from pipeline.errors import XprobeError  # noqa: E402
from pipeline.store import Store  # noqa: E402
from tests.helpers import tokenize_small  # noqa: E402


def _permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """llama.cpp's q/k row order (``convert_hf_to_gguf.LlamaModel.permute``); transformers'
    GGUF loader undoes it."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def _tokenizer_fields(writer, tokenizer_dir: Path) -> None:
    """The byte-level BPE of ``tokenizer_dir`` as ``tokenizer.ggml.*`` (llama.cpp's "gpt2" model)."""
    spec = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    specials = {a["content"] for a in spec["added_tokens"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"]["merges"]]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_types(
        [gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL for t in tokens]
    )
    writer.add_token_merges(merges)
    writer.add_bos_token_id(0)
    writer.add_eos_token_id(0)
    writer.add_add_bos_token(False)


def write_gguf(model_dir: Path, out: Path, qtype: str = "F32") -> dict[str, np.ndarray]:
    """``model_dir``'s Llama as a GGUF file; 2-d weights stored as ``qtype`` (F32 or Q8_0).
    Returns the HF state dict as the file holds it (dequantized), for a safetensors twin."""
    from safetensors.numpy import load_file

    cfg = json.loads((model_dir / "config.json").read_text())
    sd = load_file(model_dir / "model.safetensors")
    n_head, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    w = gguf.GGUFWriter(out, "llama")
    w.add_name("xprobe-test-llama")
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(n_head)
    w.add_head_count_kv(n_kv)
    w.add_rope_dimension_count(cfg["hidden_size"] // n_head)
    rope = cfg.get("rope_parameters") or {}
    w.add_rope_freq_base(float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))))
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    _tokenizer_fields(w, model_dir)

    names = {
        "model.embed_tokens.weight": "token_embd.weight",
        "model.norm.weight": "output_norm.weight",
        "lm_head.weight": "output.weight",
    }
    per_layer = {
        "input_layernorm": "attn_norm",
        "self_attn.q_proj": "attn_q",
        "self_attn.k_proj": "attn_k",
        "self_attn.v_proj": "attn_v",
        "self_attn.o_proj": "attn_output",
        "post_attention_layernorm": "ffn_norm",
        "mlp.gate_proj": "ffn_gate",
        "mlp.up_proj": "ffn_up",
        "mlp.down_proj": "ffn_down",
    }
    for i in range(cfg["num_hidden_layers"]):
        for hf, gg in per_layer.items():
            names[f"model.layers.{i}.{hf}.weight"] = f"blk.{i}.{gg}.weight"
    as_read = {}
    for hf, gg in names.items():
        x = sd[hf].astype(np.float32)
        stored = x
        if gg.endswith("attn_q.weight"):
            stored = _permute(x, n_head)
        elif gg.endswith("attn_k.weight"):
            stored = _permute(x, n_kv)
        if qtype == "Q8_0" and x.ndim == 2:
            q = gguf.quants.quantize(stored, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(gg, q, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
            deq = gguf.quants.dequantize(q, gguf.GGMLQuantizationType.Q8_0)
            # the same rows in HF order: q/k rows are only reordered by the permutation
            if gg.endswith("attn_q.weight") or gg.endswith("attn_k.weight"):
                order = _permute(np.arange(x.shape[0])[:, None], n_head if "attn_q" in gg else n_kv)
                deq_hf = np.empty_like(deq)
                deq_hf[order[:, 0]] = deq
                deq = deq_hf
            as_read[hf] = deq
        else:
            w.add_tensor(gg, stored)
            as_read[hf] = x
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return as_read


def _safetensors_twin(model_dir: Path, state: dict[str, np.ndarray], out: Path) -> Path:
    """``model_dir`` with its weights replaced by ``state`` (what the GGUF file holds)."""
    import shutil

    from safetensors.numpy import save_file

    shutil.copytree(model_dir, out)
    save_file({k: np.ascontiguousarray(v) for k, v in state.items()}, out / "model.safetensors")
    return out


def _acts(store: Store, model: str, name: str) -> np.ndarray:
    from stages.activations import ActivationsConfig
    from stages.activations import run as activations

    activations(
        ActivationsConfig(
            corpus="c",
            model=model,
            name=name,
            layers=(0, 1),
            dtype="float32",
            device="cpu",
            progress=False,
        ),
        store,
    )
    return np.stack([store.array(f"acts/c/{name}/blocks.{i}.hook_resid_post/x")[:] for i in (0, 1)])


@pytest.mark.parametrize("qtype", ["F32", "Q8_0"])
def test_gguf_activations_bit_identical_to_safetensors(
    tmp_path, llama_dir, corpus_jsonl, qtype
) -> None:
    gguf_path = tmp_path / f"tiny-llama.{qtype}.gguf"
    state = write_gguf(llama_dir, gguf_path, qtype)
    twin = _safetensors_twin(llama_dir, state, tmp_path / "twin")
    store = Store(tmp_path / "store")
    tokenize_small(store, corpus_jsonl, llama_dir, max_tokens=512)

    from_gguf = _acts(store, str(gguf_path), "gguf")
    from_safetensors = _acts(store, str(twin), "st")
    assert from_gguf.shape == from_safetensors.shape and np.abs(from_gguf).max() > 0
    np.testing.assert_array_equal(from_gguf, from_safetensors)
    if qtype == "Q8_0":  # quantization moved the weights: the comparison is not vacuous
        original = _acts(store, str(llama_dir), "orig")
        assert not np.array_equal(original, from_gguf)

    info = store.info("acts/c/gguf/blocks.1.hook_resid_post")
    assert info["dtype"] == "float32"
    assert info["gguf"]["architecture"] == "llama"
    assert info["gguf"]["tensor_types"].get(qtype, 0) >= 1
    # lineage: the file's own sha256
    sha = hashlib.sha256(gguf_path.read_bytes()).hexdigest()
    record = info["lineage"]["model"]
    assert record["fingerprint"] == sha and record["sha256"] == sha and record["format"] == "gguf"


def test_gguf_tokenizer_reads_like_the_original(tmp_path, llama_dir, documents) -> None:
    from pipeline.inputs.tokenizer import load_tokenizer

    gguf_path = tmp_path / "tiny.gguf"
    write_gguf(llama_dir, gguf_path)
    ours, theirs = load_tokenizer(str(gguf_path)), load_tokenizer(str(llama_dir))
    for doc in documents[:20]:
        assert (
            ours(doc, add_special_tokens=False)["input_ids"]
            == theirs(doc, add_special_tokens=False)["input_ids"]
        )


def test_gguf_lineage_changes_with_the_file(tmp_path, llama_dir) -> None:
    from pipeline.lineage import current, model_input

    path = tmp_path / "m.gguf"
    write_gguf(llama_dir, path)
    before = model_input(str(path))
    assert before.fingerprint == hashlib.sha256(path.read_bytes()).hexdigest()
    write_gguf(llama_dir, path, "Q8_0")
    assert current(None, before.record()) not in (None, before.fingerprint)


def _header_only(path: Path, arch: str, tensor: np.ndarray | None = None, raw=None) -> None:
    w = gguf.GGUFWriter(path, arch)
    if tensor is not None:
        w.add_tensor("token_embd.weight", tensor, raw_dtype=raw)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_refusals_name_the_architecture_and_the_type(tmp_path) -> None:
    from pipeline.inputs.model import gguf_facts

    path = tmp_path / "alien.gguf"
    _header_only(path, "nonesucharch")
    with pytest.raises(XprobeError, match="architecture 'nonesucharch'"):
        gguf_facts(str(path))

    # Q8_1 is llama.cpp's intermediate type, which the gguf package cannot dequantize
    path = tmp_path / "q8_1.gguf"
    q8_1 = gguf.GGMLQuantizationType.Q8_1
    _header_only(path, "llama", np.zeros((4, gguf.GGML_QUANT_SIZES[q8_1][1] * 2), np.uint8), q8_1)
    with pytest.raises(XprobeError, match="token_embd.weight is quantized as Q8_1"):
        gguf_facts(str(path))

    with pytest.raises(XprobeError, match="does not exist"):
        gguf_facts(str(tmp_path / "missing.gguf"))

    (tmp_path / "junk.gguf").write_bytes(b"not a gguf file at all")
    with pytest.raises(XprobeError, match="not a readable GGUF file"):
        gguf_facts(str(tmp_path / "junk.gguf"))

"""Model loading: an HF causal LM from a hub name, a local folder or a GGUF file, its config, and
its decoder blocks, whatever the architecture names them.

A GGUF file (``model = "path/to/model.Q4_K_M.gguf"``: llama.cpp's format, as quantized
checkpoints circulate) is loaded through transformers' own GGUF path
(``from_pretrained(folder, gguf_file=name)``, which needs the ``gguf`` package:
``pip install 'xprobe[gguf]'``). transformers *dequantizes* every tensor to float on load, so the
model runs, and its activations are stored, in the stage's dtype: what is measured is the
quantized checkpoint's weights, at float precision. Before loading, the file's header is read
(``gguf_facts``: architecture, tensor types) and what transformers cannot load is refused with
the architecture or quantization type named, instead of failing halfway through.
"""

from __future__ import annotations

import functools
from collections import Counter
from pathlib import Path
from typing import Any

from pipeline.errors import XprobeError

GGUF_INSTALL = (
    "pip install 'xprobe[gguf]' (the gguf package, which transformers' GGUF loader needs)"
)


def is_gguf(model: str) -> bool:
    """Whether ``model`` names a GGUF file (by its suffix; hub ids and folders never end so)."""
    return str(model).lower().endswith(".gguf")


def pretrained_args(model: str) -> tuple[str, dict[str, Any]]:
    """What ``from_pretrained`` takes for ``model``: ``(name_or_folder, extra kwargs)``; a GGUF
    file becomes its folder and ``gguf_file``, once its header passed ``gguf_facts``."""
    if is_gguf(model):
        gguf_facts(model)
        path = Path(model).expanduser()
        return str(path.parent), {"gguf_file": path.name}
    return model, {}


def _gguf_reader(path: Path) -> Any:
    try:
        from gguf import GGUFReader
    except ImportError:
        raise XprobeError(f"{path} is a GGUF file; reading it needs {GGUF_INSTALL}") from None
    try:
        return GGUFReader(path)
    except Exception as e:  # noqa: BLE001 (gguf raises ValueError/struct errors on a bad header)
        raise XprobeError(f"{path} is not a readable GGUF file: {e}") from None


def gguf_facts(model: str) -> dict[str, Any]:
    """The header of a GGUF file: ``architecture``, ``name``, ``tensor_types`` (``{"Q4_1": 211,
    "F32": 61}``), refusing what transformers cannot load: an architecture outside its GGUF
    mapping, or a tensor type that ``gguf`` cannot dequantize."""
    path = Path(model).expanduser()
    if not path.is_file():
        raise XprobeError(f"the GGUF file {path} does not exist")
    stat = path.stat()
    return dict(_gguf_facts(str(path.resolve()), stat.st_size, stat.st_mtime_ns))


@functools.lru_cache(maxsize=16)
def _gguf_facts(path_str: str, size: int, mtime_ns: int) -> dict[str, Any]:
    """``gguf_facts`` of one version of a file (size and mtime in the key)."""
    import numpy as np
    from gguf import GGMLQuantizationType, dequantize
    from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES

    path = Path(path_str)
    reader = _gguf_reader(path)

    def field(key: str) -> Any:
        f = reader.fields.get(key)
        return None if f is None else f.contents()

    arch = field("general.architecture")
    name = field("general.name")
    # transformers maps a few llama.cpp names onto its own (qwen2moe -> qwen2_moe, ...)
    known = {a.replace("_", "") for a in GGUF_SUPPORTED_ARCHITECTURES} | set(
        GGUF_SUPPORTED_ARCHITECTURES
    )
    if arch is None or (arch not in known and arch.replace("-", "") not in known):
        raise XprobeError(
            f"{path}: transformers cannot load GGUF architecture {arch!r}; it loads "
            f"{', '.join(sorted(GGUF_SUPPORTED_ARCHITECTURES))}. Convert the checkpoint to an HF "
            "folder another way, or use an original (safetensors) checkpoint"
        )
    counts: Counter[str] = Counter()
    first: dict[str, Any] = {}
    for t in reader.tensors:
        qtype = GGMLQuantizationType(t.tensor_type).name
        counts[qtype] += 1
        first.setdefault(qtype, t)
    for qtype, t in first.items():
        try:  # one row: whether gguf can dequantize this type at all
            dequantize(np.asarray(t.data).reshape(t.data.shape[0], -1)[:1], t.tensor_type)
        except NotImplementedError:
            raise XprobeError(
                f"{path}: tensor {t.name} is quantized as {qtype}, which the installed gguf "
                "package cannot dequantize (so transformers cannot load it); upgrade gguf, or "
                "use a file quantized as Q4_K_M, Q8_0 or another type gguf dequantizes"
            ) from None
    return {"architecture": arch, "name": name, "tensor_types": dict(sorted(counts.items()))}


def load_config(model: str, revision: str | None = None, trust_remote_code: bool = False) -> Any:
    """The model's config (a text model's, for a multimodal one); GGUF files read theirs from the
    file's metadata."""
    import copy

    if is_gguf(model):  # parsing a GGUF header takes seconds (every vocabulary entry): once
        gguf_facts(model)
        stat = Path(model).expanduser().stat()
        return copy.deepcopy(
            _gguf_config(str(Path(model).expanduser().resolve()), stat.st_mtime_ns)
        )
    return _load_config(model, revision, trust_remote_code)


def _load_config(model: str, revision: str | None, trust_remote_code: bool) -> Any:
    from transformers import AutoConfig

    name, extra = pretrained_args(model)
    try:
        config = AutoConfig.from_pretrained(
            name, revision=revision, trust_remote_code=trust_remote_code, **extra
        )
    except (OSError, ValueError) as e:
        raise XprobeError(f"cannot load model config {model!r}: {e}") from None
    return config.get_text_config() if hasattr(config, "get_text_config") else config


@functools.lru_cache(maxsize=4)
def _gguf_config(path: str, mtime_ns: int) -> Any:
    return _load_config(path, None, False)


def load_causal_lm(model: str, **kwargs: Any) -> Any:
    """``AutoModelForCausalLM.from_pretrained`` for a hub name, folder or GGUF file (dequantized
    to ``kwargs["dtype"]``)."""
    from transformers import AutoModelForCausalLM

    name, extra = pretrained_args(model)
    if extra and "config" not in kwargs:  # one header parse fewer
        extra["config"] = load_config(model)
    try:
        return AutoModelForCausalLM.from_pretrained(name, **kwargs, **extra)
    except (OSError, ValueError, ImportError) as e:
        raise XprobeError(f"cannot load model {model!r}: {e}") from None


def plain_copy(model: Any) -> Any:
    """A GGUF-loaded model rebuilt from its config and state dict: transformers marks a GGUF
    load with an ``hf_quantizer`` and then refuses ``save_pretrained``; the copy saves."""
    copy = type(model)(model.config).to(dtype=next(model.parameters()).dtype)
    copy.load_state_dict(model.state_dict())
    return copy.eval()


def find_blocks(model: Any, n_layers: int) -> Any:
    """The decoder blocks of an HF model (``model.layers``, ``transformer.h``...), found generically."""
    import torch

    for path in (
        "model.layers",
        "transformer.h",
        "gpt_neox.layers",
        "model.decoder.layers",
        "transformer.layers",
        "model.language_model.layers",
    ):
        node = model
        for part in path.split("."):
            node = getattr(node, part, None)
        if isinstance(node, torch.nn.ModuleList) and len(node) == n_layers:
            return node
    for _, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n_layers:
            return module
    raise XprobeError(f"cannot find the {n_layers} decoder blocks of {type(model).__name__}")

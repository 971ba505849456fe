"""Tokenizer loading and fingerprints: two models share a token space only if these agree."""

from __future__ import annotations

import copy
import functools
import hashlib
import json
from pathlib import Path
from typing import Any

from pipeline.errors import XprobeError


def require_local_folder(name: str, what: str) -> None:
    """Refuse, in words, a name that can only be a local path (absolute, ``./``, ``../``, ``~``,
    or more than one ``/``: a hub id is ``org/name``) when nothing is there; transformers would
    otherwise report it as an invalid hub repository id."""
    path = Path(name).expanduser()
    looks_local = name.startswith(("/", "./", "../", "~")) or name.count("/") > 1
    if looks_local and not path.exists():
        raise XprobeError(
            f"the {what} folder {name} does not exist; give an existing local folder (saved with "
            "save_pretrained) or a hub id such as org/name"
        )


def load_tokenizer(name: str, revision: str | None = None, trust_remote_code: bool = False) -> Any:
    """A fast HF tokenizer by hub name, local path, or GGUF file (transformers builds a fast
    tokenizer from the file's ``tokenizer.ggml.*`` metadata; built once per process and file
    version, as parsing the header takes seconds, and handed out as copies)."""
    require_local_folder(name, "tokenizer")
    if str(name).lower().endswith(".gguf") and Path(name).expanduser().is_file():
        path = Path(name).expanduser().resolve()
        return copy.deepcopy(_gguf_tokenizer(str(path), path.stat().st_mtime_ns))
    return _load(name, revision, trust_remote_code)


@functools.lru_cache(maxsize=4)
def _gguf_tokenizer(path: str, mtime_ns: int) -> Any:
    return _load(path, None, False)


def _load(name: str, revision: str | None, trust_remote_code: bool) -> Any:
    from transformers import AutoTokenizer

    from pipeline.inputs.model import pretrained_args

    where, extra = pretrained_args(name)
    try:
        tok = AutoTokenizer.from_pretrained(
            where, revision=revision, trust_remote_code=trust_remote_code, **extra
        )
    except (OSError, ValueError) as e:
        raise XprobeError(f"cannot load tokenizer {name!r}: {e}") from None
    if not getattr(tok, "is_fast", False):
        raise XprobeError(
            f"tokenizer {name!r} has no fast (Rust) version; xprobe needs a tokenizer.json"
        )
    return tok


def tokenizer_spec(tok: Any) -> dict[str, Any]:
    """The parts of a tokenizer that decide token ids: vocabulary, merges, normalisation, specials."""
    spec = json.loads(tok.backend_tokenizer.to_str())
    keep = {k: spec.get(k) for k in ("model", "normalizer", "pre_tokenizer", "added_tokens")}
    keep["special_tokens"] = {
        k: getattr(tok, f"{k}_token_id", None) for k in ("bos", "eos", "pad", "unk")
    }
    return keep


def tokenizer_fingerprint(tok: Any) -> str:
    """sha256 over vocabulary, merges, normaliser/pre-tokeniser and special tokens."""
    blob = json.dumps(tokenizer_spec(tok), sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def vocab(tok: Any) -> dict[int, str]:
    return {i: t for t, i in tok.get_vocab().items()}

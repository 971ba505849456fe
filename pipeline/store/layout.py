"""Where each stage's units live in the store, and safe names for path components."""

from __future__ import annotations

import re

from pipeline.errors import XprobeError

_SAFE = re.compile(r"[^A-Za-z0-9._=+-]+")


def safe_name(name: str) -> str:
    """A store path component from a model/SAE name or path: 'google/gemma-2-2b' -> 'google--gemma-2-2b'."""
    name = name.rstrip("/").replace("/", "--")
    out = _SAFE.sub("_", name).strip("._")
    if not out:
        raise XprobeError(
            f"cannot make a store name from {name!r}; give the stage an explicit name"
        )
    return out


def tokens_unit(corpus: str) -> str:
    return f"tokens/{safe_name(corpus)}"


def acts_unit(corpus: str, model: str, hook: str) -> str:
    return f"acts/{safe_name(corpus)}/{safe_name(model)}/{hook}"


def feats_unit(corpus: str, sae: str) -> str:
    return f"feats/{safe_name(corpus)}/{safe_name(sae)}"


def probes_unit(name: str) -> str:
    return f"probes/{safe_name(name)}"


def matches_unit(name: str) -> str:
    return f"matches/{safe_name(name)}"

"""Where each stage's units live in the store, and safe names for path components."""

from __future__ import annotations

import os
import re

from pipeline.errors import XprobeError

_SAFE = re.compile(r"[^A-Za-z0-9._=+-]+")

RESID_HOOK = re.compile(r"^blocks\.(\d+)\.hook_resid_(post|pre)$")
"""The hooks the activations stage stores: a block's input (``resid_pre``) or output (``resid_post``)."""
RESID_HOOK_ADVICE = (
    "the activations stage stores the residual stream only: blocks.<L>.hook_resid_post (block L's "
    "output) or blocks.<L>.hook_resid_pre (its input)"
)


def safe_name(name: str) -> str:
    """A store path component from a model/SAE name or path: 'google/gemma-2-2b' -> 'google--gemma-2-2b'."""
    name = name.rstrip("/").replace("/", "--")
    out = _SAFE.sub("_", name).strip("._")
    if not out:
        raise XprobeError(
            f"cannot make a store name from {name!r}; give the stage an explicit name"
        )
    return out


def default_name(model: str) -> str:
    """The store name of a model given as a hub name or a local path: the hub name with ``/`` as
    ``--`` (``google--gemma-2-2b``), a local folder's own name (``/data/models/llama-ft/`` ->
    ``llama-ft``)."""
    looks_local = model.startswith(("/", "./", "../", "~")) or os.path.isdir(model)
    if looks_local:
        return safe_name(os.path.basename(os.path.normpath(os.path.expanduser(model))))
    return safe_name(model)


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

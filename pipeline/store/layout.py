"""Where each stage's units live in the store, what arrays they hold, and safe path components."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

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


@dataclass(frozen=True)
class UnitKind:
    """One kind of unit: how many path components name it, which stage writes it, whether it is
    written chunk by chunk (a manifest of ``_done/<i>.json`` markers) or as a whole (its arrays'
    checksums recorded in its provenance at completion), and the arrays it holds."""

    depth: int
    stage: str
    chunked: bool
    arrays: dict[str, str]


UNIT_KINDS: dict[str, UnitKind] = {
    "tokens": UnitKind(
        2,
        "tokenize",
        True,
        {
            "ids": "[n_seq, ctx] int32 token ids",
            "mask": "[n_seq, ctx] bool positions that count (not BOS, not padding)",
            "doc": "[n_seq, ctx] int32 document index (-1: padding)",
            "ids_used": "[n_vocab] bool which ids occur in ids (written at completion)",
            "token_class": "[n_seq, ctx] int8 chat corpora: 0 template, 1 system, 2 user, "
            "3 assistant, 4 other role, -1 padding",
        },
    ),
    "acts": UnitKind(
        4,
        "activations",
        True,
        {
            "x": "[n_tok, d_model] the model's dtype (bfloat16 as uint16 bits)",
            "norm_hist": "[n_chunks, groups, bins] int64 residual norms per log2 bin",
            "norm_max": "[n_chunks, groups] float64 the groups' largest norms",
        },
    ),
    "feats": UnitKind(
        3,
        "features",
        True,
        {
            "idx": "[n_tok, K] int32 active feature ids, ascending, -1 = padding",
            "val": "[n_tok, K] float32 their activations",
            "chunk_stats": "[n_chunks, 4, n_feat] float64 per-chunk partial statistics",
            "excluded": "[n_tok] bool positions excluded for their norm (exclude_norm_above)",
            "chunk_transfer_<B>_{pair,scalars}": "per-chunk direct-transfer sums against B",
            "stats/{count,frequency,mean,max,sum,sum_sq,dead}": "[n_feat]",
            "transfer/<B>/corr": "[n_feat] float64 direct-transfer correlation",
        },
    ),
    "probes": UnitKind(
        2,
        "fit",
        False,
        {
            "<hook>/direction": "[F, d_B] float32 B's direction per feature (the headline model's)",
            "<hook>/{intercept,lam,r2_train,r2_gcv,r2_held_out,pearson_held_out}": "[F] float64",
            "<hook>/{r2_clipped_held_out,auroc_held_out}": "[F] float64 from the held-out pass",
            "<hook>/{r2_held_out_boot,r2_clipped_held_out_boot}": "[F, n_bootstrap] float32",
            "<hook>/{n_active_train,n_active_held_out}": "[F] int64",
            "<hook>/status": "[F] int8 (pipeline/maths/lstsq.py STATUS_*)",
            "<hook>/{lambdas,df,mean_r2_held_out}": "[L] the ridge grid, its hat-matrix traces",
            "<hook>/write_direction": "[F, d_B] float32 slope of B's residual on the feature",
            "<hook>/{write_norm,write_r2}": "[F] float64",
            "<hook>/latent_scale": "[F] float64 Latent Scaling (B in A's width)",
            "<hook>/linear_direction": "[F, d_B] float32 the linear probe (predictor = sae)",
            "<hook>/linear_{intercept,lam,r2_train,r2_gcv,r2_held_out,pearson_held_out}": "[F]",
            "<hook>/linear_{r2_clipped_held_out,auroc_held_out}": "[F] float64",
            "<hook>/linear_{r2_held_out_boot,r2_clipped_held_out_boot}": "[F, n_bootstrap]",
            "<hook>/linear_{df,mean_r2_held_out}": "[L]",
            "<hook>/map_weight": "[d_A, d_B] float32 the affine map B -> A",
            "<hook>/{map_bias,map_lam,map_r2_train}": "[d_A] float64",
            "<hook>/{map_r2_held_out,map_auroc_held_out,map_r2_linear_train}": "[F] float64",
            "<hook>/map_r2_held_out_boot": "[F, n_bootstrap] float32",
            "<hook>/r2_held_out_<class>": "[F] float64 held-out R² on one token class",
            "best_hook": "[F] int32 index into hooks",
        },
    ),
    "matches": UnitKind(
        2,
        "match",
        False,
        {
            "{best_idx,best_corr,mutual,n_positive,count_a}": "[F_A]",
            "{top_idx,top_corr,top_n_coactive}": "[F_A, k]",
            "{b_best_idx,b_best_corr,count_b}": "[F_B]",
        },
    ),
    "causal": UnitKind(  # causal/<fit>/<hook>: one unit per fit and B's hook
        3,
        "export",
        False,
        {
            "{feature,n_contexts}": "[n] int64 A's feature id, contexts it fired on",
            "{alpha,score,cos_steer,cos_null,abs_cos_null,z_steer}": "[n] float64",
            "{dloss_probe,dloss_write,dloss_random}": "[n] float64",
            "top": "[n] bool among the top by score (else a random other)",
        },
    ),
    "report": UnitKind(
        2,
        "report",
        False,
        {
            "{token_r2,token_r2_boot}": "[F] float64, [F, n_bootstrap] the token baseline",
            "{top_value,top_token,top_seq,top_pos}": "[F, n_contexts] top activations",
            "cosines": "[n_columns, F] float64 cached direction cosines",
        },
    ),
}
"""Every top-level group of the store, keyed by its name (``acts/<corpus>/<model>/<hook>``: 4)."""


def unit_of(path: str) -> str:
    """The unit a store path belongs to: ``acts/c/m/blocks.1.hook_resid_post/x`` -> its first 4 parts."""
    parts = path.strip("/").split("/")
    kind = UNIT_KINDS.get(parts[0])
    return "/".join(parts[: kind.depth if kind else len(parts)])


def report_unit(name: str) -> str:
    return f"report/{safe_name(name)}"


def _pattern(key: str) -> re.Pattern[str]:
    """A layout key (``<hook>/{a,b}``, ``transfer/<B>/corr``) as a regex over array paths."""
    out, i = "", 0
    for m in re.finditer(r"<[^>]+>|\{[^}]+\}", key):
        out += re.escape(key[i : m.start()])
        token = m.group(0)
        out += (
            "[^/]+"
            if token[0] == "<"
            else "(" + "|".join(map(re.escape, token[1:-1].split(","))) + ")"
        )
        i = m.end()
    return re.compile(out + re.escape(key[i:]) + "$")


def undeclared(paths: list[str]) -> list[str]:
    """The array paths (``probes/p/blocks.0.hook_resid_post/direction``) that no unit kind's
    layout declares: what a test checks against a finished store, so this table stays true."""
    missing = []
    for path in paths:
        parts = path.strip("/").split("/")
        kind = UNIT_KINDS.get(parts[0])
        inner = "/".join(parts[kind.depth :]) if kind else path
        if kind is None or not any(_pattern(key).match(inner) for key in kind.arrays):
            missing.append(path)
    return missing

"""What a store says about itself, checked before anything acts on it.

A store is often someone else's cache (copied, served, zipped), so every fact read from it is
data to check, never a promise: a unit's provenance (``attrs["xprobe"]``), its arrays' shapes,
chunk grids and dtypes, its chunk markers, a zip's member names. A fact that cannot be true of a
store xprobe wrote is one ``XprobeError``, "the cache URL is malformed: ...", before it can turn
into a traceback or a memory bomb (``set(range(n_chunks))`` with ``n_chunks = 1e11``, a chunk
that claims terabytes).

- ``check_info``: a provenance's types and ranges (cheap: run on every read of it);
- ``check_arrays``: a chunked unit's arrays against its provenance and against the tokens unit of
  its corpus (shapes, chunk rows, dtypes, chunk counts; run once per unit and state);
- ``check_marker``: one chunk marker's record;
- ``check_zip_names``: a zip's member names (no absolute paths, no ``..``).
"""

from __future__ import annotations

import math
from typing import Any

from pipeline.errors import XprobeError

MAX_CHUNKS = 2**22
"""More chunks than any store has (4M chunks of 64 sequences: 268M sequences); a count above it
is refused before ``set(range(n))`` is built."""
MAX_COUNT = 2**53
"""Token and sequence counts, widths: beyond this a number is not a count xprobe wrote."""

INT_FACTS = (
    "n_chunks",
    "n_chunks_planned",
    "n_seq",
    "ctx",
    "chunk_seqs",
    "n_tok",
    "n_counted",
    "n_docs",
    "d_model",
    "n_feat",
    "k",
)
STORED_DTYPES = {"float32": "float32", "float16": "float16", "bfloat16": "uint16"}
"""Activations: the numpy dtype ``x`` is stored in, by the model dtype recorded (as
``pipeline.store.reader.STORED_DTYPE``)."""


def malformed(url: str, what: str) -> XprobeError:
    return XprobeError(
        f"the cache {url} is malformed: {what}. xprobe did not write it so (or it was damaged "
        "since): fetch it again or ask its author to re-share it"
    )


def check_info(url: str, unit: str, info: Any) -> dict[str, Any]:
    """``info`` (a unit's ``attrs["xprobe"]``) as a dict, its counts checked."""
    if not isinstance(info, dict):
        raise malformed(url, f"the provenance of {unit} is a {type(info).__name__}, not a mapping")
    for key in INT_FACTS:
        value = info.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_COUNT:
            raise malformed(url, f"{unit} records {key} = {value!r}, not a count")
    for key in ("n_chunks", "n_chunks_planned"):
        if (info.get(key) or 0) > MAX_CHUNKS:
            raise malformed(
                url, f"{unit} records {key} = {info[key]:,}, more than {MAX_CHUNKS:,} chunks"
            )
    if not isinstance(info.get("complete", False), bool):
        raise malformed(url, f"{unit} records complete = {info['complete']!r}, not true or false")
    return info


def _grid(arr: Any) -> int:
    return math.ceil(arr.shape[0] / arr.chunks[0]) if arr.chunks[0] else -1


def _node(store: Any, path: str) -> Any:
    try:
        return store.root[path]
    except KeyError:
        return None


def check_arrays(store: Any, unit: str, info: dict[str, Any]) -> None:
    """A chunked unit of ``store`` (tokens, acts, feats) against its provenance and the tokens
    unit of its corpus in the same store (when there). Arrays not created yet are skipped."""
    url, kind = store.url, unit.split("/")[0]
    n_chunks = info.get("n_chunks") if info.get("complete") else info.get("n_chunks_planned")

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise malformed(url, f"{unit}: {what}")

    def grid_matches(name: str, arr: Any) -> None:
        need(arr.ndim >= 1 and arr.chunks[0] >= 1, f"{name} has chunks {arr.chunks}")
        if n_chunks is not None and (info.get("complete") or kind != "tokens"):
            need(
                _grid(arr) == n_chunks,
                f"{name} {tuple(arr.shape)} in chunks of {arr.chunks[0]} rows is "
                f"{_grid(arr):,} chunks, but the unit records {n_chunks:,}",
            )

    tinfo = None
    if kind != "tokens" and isinstance(info.get("corpus"), str):
        from pipeline.store.layout import tokens_unit

        tokens = tokens_unit(info["corpus"])
        node = _node(store, tokens)
        if node is not None and "xprobe" in node.attrs:
            tinfo = check_info(url, tokens, node.attrs["xprobe"])
            if not tinfo.get("complete"):
                tinfo = None
    if kind == "tokens":
        n_seq, ctx, chunk_seqs = info.get("n_seq"), info.get("ctx"), info.get("chunk_seqs")
        for name, dtype in (("ids", "int32"), ("mask", "bool"), ("doc", "int32")):
            if (arr := _node(store, f"{unit}/{name}")) is None:
                continue
            need(str(arr.dtype) == dtype, f"{name} has dtype {arr.dtype}, expected {dtype}")
            need(arr.ndim == 2, f"{name} has shape {tuple(arr.shape)}, expected [n_seq, ctx]")
            grid_matches(name, arr)
            if info.get("complete"):
                need(
                    (arr.shape, arr.chunks) == ((n_seq, ctx), (chunk_seqs, ctx)),
                    f"{name} has shape {tuple(arr.shape)} in chunks {arr.chunks}, but the unit "
                    f"records {n_seq} sequences of {ctx} tokens in chunks of {chunk_seqs}",
                )
        return
    arrays = {"acts": ("x",), "feats": ("idx", "val")}.get(kind, ())
    for name in arrays:
        if (arr := _node(store, f"{unit}/{name}")) is None:
            continue
        need(arr.ndim == 2, f"{name} has shape {tuple(arr.shape)}, expected [n_tok, width]")
        grid_matches(name, arr)
        if kind == "acts":
            stored = STORED_DTYPES.get(info.get("dtype"))
            need(stored is not None, f"it records dtype {info.get('dtype')!r}")
            need(str(arr.dtype) == stored, f"x has dtype {arr.dtype}, expected {stored}")
            d = info.get("d_model")
            need(d is None or arr.shape[1] == d, f"x has width {arr.shape[1]}, d_model is {d}")
        else:
            want = "int32" if name == "idx" else "float32"
            need(str(arr.dtype) == want, f"{name} has dtype {arr.dtype}, expected {want}")
        if tinfo is not None:
            rows, n_tok = tinfo["chunk_seqs"] * tinfo["ctx"], tinfo["n_seq"] * tinfo["ctx"]
            need(
                (arr.shape[0], arr.chunks[0]) == (n_tok, rows),
                f"{name} has {arr.shape[0]:,} rows in chunks of {arr.chunks[0]:,}, but its "
                f"tokens unit has {n_tok:,} positions in chunks of {rows:,}",
            )
    if tinfo is not None and n_chunks is not None and kind in ("acts", "feats"):
        need(
            n_chunks == tinfo["n_chunks"],
            f"it records {n_chunks:,} chunks, its tokens unit {tinfo['n_chunks']:,}",
        )


def check_marker(url: str, unit: str, index: int, record: Any) -> dict[str, Any]:
    """A chunk marker's record: a mapping whose checksums are integers."""
    if not isinstance(record, dict):
        raise malformed(url, f"the marker of chunk {index} of {unit} is not a mapping")
    crc = record.get("crc32", {})
    if not isinstance(crc, dict) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in crc.values()
    ):
        raise malformed(url, f"the marker of chunk {index} of {unit} has no valid checksums")
    evicted = record.get("evicted") or []
    if not isinstance(evicted, list) or not all(isinstance(n, str) for n in evicted):
        raise malformed(url, f"the marker of chunk {index} of {unit} has a bad 'evicted' list")
    return record


def check_zip_names(url: str, names: list[str]) -> None:
    """A store zip holds relative member paths inside it only (no ``/x``, ``..``, ``\\``)."""
    for name in names:
        parts = name.split("/")
        if name.startswith("/") or "\\" in name or ".." in parts or ":" in parts[0]:
            raise malformed(url, f"it has a zip member named {name!r} (outside the store)")

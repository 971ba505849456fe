"""Sparse feature activations as stored by the features stage, read back per chunk as COO.

The features unit ``feats/<corpus>/<sae>`` holds fixed-width top-K rows aligned with the tokens:
``idx [n_tok, K] int32`` (-1 = empty slot) and ``val [n_tok, K] float32``.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import numpy as np

from pipeline.lazy import torch
from pipeline.store import Store
from pipeline.store.layout import feats_unit


def load_sparse(
    store: Store, unit: str, index: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chunk ``index`` as COO ``(rows, cols, vals)``: token offset within the chunk, feature, value."""
    idx = store.read_chunk(f"{unit}/idx", index)
    val = store.read_chunk(f"{unit}/val", index)
    rows, slots = np.nonzero(idx >= 0)
    cols = idx[rows, slots]
    vals = val[rows, slots]
    keep = vals != 0
    return (
        torch.from_numpy(rows[keep].astype(np.int64)),
        torch.from_numpy(cols[keep].astype(np.int64)),
        torch.from_numpy(vals[keep].astype(np.float32)),
    )


def select_rows(
    rows: torch.Tensor, cols: torch.Tensor, vals: torch.Tensor, keep: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Restrict COO entries to the token rows where ``keep`` [n_tok_chunk] is true, renumbering rows."""
    new_index = torch.cumsum(keep.to(torch.int64), 0) - 1
    mask = keep[rows]
    return new_index[rows[mask]], cols[mask], vals[mask]


def iter_sparse(
    store: Store, corpus: str, sae_name: str, chunks: Iterable[int] | None = None
) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor]]:
    """A features unit chunk by chunk as ``(index, rows, cols, vals)`` (see :func:`load_sparse`)."""
    unit = feats_unit(corpus, sae_name)
    info = store.info(unit)
    n_chunks = info.get("n_chunks") or info.get("n_chunks_planned")
    for index in range(n_chunks) if chunks is None else chunks:
        yield (index, *load_sparse(store, unit, index))

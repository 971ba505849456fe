"""Each sequence's document, read from the tokens unit, for the split and the bootstrap by document.

The maths (pipeline/maths/split.py, pipeline/maths/evaluate.py) takes per-sequence document ids;
this module reads them from the store: ``tokens/<corpus>/doc [n_seq, ctx]``, a chunk at a time
(one int32 per token read once, memory [n_seq] int64), each sequence given the document that
holds most of its positions. The fit, the report and the export call :func:`split_documents`
with the fit's ``split_by``, so all three see the same held-out sequences and the same replicates.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.maths.split import resolve_split_by, sequence_documents


def corpus_documents(store: Any, tokens: str) -> np.ndarray | None:
    """[n_seq] int64: the document of each sequence of the tokens unit ``tokens`` (-1: padding
    only); None if the unit stores no document ids."""
    if not store.has(f"{tokens}/doc"):
        return None
    info = store.info(tokens)
    parts = [
        sequence_documents(store.read_chunk(f"{tokens}/doc", index))
        for index in range(int(info["n_chunks"]))
    ]
    return np.concatenate(parts)[: int(info["n_seq"])]


def split_documents(store: Any, tokens: str, split_by: str) -> np.ndarray | None:
    """The ``doc_ids`` to give ``held_out_sequences`` and ``bootstrap_weights`` for a fit's
    ``split_by`` ("auto", "document" or "sequence"): [n_seq] int64 when the split is by document,
    None when it is by sequence (as every fit before ``split_by`` was)."""
    if split_by == "sequence":
        return None
    docs = corpus_documents(store, tokens)
    return docs if resolve_split_by(split_by, docs) == "document" else None

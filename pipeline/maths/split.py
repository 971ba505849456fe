"""The held-out split and the documents it keeps whole: shared by the fit (which trains on it),
the report (whose token baseline must be scored on exactly the fit's held-out tokens) and the
export.

By sequence (``split_by = "sequence"``): each sequence is held out with probability ``fraction``,
from one seeded draw over the corpus's sequences. By document (``"document"``): each *document*
is, from a draw keyed by (seed, document id) alone, and every sequence goes with its document
(:func:`sequence_documents`: the one holding most of its positions). Sequences of one document
are correlated (one topic, one author); with ``packing = "pack"`` a long document fills several
neighbouring sequences, and a split by sequence puts them on both sides, so held-out scores and
their intervals are too optimistic. :func:`resolve_split_by` picks "document" where some
document is the main one of several sequences.

Draws keyed by document id (:func:`document_uniform`) are a counter-based hash (splitmix64), not
a generator's stream: the same document gets the same draw in every chunk, every fit and every
corpus order, and the bootstrap (pipeline/maths/evaluate.py) reuses it for its replicate weights.
"""

from __future__ import annotations

import numpy as np

from pipeline.errors import XprobeError

SPLIT_BY = ("auto", "document", "sequence")
"""Values of a fit's ``split_by``; "auto": "document" where documents span several sequences."""
MIN_DOCUMENTS = 20
""""auto" splits by document only with at least this many documents."""
_SPLIT_STREAM = 0  # stream of document_uniform used by the split; the bootstrap uses 1 + replicate
_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(z: np.ndarray) -> np.ndarray:
    """One splitmix64 finaliser step on uint64 (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        z = (z + np.uint64(0x9E3779B97F4A7C15)) & _M64
        z = ((z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)) & _M64
        z = ((z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)) & _M64
        return z ^ (z >> np.uint64(31))


def document_uniform(seed: int, doc_ids: np.ndarray, streams: np.ndarray | int) -> np.ndarray:
    """Uniform [0, 1) draws keyed by (seed, document id, stream) alone: ``doc_ids [n]`` and
    ``streams`` (an int, or [R]) give [n] or [n, R] float64, the same wherever and in whatever
    order they are asked for."""
    doc = np.asarray(doc_ids, dtype=np.int64).astype(np.uint64)  # -1 wraps: still one key
    stream = np.asarray(streams, dtype=np.int64).astype(np.uint64)
    key = _splitmix64(_splitmix64(np.full(1, seed, dtype=np.int64).astype(np.uint64)) ^ doc)
    key = key[:, None] if stream.ndim else key
    bits = _splitmix64(key ^ _splitmix64(stream + np.uint64(0x632BE59BD9B4E019)))
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0**-53


def sequence_documents(doc: np.ndarray) -> np.ndarray:
    """[s] int64: the document of each sequence of ``doc [s, ctx]`` (the tokens unit's document
    index per position, -1 for padding): the one holding most of its positions, the lowest id
    on a tie; -1 for a sequence of padding only."""
    doc = np.asarray(doc)
    n_seq = doc.shape[0]
    out = np.full(n_seq, -1, dtype=np.int64)
    row, col = np.nonzero(doc >= 0)
    if len(row) == 0:
        return out
    ids = doc[row, col].astype(np.int64)
    pairs, counts = np.unique(np.stack([row, ids]), axis=1, return_counts=True)  # by row, id
    order = np.lexsort((pairs[1], -counts, pairs[0]))  # per row: most positions, then lowest id
    first = order[np.r_[True, pairs[0][order][1:] != pairs[0][order][:-1]]]
    out[pairs[0][first]] = pairs[1][first]
    return out


def resolve_split_by(split_by: str, doc_ids: np.ndarray | None) -> str:
    """ "sequence" or "document" for a fit's ``split_by`` (:data:`SPLIT_BY`) given the corpus's
    per-sequence documents ``doc_ids [n_seq]`` (None: not stored): "auto" is "document" where
    some document is the main document of two or more sequences, else "sequence"."""
    if split_by not in SPLIT_BY:
        raise XprobeError(f"split_by must be one of {list(SPLIT_BY)}, got {split_by!r}")
    if split_by == "sequence":
        return split_by
    if doc_ids is None:
        if split_by == "document":
            raise XprobeError(
                'split_by = "document" needs document ids, and these tokens have none; '
                'tokenize again, or set split_by = "sequence"'
            )
        return "sequence"
    if split_by == "document":
        return split_by
    known = doc_ids[doc_ids >= 0]
    n_docs = len(np.unique(known))
    # too few documents to hold some out and resample them: by sequence, as before
    return "document" if n_docs < len(known) and n_docs >= MIN_DOCUMENTS else "sequence"


def held_out_sequences(
    n_seq: int, fraction: float, seed: int, doc_ids: np.ndarray | None = None
) -> np.ndarray:
    """[n_seq] bool: which sequences are held out. Same arguments, same split.

    ``doc_ids`` None: each sequence by itself, from one seeded draw (the split by sequence).
    ``doc_ids [n_seq]`` (:func:`sequence_documents`): whole documents, each held out by its own
    draw keyed by (seed, document id), so all sequences of a document fall on one side."""
    if not 0.0 <= fraction < 1.0:
        raise XprobeError(f"held_out_fraction must be in [0, 1), got {fraction}")
    if doc_ids is None:
        return np.random.default_rng(seed).random(n_seq) < fraction
    doc_ids = np.asarray(doc_ids)
    if doc_ids.shape != (n_seq,):
        raise XprobeError(f"doc_ids has shape {doc_ids.shape}; expected one per sequence ({n_seq})")
    return document_uniform(seed, doc_ids, _SPLIT_STREAM) < fraction

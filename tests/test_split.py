"""The held-out split by sequence and by document (pipeline/maths/split.py) and the per-sequence
documents read from a tokens unit (pipeline/documents.py)."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import XprobeError
from pipeline.maths.split import (
    held_out_sequences,
    resolve_split_by,
    sequence_documents,
)


def test_sequence_documents_is_each_rows_main_document():
    rng = np.random.default_rng(0)
    doc = np.sort(rng.integers(-1, 6, size=(50, 12)), axis=1)
    doc[3] = -1  # padding only
    doc[4] = [2] * 6 + [5] * 6  # a tie: the lowest id
    expected = []
    for row in doc:
        ids, counts = np.unique(row[row >= 0], return_counts=True)
        expected.append(ids[np.argmax(counts)] if len(ids) else -1)
    got = sequence_documents(doc)
    assert got.dtype == np.int64 and got.tolist() == expected
    assert got[3] == -1 and got[4] == 2


def test_document_split_keeps_documents_whole_and_is_keyed_by_document():
    docs = np.repeat(np.arange(3000), 4)  # each document fills 4 sequences
    held = held_out_sequences(len(docs), 0.25, 7, doc_ids=docs)
    per_doc = held.reshape(-1, 4)
    assert (per_doc.all(1) | ~per_doc.any(1)).all()  # never on both sides
    assert abs(per_doc[:, 0].mean() - 0.25) < 0.03
    assert np.array_equal(held, held_out_sequences(len(docs), 0.25, 7, doc_ids=docs))
    # keyed by the document id alone: another order, a subset, the same verdict per document
    order = np.random.default_rng(1).permutation(len(docs))[:500]
    assert np.array_equal(held_out_sequences(500, 0.25, 7, doc_ids=docs[order]), held[order])
    assert not np.array_equal(held, held_out_sequences(len(docs), 0.25, 8, doc_ids=docs))
    by_sequence = held_out_sequences(len(docs), 0.25, 7).reshape(-1, 4)
    assert (by_sequence.any(1) & ~by_sequence.all(1)).mean() > 0.5  # what it fixes
    with pytest.raises(XprobeError, match="one per sequence"):
        held_out_sequences(5, 0.25, 7, doc_ids=docs)


def test_resolve_split_by():
    spanning, one_each = np.repeat(np.arange(20), 2), np.array([0, 1, 2, -1, -1])
    assert resolve_split_by("auto", spanning) == "document"
    assert resolve_split_by("auto", np.array([0, 0, 1, 2])) == "sequence"  # too few documents
    assert resolve_split_by("auto", one_each) == "sequence"  # padding rows do not count
    assert resolve_split_by("auto", None) == "sequence"
    assert resolve_split_by("document", one_each) == "document"
    assert resolve_split_by("sequence", spanning) == "sequence"
    with pytest.raises(XprobeError, match="needs document ids"):
        resolve_split_by("document", None)
    with pytest.raises(XprobeError, match="split_by must be one of"):
        resolve_split_by("token", spanning)


def test_corpus_documents_from_a_tokens_unit(tmp_path, corpus_jsonl, tokenizer_dir):
    """Packed documents longer than ctx: the store's doc ids, read chunk by chunk, give each
    sequence its main document, and "auto" resolves to the split by document."""
    from pipeline.documents import corpus_documents, split_documents
    from pipeline.store import Store
    from tests.helpers import tokenize_small

    store = Store(tmp_path / "store")
    tokenize_small(store, corpus_jsonl, tokenizer_dir, 3000)
    doc = store.array("tokens/c/doc")[:]
    docs = corpus_documents(store, "tokens/c")
    assert np.array_equal(docs, sequence_documents(doc))
    assert len(np.unique(docs)) < len(docs)  # documents span several sequences
    from pipeline.maths.split import MIN_DOCUMENTS

    many = len(np.unique(docs[docs >= 0])) >= MIN_DOCUMENTS
    auto = split_documents(store, "tokens/c", "auto")
    assert np.array_equal(auto, docs) if many else auto is None
    assert split_documents(store, "tokens/c", "sequence") is None
    assert np.array_equal(split_documents(store, "tokens/c", "document"), docs)

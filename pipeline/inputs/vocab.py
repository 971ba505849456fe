"""Whether a model reads a corpus's token ids as the tokens they were: compatibility by ids.

The activations stage feeds B the ids stored in ``tokens/<corpus>``, so what must agree between
the corpus tokenizer and B's is what *those ids* mean, not the whole tokenizer. For every id that
occurs in the corpus (``ids_used``, a bitmap ``[n_vocab] bool`` the tokenize stage records once):

- the id maps to the same token string in both vocabularies, and
- the id is below B's embedding size (``config.vocab_size``: the rows of its input embedding).

Everything else may differ without changing what B sees: the eos/pad/bos/unk choice, a chat
template, tokens added beyond the corpus (an instruct model's ``<|im_start|>``), a resized
embedding, merges or normalisation (B never re-tokenizes). ``compare`` lists those differences
as sentences, recorded in the activations unit's provenance and shown by ``xprobe info`` and in
the report; a difference on used ids is a refusal naming the first ids and both strings.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

SPECIALS = ("bos", "eos", "pad", "unk")


def vocab_from_json(text: str) -> dict[int, str]:
    """``{id: token string}`` of a serialised fast tokenizer (``tokenizer.json``), added tokens
    included."""
    spec = json.loads(text)
    vocab = {int(i): t for t, i in (spec.get("model", {}).get("vocab") or {}).items()}
    for added in spec.get("added_tokens") or []:
        vocab[int(added["id"])] = added["content"]
    return vocab


def tokenizer_facts(tok: Any) -> dict[str, Any]:
    """What ``compare`` reports besides the vocabulary: special tokens ``[id, string]`` (or None),
    the chat template's sha256 (None: no template) and the vocabulary size."""
    facts: dict[str, Any] = {}
    for k in SPECIALS:
        i = getattr(tok, f"{k}_token_id", None)
        facts[k] = None if i is None else [int(i), getattr(tok, f"{k}_token", None)]
    template = getattr(tok, "chat_template", None)
    if isinstance(template, dict):  # named templates: hash them all, in a fixed order
        template = json.dumps(template, sort_keys=True)
    facts["chat_template"] = (
        hashlib.sha256(template.encode()).hexdigest()[:16] if template else None
    )
    facts["n_vocab"] = len(tok)
    return facts


def count_ids(ids: np.ndarray, counts: np.ndarray | None = None) -> np.ndarray:
    """Add the occurrences of every id in ``ids`` (any shape, ids >= 0) to ``counts`` ``[n]``
    int64, grown as needed; returns it. Summed chunk by chunk, memory is O(vocabulary)."""
    flat = np.asarray(ids).reshape(-1)
    new = np.bincount(flat, minlength=0 if counts is None else len(counts)).astype(np.int64)
    if counts is None:
        return new
    if len(new) > len(counts):
        counts = np.concatenate([counts, np.zeros(len(new) - len(counts), np.int64)])
    counts[: len(new)] += new
    return counts


@dataclass
class Compatibility:
    """The verdict of ``compare``: ``problems`` refuse (ids the corpus uses read differently),
    ``differences`` are recorded (nothing the model reads changes)."""

    problems: list[str] = field(default_factory=list)
    differences: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def _show(i: int, vocab: dict[int, str]) -> str:
    return f"{vocab[i]!r}" if i in vocab else "absent"


def _ids_phrase(ids: list[int], vocab: dict[int, str], limit: int = 5) -> str:
    shown = ", ".join(f"{i} {_show(i, vocab)}" for i in ids[:limit])
    return shown + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


def compare(
    corpus_vocab: dict[int, str],
    corpus_facts: dict[str, Any] | None,
    used: np.ndarray,
    model_vocab: dict[int, str],
    model_facts: dict[str, Any],
    n_embed: int | None,
    model: str = "the model",
    limit: int = 5,
) -> Compatibility:
    """Compare the corpus tokenizer with a model's on the ids the corpus uses.

    ``used``: ``[n] bool`` (id i occurs in the corpus iff ``used[i]``); ``n_embed``: the model's
    input embedding rows (None: unknown). ``corpus_facts`` None (a store tokenized before these
    were recorded): special tokens and templates are not compared.
    """
    out = Compatibility()
    used_ids = np.flatnonzero(used)
    too_big = [int(i) for i in used_ids if n_embed is not None and i >= n_embed]
    if too_big:
        out.problems.append(
            f"{len(too_big)} id(s) the corpus uses are beyond {model}'s embedding of {n_embed} rows "
            f"(first: {_ids_phrase(too_big, corpus_vocab, limit)})"
        )
    differ = [int(i) for i in used_ids if corpus_vocab.get(int(i)) != model_vocab.get(int(i))]
    if differ:
        pairs = "; ".join(
            f"id {i} is {_show(i, corpus_vocab)} in the corpus tokenizer but {_show(i, model_vocab)} "
            f"in {model}'s"
            for i in differ[:limit]
        )
        more = f" (and {len(differ) - limit} more)" if len(differ) > limit else ""
        out.problems.append(
            f"{len(differ)} of the {len(used_ids)} ids the corpus uses mean other tokens: {pairs}{more}"
        )
    used_set = set(int(i) for i in used_ids)
    unused_differ = sorted(
        i
        for i in set(corpus_vocab) & set(model_vocab)
        if corpus_vocab[i] != model_vocab[i] and i not in used_set
    )
    if unused_differ:
        i = unused_differ[0]
        out.differences.append(
            f"{len(unused_differ)} id(s) the corpus never uses mean other tokens (first: id {i} "
            f"{corpus_vocab[i]!r} vs {model_vocab[i]!r})"
        )
    extra = sorted(set(model_vocab) - set(corpus_vocab))
    if extra:
        out.differences.append(
            f"{model}'s tokenizer has {len(extra)} token(s) the corpus tokenizer lacks: "
            + _ids_phrase(extra, model_vocab, limit)
        )
    missing = sorted(set(corpus_vocab) - set(model_vocab))
    if missing:
        out.differences.append(
            f"the corpus tokenizer has {len(missing)} token(s) {model}'s lacks, none used by the "
            f"corpus: {_ids_phrase(missing, corpus_vocab, limit)}"
        )
    if n_embed is not None and n_embed != len(corpus_vocab):
        out.differences.append(
            f"{model}'s embedding has {n_embed} rows; the corpus tokenizer has {len(corpus_vocab)} tokens"
        )
    if corpus_facts is None:
        out.differences.append(
            "special tokens and chat templates not compared (the corpus was tokenized before "
            "xprobe recorded them)"
        )
        return out
    for k in SPECIALS:
        a, b = corpus_facts.get(k), model_facts.get(k)
        if a != b:
            say = lambda v: "none" if v is None else f"{v[1]!r} (id {v[0]})"  # noqa: E731
            out.differences.append(
                f"{k} token: {say(a)} in the corpus tokenizer, {say(b)} in {model}'s"
            )
    a, b = corpus_facts.get("chat_template"), model_facts.get("chat_template")
    if a != b:
        say = lambda v: "none" if v is None else f"sha256 {v}"  # noqa: E731
        out.differences.append(
            f"chat template: {say(a)} in the corpus tokenizer, {say(b)} in {model}'s"
        )
    return out


def used_from_counts(counts: np.ndarray, n_vocab: int) -> np.ndarray:
    """``[max(n_vocab, len(counts))] bool``: which ids occur."""
    used = np.zeros(max(n_vocab, len(counts)), bool)
    used[: len(counts)] = counts > 0
    return used


def used_from_chunks(chunks: Iterable[np.ndarray], n_vocab: int) -> np.ndarray:
    """``ids_used`` from stored id chunks (stores tokenized before it was recorded)."""
    counts = np.zeros(0, np.int64)
    for ids in chunks:
        counts = count_ids(ids, counts)
    return used_from_counts(counts, n_vocab)

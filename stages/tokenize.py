"""Tokenize stage: a corpus on disk -> fixed-length token sequences.

Writes ``tokens/<corpus>``:
    ids   [n_seq, ctx] int32   token ids
    mask  [n_seq, ctx] bool    positions that count (not the BOS we prepend, not padding)
    doc   [n_seq, ctx] int32   index of the document each position came from (-1 for padding)
    ids_used [n_vocab] bool    which ids occur anywhere in ``ids`` (written when complete)
    token_class [n_seq, ctx] int8  chat corpora only: 0 template, 1 system, 2 user, 3 assistant,
                               4 other role, -1 padding (``pipeline.inputs.chat``)
and ``tokens/<corpus>/tokenizer.json`` (the tokenizer itself, so a shared cache carries it).

Packing (``packing = "pack"``): documents are concatenated, each followed by EOS (or preceded
by BOS, or nothing: ``separator``), and cut into sequences of ``ctx`` tokens, each starting with
BOS when ``bos = true``; the last partial sequence is padded. ``packing = "document"`` puts one
document per sequence (long documents continue in the next sequences), padded to ``ctx``.

Chat corpora (``chat_template_from``): each document is a conversation (a ``messages`` list of
{role, content}) rendered with that tokenizer's chat template and tokenized with ``tokenizer``;
the ids must equal ``apply_chat_template``'s, and every token's class is stored. Separators and
the prepended BOS are template tokens.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from pipeline.config import canonical, check_fields, path_field, runtime
from pipeline.errors import XprobeError
from pipeline.inputs.chat import TOKEN_CLASSES, render_batch, template_tokenizer
from pipeline.inputs.corpus import iter_conversations, iter_documents, resolve_paths
from pipeline.inputs.tokenizer import load_tokenizer, tokenizer_fingerprint
from pipeline.inputs.vocab import count_ids, tokenizer_facts, used_from_counts
from pipeline.lineage import Input, chat_template_input, files_input, local_ref, tokenizer_input
from pipeline.stage import ChunkedStage
from pipeline.store import Store
from pipeline.store.chunks import ChunkResult
from pipeline.store.layout import tokens_unit


@dataclass(frozen=True)
class TokenizeConfig:
    corpus: str
    """Name of the corpus in the store (``tokens/<corpus>``)."""
    source: tuple[str, ...] = path_field()
    """Files, globs or an HF dataset folder (saved with ``save_to_disk``)."""
    tokenizer: str = path_field(kind="path_or_hub")
    """HF tokenizer: hub name or local path."""
    tokenizer_revision: str | None = None
    format: Literal["auto", "text", "jsonl", "parquet", "hf"] = "auto"
    """Corpus format; ``auto`` decides by file extension."""
    field: str = "text"
    """jsonl field, parquet column or HF dataset column holding the text."""
    hf_split: str | None = None
    """Split of a saved DatasetDict (default ``train``)."""
    text_split: Literal["file", "line", "blank_line"] = "file"
    """For plain text: one document per file, per line, or per blank-line-separated block."""
    encoding_errors: Literal["strict", "replace"] = "strict"
    """Undecodable bytes: ``strict`` stops with the file and offset; ``replace`` uses U+FFFD."""
    ctx: int = 1024
    """Sequence length in tokens."""
    packing: Literal["pack", "document"] = "pack"
    bos: bool = True
    """Start every sequence with the tokenizer's BOS token (masked out)."""
    separator: Literal["eos", "bos", "none"] = "eos"
    """Token between packed documents (a BOS separator is masked out, an EOS one counts)."""
    chunk_seqs: int = 64
    """Sequences per chunk: the unit of work, resumption and storage for every stage."""
    max_tokens: int | None = None
    """Stop once this many counted tokens (the mask: no BOS, no padding) are stored, rounded up
    to whole sequences."""
    chat_template_from: str | None = path_field(None, kind="path_or_hub")
    """Conversations: a tokenizer (hub name or local path, usually the chat model B's) whose chat
    template renders each ``field`` (``messages`` when left at ``text``: a list of {role,
    content}); the token class of every position is stored (``token_class``)."""
    chat_template_revision: str | None = None
    """Hub revision of ``chat_template_from``."""
    batch_docs: int = runtime(512, "documents per tokenizer call")
    progress: bool = runtime(True, "show a progress bar")

    def __post_init__(self) -> None:
        check_fields(self)
        if not self.source:
            raise XprobeError("source is empty: give files, globs, a folder or an HF dataset")
        if self.ctx < 2:
            raise XprobeError(f"ctx must be at least 2, got {self.ctx}")
        if self.chunk_seqs < 1:
            raise XprobeError(f"chunk_seqs must be positive, got {self.chunk_seqs}")
        if self.max_tokens is not None and self.max_tokens < 1:
            raise XprobeError(
                f"max_tokens must be at least 1, got {self.max_tokens}; leave it out for no cap"
            )
        if self.batch_docs < 1:
            raise XprobeError(f"batch_docs must be positive, got {self.batch_docs}")


class _Packer:
    """Turns token lists of successive documents into rows of ``ctx`` ids, mask and doc ids."""

    def __init__(self, cfg: TokenizeConfig, bos_id: int | None, sep_id: int | None, pad_id: int):
        self.cfg, self.bos_id, self.sep_id, self.pad_id = cfg, bos_id, sep_id, pad_id
        self.body = cfg.ctx - (1 if cfg.bos else 0)
        self.ids = np.zeros(0, np.int32)
        self.doc = np.zeros(0, np.int32)
        self.count = np.zeros(0, bool)
        self.cls = np.zeros(0, np.int8)

    def _rows(
        self, ids: np.ndarray, doc: np.ndarray, count: np.ndarray, cls: np.ndarray
    ) -> tuple[np.ndarray, ...]:
        """Rows ``(ids, mask, doc, token class)`` from flat arrays whose length is a multiple of
        ``body`` (pads already added)."""
        n = len(ids) // self.body
        ids, doc, count, cls = (a.reshape(n, self.body) for a in (ids, doc, count, cls))
        if self.cfg.bos:
            ids = np.concatenate([np.full((n, 1), self.bos_id, np.int32), ids], axis=1)
            doc = np.concatenate([doc[:, :1], doc], axis=1)
            count = np.concatenate([np.zeros((n, 1), bool), count], axis=1)
            cls = np.concatenate([np.zeros((n, 1), np.int8), cls], axis=1)
        return ids, count, doc, cls

    def _pad(
        self, ids: np.ndarray, doc: np.ndarray, count: np.ndarray, cls: np.ndarray
    ) -> tuple[np.ndarray, ...]:
        extra = -len(ids) % self.body
        return (
            np.concatenate([ids, np.full(extra, self.pad_id, np.int32)]),
            np.concatenate([doc, np.full(extra, -1, np.int32)]),
            np.concatenate([count, np.zeros(extra, bool)]),
            np.concatenate([cls, np.full(extra, -1, np.int8)]),
        )

    def _flat(
        self, doc_tokens: list[list[int]], first_doc: int, doc_classes: list[np.ndarray]
    ) -> tuple[np.ndarray, ...]:
        sep = self.cfg.separator
        pieces, docs, counts, classes = [], [], [], []
        for k, (toks, cls) in enumerate(zip(doc_tokens, doc_classes, strict=True)):
            toks = np.asarray(toks, np.int32)
            c = np.ones(len(toks), bool)
            if sep == "eos":
                toks, c = np.append(toks, np.int32(self.sep_id)), np.append(c, True)
                cls = np.append(cls, np.int8(0))
            elif sep == "bos":
                toks, c = np.insert(toks, 0, np.int32(self.sep_id)), np.insert(c, 0, False)
                cls = np.insert(cls, 0, np.int8(0))
            pieces.append(toks)
            counts.append(c)
            classes.append(cls)
            docs.append(np.full(len(toks), first_doc + k, np.int32))
        if not pieces:
            return tuple(np.zeros(0, t) for t in (np.int32, np.int32, bool, np.int8))
        return tuple(np.concatenate(a) for a in (pieces, docs, counts, classes))

    def add(
        self,
        doc_tokens: list[list[int]],
        first_doc: int,
        doc_classes: list[np.ndarray] | None = None,
    ) -> tuple[np.ndarray, ...] | None:
        """Rows completed by these documents (None if none). ``doc_classes``: each token's
        class (``pipeline.inputs.chat``; default 0); separators and BOS are 0, padding -1."""
        if doc_classes is None:
            doc_classes = [np.zeros(len(t), np.int8) for t in doc_tokens]
        if self.cfg.packing == "document":
            rows = []
            for k, (toks, cls) in enumerate(zip(doc_tokens, doc_classes, strict=True)):
                if not len(toks):
                    continue
                ids = np.asarray(toks, np.int32)
                rows.append(
                    self._rows(
                        *self._pad(
                            ids,
                            np.full(len(ids), first_doc + k, np.int32),
                            np.ones(len(ids), bool),
                            np.asarray(cls, np.int8),
                        )
                    )
                )
            if not rows:
                return None
            return tuple(np.concatenate([r[j] for r in rows]) for j in range(4))
        flat = self._flat(doc_tokens, first_doc, doc_classes)
        self.ids, self.doc, self.count, self.cls = (
            np.concatenate(p)
            for p in zip((self.ids, self.doc, self.count, self.cls), flat, strict=True)
        )
        n = len(self.ids) // self.body * self.body
        if n == 0:
            return None
        out = self._rows(self.ids[:n], self.doc[:n], self.count[:n], self.cls[:n])
        self.ids, self.doc, self.count, self.cls = (
            a[n:] for a in (self.ids, self.doc, self.count, self.cls)
        )
        return out

    def flush(self) -> tuple[np.ndarray, ...] | None:
        if self.cfg.packing == "document" or len(self.ids) == 0:
            return None
        out = self._rows(*self._pad(self.ids, self.doc, self.count, self.cls))
        self.ids, self.doc, self.count, self.cls = (
            a[:0] for a in (self.ids, self.doc, self.count, self.cls)
        )
        return out


class TokenizeStage(ChunkedStage):
    name = "tokenize"
    cfg: TokenizeConfig

    def __init__(self, cfg: TokenizeConfig):
        super().__init__(cfg)
        self.unit = tokens_unit(cfg.corpus)
        self.chat = cfg.chat_template_from is not None
        self.field = "messages" if self.chat and cfg.field == "text" else cfg.field
        self._tok = None
        self._paths = None

    @property
    def tok(self) -> Any:
        if self._tok is None:
            self._tok = load_tokenizer(self.cfg.tokenizer, self.cfg.tokenizer_revision)
        return self._tok

    @property
    def paths(self) -> list:
        if self._paths is None:
            self._paths = resolve_paths(self.cfg.source)
        return self._paths

    def _special(self) -> tuple[int | None, int | None, int]:
        tok, cfg = self.tok, self.cfg
        bos_id = tok.bos_token_id
        if cfg.bos and bos_id is None:
            raise XprobeError(f"tokenizer {cfg.tokenizer!r} has no BOS token; set bos = false")
        sep_id = None
        if cfg.packing == "pack" and cfg.separator != "none":
            sep_id = tok.eos_token_id if cfg.separator == "eos" else tok.bos_token_id
            if sep_id is None:
                raise XprobeError(
                    f"tokenizer {cfg.tokenizer!r} has no {cfg.separator.upper()} token; set separator"
                )
        pad_id = next(i for i in (tok.pad_token_id, tok.eos_token_id, 0) if i is not None)
        return bos_id, sep_id, pad_id

    def units(self, store: Store) -> dict[str, dict[str, Any]]:
        return {
            self.unit: {
                "corpus": self.cfg.corpus,
                "tokenizer": local_ref(self.cfg.tokenizer),
                "tokenizer_revision": self.cfg.tokenizer_revision,
                "tokenizer_fingerprint": tokenizer_fingerprint(self.tok),
                "tokenizer_facts": tokenizer_facts(self.tok),
                **(
                    {
                        "chat_template_from": local_ref(self.cfg.chat_template_from),
                        "token_classes": TOKEN_CLASSES,
                    }
                    if self.chat
                    else {}
                ),
                "ctx": self.cfg.ctx,
                "chunk_seqs": self.cfg.chunk_seqs,
                "dtype": "int32",
            }
        }

    def identity(self) -> Any:
        """The config, without the chat fields when unused (so stores tokenized before they
        existed keep their config fingerprint)."""
        out = canonical(self.cfg)
        if not self.chat:
            del out["chat_template_from"], out["chat_template_revision"]
        return out

    def inputs(self, store: Store) -> dict[str, Input]:
        cfg = self.cfg
        out = {
            "corpus": files_input(self.paths),
            "tokenizer": tokenizer_input(
                cfg.tokenizer, cfg.tokenizer_revision, tokenizer_fingerprint(self.tok)
            ),
        }
        if self.chat:
            out["chat_template"] = chat_template_input(
                cfg.chat_template_from, cfg.chat_template_revision
            )
        return out

    def validate(self, store: Store) -> None:
        self._special()

    def prepare(self, store: Store) -> int | None:
        cfg = self.cfg
        prov = store.info(self.unit)
        chunks = (cfg.chunk_seqs, cfg.ctx)
        for name, dtype, fill in (
            ("ids", "int32", 0),
            ("mask", "bool", False),
            ("doc", "int32", -1),
        ):
            store.create_array(
                f"{self.unit}/{name}", (0, cfg.ctx), chunks, dtype, prov, fill_value=fill
            )
        if self.chat:
            store.create_array(
                f"{self.unit}/token_class", (0, cfg.ctx), chunks, "int8", prov, fill_value=-1
            )
        store.write_text(f"{self.unit}/tokenizer.json", self.tok.backend_tokenizer.to_str())
        return None

    def _documents(self) -> Iterator[list[str]]:
        cfg = self.cfg
        batch: list[str] = []
        for doc in iter_documents(
            self.paths, cfg.format, self.field, cfg.text_split, cfg.encoding_errors, cfg.hf_split
        ):
            batch.append(doc)
            if len(batch) == cfg.batch_docs:
                yield batch
                batch = []
        if batch:
            yield batch

    def _conversations(self) -> Iterator[tuple[list[list[int]], list[np.ndarray]]]:
        """Batches of conversations rendered with the chat template: ids and token classes."""
        cfg = self.cfg
        template = template_tokenizer(
            load_tokenizer(cfg.chat_template_from, cfg.chat_template_revision),
            cfg.chat_template_from,
        )
        batch: list[tuple[str, list[dict[str, str]]]] = []
        for item in iter_conversations(
            self.paths, cfg.format, self.field, cfg.encoding_errors, cfg.hf_split
        ):
            batch.append(item)
            if len(batch) == cfg.batch_docs:
                yield render_batch([m for _, m in batch], self.tok, template, [w for w, _ in batch])
                batch = []
        if batch:
            yield render_batch([m for _, m in batch], self.tok, template, [w for w, _ in batch])

    def _sequences(self) -> Iterator[tuple[np.ndarray, ...]]:
        packer = _Packer(self.cfg, *self._special())
        first_doc = 0
        batches = (
            self._conversations()
            if self.chat
            else (
                (self.tok(b, add_special_tokens=False)["input_ids"], None)
                for b in self._documents()
            )
        )
        for encoded, classes in batches:
            rows = packer.add(encoded, first_doc, classes)
            first_doc += len(encoded)
            if rows is not None:
                yield rows
        if first_doc == 0:
            raise XprobeError(f"corpus {self.cfg.source} holds no documents; nothing to tokenize")
        rows = packer.flush()
        if rows is not None:
            yield rows

    def compute(self, store: Store, todo: Callable[[int], bool]) -> Iterator[ChunkResult]:
        cfg = self.cfg
        buffers: list[tuple[np.ndarray, ...]] = []
        buffered = index = n_seq = n_counted = 0
        self.n_chunks = 0

        def take(n: int) -> ChunkResult | None:
            nonlocal buffers, buffered, index
            ids, mask, doc, cls = (np.concatenate([b[j] for b in buffers]) for j in range(4))
            result = None
            if todo(index):
                arrays = {
                    f"{self.unit}/ids": ids[:n],
                    f"{self.unit}/mask": mask[:n],
                    f"{self.unit}/doc": doc[:n],
                }
                if self.chat:
                    arrays[f"{self.unit}/token_class"] = cls[:n]
                result = ChunkResult(index, arrays, n_tok=int(n * cfg.ctx))
            buffers = [(ids[n:], mask[n:], doc[n:], cls[n:])] if n < len(ids) else []
            buffered -= n
            index += 1
            return result

        for rows in self._sequences():
            counted = np.cumsum(rows[1].sum(axis=1)) + n_counted
            if cfg.max_tokens is not None:  # the sequence that reaches max_tokens is the last
                rows = tuple(r[: int(np.searchsorted(counted, cfg.max_tokens)) + 1] for r in rows)
            buffers.append(rows)
            buffered += len(rows[0])
            n_seq += len(rows[0])
            n_counted = int(counted[len(rows[0]) - 1]) if len(rows[0]) else n_counted
            while buffered >= cfg.chunk_seqs:
                if (result := take(cfg.chunk_seqs)) is not None:
                    yield result
            if cfg.max_tokens is not None and n_counted >= cfg.max_tokens:
                break
        if buffered:
            if (result := take(buffered)) is not None:
                yield result
        if n_seq == 0:
            raise XprobeError(f"corpus {self.cfg.source} gave no tokens; nothing to tokenize")
        self.n_chunks, self.n_seq = index, n_seq

    def finalize(self, store: Store, n_chunks: int | None) -> dict[str, Any]:
        import hashlib

        for name in ("ids", "mask", "doc") + (("token_class",) if self.chat else ()):
            arr = store.array(f"{self.unit}/{name}")
            if arr.shape[0] != self.n_seq:
                arr.resize((self.n_seq, self.cfg.ctx))
        # The corpus fingerprint is the identity of the token stream itself (ids and mask), built
        # from the per-chunk checksums, so every downstream array can name exactly what it saw.
        h = hashlib.sha256()
        for i in range(self.n_chunks):
            crc = store.chunk_record(self.unit, i)["crc32"]
            h.update(f"{crc['ids']}:{crc['mask']};".encode())
        n_tok = int(sum(store.chunk_record(self.unit, i)["n_tok"] for i in range(self.n_chunks)))
        mask, ids = store.array(f"{self.unit}/mask"), store.array(f"{self.unit}/ids")
        doc = store.array(f"{self.unit}/doc")
        counted, counts = 0, np.zeros(0, np.int64)
        for a in range(0, self.n_seq, 4096):
            counted += int(mask[a : a + 4096].sum())
            counts = count_ids(ids[a : a + 4096], counts)
        n_docs = 1 + max(int(doc[a : a + 4096].max()) for a in range(0, self.n_seq, 4096))
        # which ids occur (BOS, separators and padding included: B reads them all), so that a
        # model's tokenizer is checked on these ids only (pipeline/inputs/vocab.py)
        used = used_from_counts(counts, len(self.tok))
        store.create_array(
            f"{self.unit}/ids_used", used.shape, used.shape, "bool", store.info(self.unit)
        )[:] = used
        return {
            "n_ids_used": int(used.sum()),
            "n_chunks": self.n_chunks,
            "n_seq": self.n_seq,
            "n_tok": n_tok,
            "n_counted": counted,
            "n_docs": n_docs,
            "corpus_fingerprint": h.hexdigest()[:16],
        }


def run(
    cfg: TokenizeConfig, store: Store, force: bool = False, rebuild_stale: bool = False
) -> dict[str, Any]:
    from pipeline import lifecycle

    return lifecycle.run(
        TokenizeStage(cfg), store, force=force, rebuild_stale=rebuild_stale, progress=cfg.progress
    )

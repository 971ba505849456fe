"""Documents from a corpus on disk: text files or globs, jsonl, parquet, or an HF dataset.

Documents come out in a fixed order (paths sorted after glob expansion), so tokenizing the same
inputs always gives the same arrays.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
from collections.abc import Iterator
from pathlib import Path

from pipeline.errors import XprobeError

FORMATS = ("auto", "text", "jsonl", "parquet", "hf")


def resolve_paths(sources: tuple[str, ...]) -> list[Path]:
    """Expand globs; every source must match something."""
    paths: list[Path] = []
    for source in sources:
        matches = sorted(glob.glob(os.path.expanduser(source), recursive=True))
        if not matches:
            raise XprobeError(f"corpus source {source!r} matches no file; check the path or glob")
        paths.extend(Path(m) for m in matches)
    return paths


def detect_format(path: Path) -> str:
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            return "hf"
        raise XprobeError(f"{path} is a folder but not an HF dataset saved with save_to_disk")
    suffixes = "".join(path.suffixes[-2:]).lower()
    if suffixes.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    if suffixes.endswith(".parquet"):
        return "parquet"
    return "text"


def source_fingerprint(paths: list[Path]) -> str:
    """A cheap identity of the inputs (path, size, mtime) to refuse resuming on changed files."""
    h = hashlib.sha256()
    for p in paths:
        st = p.stat()
        h.update(f"{p.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _decode(raw: bytes, path: Path, errors: str) -> str:
    try:
        return raw.decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        raise XprobeError(
            f"{path}: byte {e.start} is not valid UTF-8 ({raw[e.start : e.start + 4]!r}); fix the file or set "
            'encoding_errors = "replace" to substitute U+FFFD'
        ) from None


def _text_docs(path: Path, split: str, errors: str) -> Iterator[str]:
    text = _decode(path.read_bytes(), path, errors)
    if split == "file":
        yield text
    elif split == "line":
        yield from (line for line in text.splitlines() if line.strip())
    else:  # blank_line
        yield from (block for block in text.split("\n\n") if block.strip())


def _jsonl_docs(path: Path, field: str, errors: str) -> Iterator[str]:
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(_decode(raw, path, errors))
            except json.JSONDecodeError as e:
                raise XprobeError(f"{path} line {lineno} is not valid JSON: {e}") from None
            if not isinstance(record, dict) or field not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise XprobeError(
                    f"{path} line {lineno} has no field {field!r} (it has {keys}); set field = ..."
                )
            value = record[field]
            if not isinstance(value, str):
                raise XprobeError(
                    f"{path} line {lineno}: field {field!r} is {type(value).__name__}, not text"
                )
            yield value


def _parquet_docs(path: Path, column: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:  # pyarrow raises several types for unreadable files
        raise XprobeError(f"cannot read parquet file {path}: {e}") from None
    if column not in pf.schema_arrow.names:
        raise XprobeError(
            f"{path} has no column {column!r} (columns: {pf.schema_arrow.names}); set field = ..."
        )
    for batch in pf.iter_batches(columns=[column], batch_size=1024):
        for value in batch.column(0).to_pylist():
            if value is not None:
                yield value


def _hf_docs(path: Path, column: str, split: str | None) -> Iterator[str]:
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        name = split or ("train" if "train" in ds else None)
        if name not in ds:
            raise XprobeError(f"{path} holds splits {list(ds)}; set hf_split to one of them")
        ds = ds[name]
    if column not in ds.column_names:
        raise XprobeError(
            f"{path} has no column {column!r} (columns: {ds.column_names}); set field = ..."
        )
    for batch in ds.iter(batch_size=1024):
        yield from (v for v in batch[column] if v is not None)


def iter_documents(
    paths: list[Path],
    fmt: str = "auto",
    field: str = "text",
    text_split: str = "file",
    encoding_errors: str = "strict",
    hf_split: str | None = None,
) -> Iterator[str]:
    """Every document of the corpus in a deterministic order."""
    for path in paths:
        kind = detect_format(path) if fmt == "auto" else fmt
        if kind == "text":
            yield from _text_docs(path, text_split, encoding_errors)
        elif kind == "jsonl":
            yield from _jsonl_docs(path, field, encoding_errors)
        elif kind == "parquet":
            yield from _parquet_docs(path, field)
        elif kind == "hf":
            yield from _hf_docs(path, field, hf_split)
        else:
            raise XprobeError(f"unknown corpus format {kind!r}; use one of {FORMATS}")


def _jsonl_values(path: Path, field: str, errors: str) -> Iterator[tuple[str, object]]:
    """``(where, record[field])`` of every line, of any JSON type."""
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                record = json.loads(_decode(raw, path, errors))
            except json.JSONDecodeError as e:
                raise XprobeError(f"{path} line {lineno} is not valid JSON: {e}") from None
            if not isinstance(record, dict) or field not in record:
                keys = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise XprobeError(
                    f"{path} line {lineno} has no field {field!r} (it has {keys}); set field = ..."
                )
            yield f"{path} line {lineno}", record[field]


def iter_conversations(
    paths: list[Path],
    fmt: str = "auto",
    field: str = "messages",
    encoding_errors: str = "strict",
    hf_split: str | None = None,
) -> Iterator[tuple[str, list[dict[str, str]]]]:
    """Every conversation (``field``: a list of ``{role, content}`` messages) of jsonl, parquet
    or HF dataset inputs, in a deterministic order, each with where it came from."""
    from pipeline.inputs.chat import check_messages

    for path in paths:
        kind = detect_format(path) if fmt == "auto" else fmt
        if kind == "jsonl":
            values: Iterator[tuple[str, object]] = _jsonl_values(path, field, encoding_errors)
        elif kind == "parquet":
            values = ((f"{path} row {i}", v) for i, v in enumerate(_parquet_docs(path, field)))
        elif kind == "hf":
            values = ((f"{path} row {i}", v) for i, v in enumerate(_hf_docs(path, field, hf_split)))
        else:
            raise XprobeError(
                f"{path}: conversations are read from jsonl, parquet or an HF dataset, not {kind}"
            )
        for where, value in values:
            yield where, check_messages(value, where)

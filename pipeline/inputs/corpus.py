"""Documents from a corpus on disk: text files, folders or globs, jsonl, parquet, or an HF dataset.

Documents come out in a fixed order (paths sorted after glob expansion; a folder that is not an HF
dataset stands for every file under it, sorted, hidden ones skipped), so tokenizing the same inputs
always gives the same arrays. Text and jsonl files may be compressed: ``.gz``, ``.bz2``, ``.xz``,
``.zst`` (decided by extension; a ``.zst`` file is decompressed in memory with numcodecs' zstd).
"""

from __future__ import annotations

import bz2
import glob
import gzip
import io
import json
import lzma
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO

from pipeline.errors import XprobeError

FORMATS = ("auto", "text", "jsonl", "parquet", "hf")
COMPRESSED = (".gz", ".bz2", ".xz", ".zst")
_MAGIC = {
    b"\x1f\x8b": "gzip",
    b"BZh": "bzip2",
    b"\xfd7zXZ": "xz",
    b"\x28\xb5\x2f\xfd": "zstd",
    b"PK\x03\x04": "zip",
    b"PAR1": "parquet",
}


def _is_hf_dataset(path: Path) -> bool:
    return (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()


def _folder_files(folder: Path) -> list[Path]:
    """Every file under ``folder``, sorted, skipping hidden files and folders."""
    files = []
    for root, dirs, names in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        files += [Path(root) / n for n in sorted(names) if not n.startswith(".")]
    return sorted(files)


def resolve_paths(sources: tuple[str, ...]) -> list[Path]:
    """Expand globs and folders (an HF dataset folder stays one source); every source must match
    something."""
    paths: list[Path] = []
    for source in sources:
        matches = sorted(glob.glob(os.path.expanduser(source), recursive=True))
        if not matches:
            raise XprobeError(f"corpus source {source!r} matches no file; check the path or glob")
        for match in map(Path, matches):
            if match.is_dir() and not _is_hf_dataset(match):
                files = _folder_files(match)
                if not files:
                    raise XprobeError(f"corpus folder {match} holds no files")
                paths.extend(files)
            else:
                paths.append(match)
    return paths


def detect_format(path: Path) -> str:
    if path.is_dir():
        if _is_hf_dataset(path):
            return "hf"
        raise XprobeError(f"{path} is a folder but not an HF dataset saved with save_to_disk")
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] in COMPRESSED:
        suffixes = suffixes[:-1]
    suffixes = "".join(suffixes[-2:])
    if suffixes.endswith((".jsonl", ".json", ".ndjson")):
        return "jsonl"
    if suffixes.endswith(".parquet"):
        return "parquet"
    return "text"


def _open(path: Path) -> IO[bytes]:
    """``path`` opened for reading bytes, decompressed by its extension."""
    suffix = path.suffix.lower()
    if suffix == ".gz":
        return gzip.open(path, "rb")
    if suffix == ".bz2":
        return bz2.open(path, "rb")
    if suffix == ".xz":
        return lzma.open(path, "rb")
    if suffix == ".zst":
        from numcodecs import Zstd

        try:
            return io.BytesIO(Zstd().decode(path.read_bytes()))
        except RuntimeError as e:
            raise XprobeError(f"{path} is not a valid zstd file: {e}") from None
    return path.open("rb")


def _binary_kind(raw: bytes) -> str | None:
    """What non-text data ``raw`` (the start of a file) looks like, or None if it may be text."""
    for magic, kind in _MAGIC.items():
        if raw.startswith(magic):
            return f"{kind} data"
    return "binary data (it holds NUL bytes)" if b"\x00" in raw[:8192] else None


def _refuse_binary(start: bytes, path: Path) -> None:
    """Stop at a file that is not text (whatever ``encoding_errors`` says: replacing its bytes
    would tokenize garbage)."""
    if (kind := _binary_kind(start)) is not None:
        raise XprobeError(
            f"{path} is not text: it looks like {kind}. Give text, jsonl or parquet files "
            f"(compressed ones named by their compression: {', '.join(COMPRESSED)}), or set "
            "format if the extension misleads."
        )


def _decode(raw: bytes, path: Path, errors: str, offset: int = 0) -> str:
    try:
        return raw.decode("utf-8", errors=errors)
    except UnicodeDecodeError as e:
        raise XprobeError(
            f"{path}: byte {offset + e.start} is not valid UTF-8 ({raw[e.start : e.start + 4]!r}); "
            'fix the file or set encoding_errors = "replace" to substitute U+FFFD'
        ) from None


def _text_docs(path: Path, split: str, errors: str) -> Iterator[str]:
    with _open(path) as f:
        raw = _read(f, path)
    _refuse_binary(raw, path)
    text = _decode(raw, path, errors)
    if split == "file":
        yield text
    elif split == "line":
        yield from (line for line in text.splitlines() if line.strip())
    else:  # blank_line
        yield from (block for block in text.split("\n\n") if block.strip())


def _read(f: IO[bytes], path: Path) -> bytes:
    try:
        return f.read()
    except (OSError, EOFError, lzma.LZMAError) as e:  # a corrupt or truncated archive
        raise XprobeError(f"cannot decompress {path}: {e}") from None


def _lines(f: IO[bytes], path: Path) -> Iterator[bytes]:
    try:
        yield from f
    except (OSError, EOFError, lzma.LZMAError) as e:  # a corrupt or truncated archive
        raise XprobeError(f"cannot decompress {path}: {e}") from None


def _jsonl_docs(path: Path, field: str, errors: str) -> Iterator[str]:
    for where, value in _jsonl_values(path, field, errors):
        if not isinstance(value, str):
            raise XprobeError(f"{where}: field {field!r} is {type(value).__name__}, not text")
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
    """``(where, record[field])`` of every line, of any JSON type (compressed files read through,
    binary data refused by name)."""
    with _open(path) as f:
        offset = 0
        for lineno, raw in enumerate(_lines(f, path), 1):
            start, offset = offset, offset + len(raw)
            if start == 0:
                _refuse_binary(raw, path)
            if not raw.strip():
                continue
            try:
                record = json.loads(_decode(raw, path, errors, start))
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

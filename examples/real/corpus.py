"""Real English text found on this machine, as jsonl documents for the tokenize stage.

Three sources, each in a fixed (hash) order, taken in turn so any prefix holds all three
equally:

* ``debian``: package documentation under ``/usr/share/doc`` (READMEs, ``*.txt``/``*.md``/``*.rst``,
  upstream and Debian changelogs); licence files (``copyright``) are left out: the same few
  licences thousands of times;
* ``man``: English manual pages (``/usr/share/man/man[1-8]``), roff markup stripped; of the
  thousands of near-identical generated ``gcloud`` pages, one in ``GCLOUD_EVERY``;
* ``python``: the docstrings of the Python standard library (``pipeline.demo.corpus``).

Each document is cut at ``MAX_DOC_BYTES`` so no single changelog dominates. One document in
``HELD_OUT_EVERY`` (by a hash of its name) goes to the held-out corpus the SAE is scored on.
The finetune's domain is the stdlib's *code* (docstrings removed), in ``code_documents``.
"""

from __future__ import annotations

import gzip
import hashlib
import itertools
import json
import re
from collections.abc import Iterator
from pathlib import Path

MAX_DOC_BYTES = 12_000
GCLOUD_EVERY = 100
HELD_OUT_EVERY = 10
_DOC_NAMES = re.compile(r"^(README.*|.*\.(txt|md|rst)|changelog.*|NEWS.*)$", re.IGNORECASE)
_ROFF_ESCAPES = re.compile(r"\\f[BIRPC0-9]|\\f\[[A-Z]*\]|\\s[+-]?\d|\\[&|^%]|\\\*\(..|\\\*.")


def _read(path: Path) -> str:
    raw = gzip.open(path).read() if path.suffix == ".gz" else path.read_bytes()
    return raw[: 4 * MAX_DOC_BYTES].decode("utf-8", errors="replace")


def _debian_docs(root: Path = Path("/usr/share/doc")) -> Iterator[tuple[str, str]]:
    for path in sorted(root.rglob("*")):
        name = path.name.removesuffix(".gz")
        if path.is_file() and not path.is_symlink() and _DOC_NAMES.match(name):
            yield f"debian:{path.relative_to(root)}", _read(path)


def strip_roff(text: str) -> str:
    """A manual page's words: macros' arguments kept, comments and font escapes dropped."""
    out = []
    for line in text.splitlines():
        if line.startswith(('.\\"', "'\\\"", '.\\\\"')):
            continue
        if line.startswith((".", "'")):
            parts = line[1:].split(None, 1)
            line = parts[1] if len(parts) == 2 and parts[0] in _KEEP_ARGS else ""
            line = line.replace('"', "")
        line = _ROFF_ESCAPES.sub("", line).replace("\\-", "-").replace("\\(em", "--")
        line = line.replace("\\e", "\\").replace("\\ ", " ")
        if line.strip() or (out and out[-1]):
            out.append(line)
    return "\n".join(out).strip()


_KEEP_ARGS = {"SH", "SS", "TP", "IP", "B", "I", "BR", "IR", "RB", "RI", "BI", "IB", "SM", "TH"}


def _man_pages(root: Path = Path("/usr/share/man")) -> Iterator[tuple[str, str]]:
    for section in sorted(root.glob("man[1-8]")):
        for path in sorted(section.iterdir()):
            if path.name.startswith("gcloud") and int(_order(path.name)[:8], 16) % GCLOUD_EVERY:
                continue
            if path.is_file() and not path.is_symlink():
                text = strip_roff(_read(path))
                if not text.startswith(".so"):  # a page that only includes another
                    yield f"man:{path.name}", text


def _python_docs() -> Iterator[tuple[str, str]]:
    from pipeline.demo.corpus import stdlib_documents

    for doc in stdlib_documents(10**9, kinds=("prose",)):
        yield f"python:{doc['module']}", doc["text"]


def _order(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()


def write_corpora(out: Path, max_bytes: int) -> dict[str, dict[str, int]]:
    """``out/docs.jsonl`` and ``out/heldout.jsonl`` (fields text, id, source), at most
    ``max_bytes`` of text in all; returns documents and bytes per source and split."""
    by_source = []
    for source in (_debian_docs(), _man_pages(), _python_docs()):
        docs = [(_order(name), name, text[:MAX_DOC_BYTES].strip()) for name, text in source]
        by_source.append(sorted(d for d in docs if len(d[2]) >= 300))
    docs = [d for group in itertools.zip_longest(*by_source) for d in group if d is not None]
    counts: dict[str, dict[str, int]] = {}
    total = 0
    out.mkdir(parents=True, exist_ok=True)
    with (out / "docs.jsonl").open("w") as train, (out / "heldout.jsonl").open("w") as held:
        for key, name, text in docs:
            if total >= max_bytes:
                break
            split = "heldout" if int(key[:8], 16) % HELD_OUT_EVERY == 0 else "docs"
            source = name.split(":", 1)[0]
            (held if split == "heldout" else train).write(
                json.dumps({"text": text, "id": name, "source": source}) + "\n"
            )
            c = counts.setdefault(f"{split}/{source}", {"docs": 0, "bytes": 0})
            c["docs"] += 1
            c["bytes"] += len(text)
            total += len(text)
    return counts


def code_documents(max_bytes: int) -> list[str]:
    """The finetune's domain: stdlib source code with its docstrings removed."""
    from pipeline.demo.corpus import stdlib_documents

    return [d["text"] for d in stdlib_documents(max_bytes, kinds=("code",))]

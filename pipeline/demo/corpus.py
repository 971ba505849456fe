"""Demo material built from what every machine has: the Python standard library.

``stdlib_documents`` turns each stdlib module into two documents: its docstrings (prose) and its
source with the docstrings removed (code); ``stdlib_jsonl`` writes them for the tokenize stage.
The demo's models are trained on these, the finetuned model on the code alone, and
``xprobe demo`` tokenizes a fresh copy at run time, so no text is committed. ``train_bpe`` trains
the byte-level BPE tokenizer the models share. ``stdlib_corpus`` (raw top-level sources) is the
worked example's and the benchmarks' corpus."""

from __future__ import annotations

import ast
import inspect
import json
import sysconfig
from collections.abc import Iterator
from pathlib import Path

_SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}
_SKIP_DIRS |= {"encodings", "pydoc_data"}  # codec tables, generated help: neither prose nor code
_QUOTES = ('"', "'", 'r"', "r'", 'u"', "u'", 'b"', "b'")


def _stdlib_files() -> list[Path]:
    """The stdlib's ``*.py`` files (no tests, no site-packages), in a fixed order."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    files = [p for p in lib.rglob("*.py") if not _SKIP_DIRS & set(p.relative_to(lib).parts[:-1])]
    return sorted(files, key=lambda p: p.relative_to(lib).as_posix())


def split_docstrings(source: str) -> tuple[str, str]:
    """``(prose, code)``: a module's docstrings joined by blank lines, and its source without them.

    Docstrings that share a line with code (``def f(): "doc"``) stay in the code.
    """
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    docs, drop = [], set()
    for node in ast.walk(tree):
        if (
            not isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef))
            or not node.body
        ):
            continue
        first = node.body[0]
        if not (
            isinstance(first, ast.Expr)
            and isinstance(first.value, ast.Constant)
            and isinstance(first.value.value, str)
        ):
            continue
        docs.append((first.lineno, inspect.cleandoc(first.value.value)))
        if lines[first.lineno - 1].lstrip().startswith(_QUOTES):
            drop.update(range(first.lineno - 1, first.end_lineno))
    prose = "\n\n".join(text for _, text in sorted(docs) if text)
    code = "".join(line for i, line in enumerate(lines) if i not in drop)
    return prose, code


def stdlib_documents(
    max_bytes: int, kinds: tuple[str, ...] = ("prose", "code"), skip_bytes: int = 0
) -> Iterator[dict]:
    """``{"text", "kind", "module"}`` documents from the stdlib in a fixed order, ``max_bytes`` at
    most (counting only the kinds asked for). ``skip_bytes`` leaves out the documents that
    ``stdlib_documents(skip_bytes)`` would give (a disjoint continuation). Files that do not parse
    are skipped."""
    total, skipped, skipping = 0, 0, skip_bytes > 0
    for path in _stdlib_files():
        try:
            prose, code = split_docstrings(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        module = path.with_suffix("").name
        for kind, text in (("prose", prose), ("code", code)):
            if kind not in kinds or len(text) < 200:
                continue
            if skipping and skipped + len(text) <= skip_bytes:
                skipped += len(text)
                continue
            skipping = False
            if total + len(text) > max_bytes:
                return
            total += len(text)
            yield {"text": text, "kind": kind, "module": module}


def stdlib_jsonl(
    out: Path, max_bytes: int, kinds: tuple[str, ...] = ("prose", "code"), skip_bytes: int = 0
) -> Path:
    """Write :func:`stdlib_documents` as jsonl (one document per line, fields text/kind/module)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        for doc in stdlib_documents(max_bytes, kinds, skip_bytes):
            f.write(json.dumps(doc) + "\n")
    return out


def stdlib_corpus(out: Path, max_bytes: int) -> Path:
    """Write the stdlib's top-level ``*.py`` sources (sorted, up to ``max_bytes``) as jsonl: the
    raw corpus of the worked example and the benchmarks."""
    lib = Path(sysconfig.get_paths()["stdlib"])
    total = 0
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        for path in sorted(lib.glob("*.py")):
            text = path.read_text(errors="replace")
            f.write(json.dumps({"text": text}) + "\n")
            total += len(text)
            if total >= max_bytes:
                break
    return out


def train_bpe(corpus: Path, out: Path, vocab_size: int = 4096) -> Path:
    """A byte-level BPE tokenizer trained on a jsonl corpus, saved as an HF tokenizer folder."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = [json.loads(line)["text"] for line in corpus.open()]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<|endoftext|>", eos_token="<|endoftext|>"
    )
    fast.save_pretrained(out)
    return out

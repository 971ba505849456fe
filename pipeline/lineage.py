"""Lineage: what a unit was computed from, and whether any of it has changed since.

Every unit records, in its provenance, ``lineage = {name: record}``: one record per input, each
with the input's identity at the time (``fingerprint``) and what is needed to compute that
identity again without the stage's config (so ``xprobe status`` can check any store):

    {"kind": "unit",  "ref": "acts/c/m/blocks.1.hook_resid_post", "fingerprint": ...}
    {"kind": "model", "ref": "/models/gemma" or "google/gemma-2-2b", "revision": ..., "fingerprint": ...}
    {"kind": "sae",   "ref": "/saes/res16k" or "gemma-scope-2b-pt-res-canonical/layer_6/width_16k/canonical", ...}
    {"kind": "files", "ref": ["/data/a.jsonl", ...], "fingerprint": ...}
    {"kind": "tokenizer", "ref": "google/gemma-2-2b", "revision": ..., "fingerprint": ...}
    {"kind": "chat_template", "ref": "google/gemma-2-2b-it", "revision": ..., "fingerprint": ...}

Identities:

- a unit: its ``content_fingerprint``, recorded at completion (a hash of its chunk checksums, or
  of its arrays' crc32s for whole units; ``Store.mark_complete``). A unit recomputed to the same
  bytes keeps its fingerprint, so nothing downstream of it goes stale.
- a local folder (model, SAE, HF dataset) or corpus file: sha256 of every file's bytes, hashed
  together with the relative paths. The full hash runs at about 1 GB/s here and is remembered per
  (path, size, mtime, ctime, inode) in ``$XPROBE_CACHE_DIR`` (default ``~/.cache/xprobe``), so
  only new or rewritten files are read again; ctime changes on every write and cannot be set back
  by the writer. A file in a Hugging Face cache (``blobs/<sha256>``) is named by its hash: free.
- a GGUF file (``model = "x.gguf"``): its own sha256 (``fingerprint`` and ``sha256``), the hash
  published beside such files.
- a hub model or a sae-lens release: the commit of its repository that the revision resolves to
  (asked of the hub when online, else the local Hugging Face cache's ``refs/<revision>``).
- a tokenizer: ``tokenizer_fingerprint`` (its vocabulary, merges, normaliser and specials).
- a chat template (chat corpora): the sha256 of the named tokenizer's template.

An input whose identity cannot be computed here (a folder that is gone, a hub model offline and
not cached) is *unknown*: never a reason to call a unit stale, and shown as such.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

_HEX = re.compile(r"^[0-9a-f]{40}$|^[0-9a-f]{64}$")
_SKIP = re.compile(r"^(README|LICENSE|NOTICE|USE_POLICY)(\.|$)|\.md$", re.IGNORECASE)


# ---- file and folder hashes ----------------------------------------------------------------------
def cache_dir() -> Path:
    return Path(os.environ.get("XPROBE_CACHE_DIR") or Path.home() / ".cache" / "xprobe")


class _HashCache:
    """sha256 of files, remembered by (path, size, mtime_ns, ctime_ns, inode) across runs."""

    def __init__(self) -> None:
        self.entries: dict[str, str] | None = None
        self.dirty = False

    def _path(self) -> Path:
        return cache_dir() / "file-hashes.json"

    def _load(self) -> dict[str, str]:
        if self.entries is None:
            try:
                self.entries = json.loads(self._path().read_text())
            except (OSError, ValueError):
                self.entries = {}
        return self.entries

    def digest(self, path: Path) -> str:
        real = path.resolve()
        if real.parent.name == "blobs" and _HEX.match(real.name):
            return real.name  # a Hugging Face cache blob is named by its content hash
        st = real.stat()
        key = f"{real}|{st.st_size}|{st.st_mtime_ns}|{st.st_ctime_ns}|{st.st_ino}"
        entries = self._load()
        if key not in entries:
            h = hashlib.sha256()
            with real.open("rb") as f:
                while block := f.read(8 * 2**20):
                    h.update(block)
            entries[key] = h.hexdigest()
            self.dirty = True
        return entries[key]

    def save(self) -> None:
        if not self.dirty or self.entries is None:
            return
        path = self._path()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            from pipeline.store.io import atomic_write  # temp file by mkstemp: no symlink followed

            atomic_write(path, json.dumps(self.entries))
            self.dirty = False
        except OSError:  # a read-only home: the hashes are recomputed next time, nothing is lost
            pass


_HASHES = _HashCache()


def _files_of(path: Path) -> list[Path]:
    """The files that make up ``path``: itself, or every regular file below a folder (hidden
    files and READMEs/licences skipped: they do not change what is computed)."""
    if path.is_file():
        return [path]
    out = []
    for root, dirs, files in os.walk(path):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        out.extend(
            Path(root) / f for f in sorted(files) if not f.startswith(".") and not _SKIP.search(f)
        )
    return out


def _file_sha256(path: Path) -> str:
    """The sha256 of one file's bytes (remembered like every other file hash)."""
    try:
        return _HASHES.digest(path)
    finally:
        _HASHES.save()


def files_fingerprint(paths: list[str | Path]) -> str | None:
    """One hash of the bytes of ``paths`` (files or folders), None if any is missing."""
    h = hashlib.sha256()
    try:
        for top in paths:
            top = Path(top)
            if not top.exists():
                return None
            for f in _files_of(top):
                rel = f.relative_to(top).as_posix() if top.is_dir() else top.name
                h.update(f"{rel}|{f.stat().st_size}|{_HASHES.digest(f)}\n".encode())
    finally:
        _HASHES.save()
    return h.hexdigest()[:16]


# ---- inputs ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Input:
    """One thing a unit is computed from, with its identity now (None: unknown here)."""

    kind: str
    ref: Any
    fingerprint: str | None
    extra: dict[str, Any] = field(default_factory=dict)

    def record(self) -> dict[str, Any]:
        return {"kind": self.kind, "ref": self.ref, "fingerprint": self.fingerprint, **self.extra}

    def describe(self) -> str:
        if self.kind == "unit":
            return str(self.ref)
        ref = ", ".join(map(str, self.ref)) if isinstance(self.ref, list) else self.ref
        return f"the {self.kind} {ref}"


def unit_input(store: Any, unit: str) -> Input:
    """A store unit as an input: its content fingerprint (None if it has none yet)."""
    info = (store.group(unit).attrs.get("xprobe") or {}) if store.has(unit) else {}
    return Input("unit", unit, info.get("content_fingerprint") if info.get("complete") else None)


def _is_local(ref: str) -> bool:
    return Path(ref).expanduser().exists()


def local_ref(ref: str) -> str:
    """A local path as an absolute one (a record read from another working directory, or by
    ``xprobe status`` elsewhere, must not take ``b_chat`` for a hub repository); a hub name as
    given."""
    return str(Path(ref).expanduser().resolve()) if _is_local(ref) else ref


def model_input(model: str, revision: str | None = None) -> Input:
    """A transformers model: a GGUF file's sha256, a local folder's files, or the hub commit its
    config resolves to."""
    if model.lower().endswith(".gguf"):  # one file: its own sha256, as published beside it
        path = Path(model).expanduser()
        sha = _file_sha256(path) if path.is_file() else None
        return Input("model", model, sha, {"revision": revision, "format": "gguf", "sha256": sha})
    if _is_local(model):
        return Input(
            "model",
            local_ref(model),
            files_fingerprint([Path(model).expanduser()]),
            {"revision": revision},
        )
    commit = hub_commit(model, "config.json", revision)
    return Input("model", model, commit, {"revision": revision, "commit": commit})


def sae_input(sae: str | None, sae_id: str | None, sae_path: str | None) -> Input:
    """A sae-lens SAE: a local folder's files, or the commit of a release's hub repository."""
    if sae_path is not None:
        fp = files_fingerprint([Path(sae_path).expanduser()]) if _is_local(sae_path) else None
        return Input("sae", local_ref(sae_path), fp, {"release": None, "sae_id": None})
    commit = _release_commit(sae, sae_id)
    return Input("sae", f"{sae}/{sae_id}", commit, {"release": sae, "sae_id": sae_id})


def _release_commit(release: str | None, sae_id: str | None) -> str | None:
    try:
        from sae_lens.loading.pretrained_saes_directory import get_repo_id_and_folder_name

        repo_id, folder = get_repo_id_and_folder_name(release, sae_id)
    except Exception:
        return None
    return hub_commit(repo_id, f"{folder}/cfg.json" if folder else "cfg.json")


@functools.lru_cache(maxsize=256)
def hub_commit(repo_id: str, filename: str, revision: str | None = None) -> str | None:
    """The commit ``revision`` of a hub repository resolves to: asked of the hub when online,
    else read from the local Hugging Face cache (None if neither knows). Asked once per process:
    every stage of one ``xprobe run`` checks the same repositories."""
    if revision and _HEX.match(revision):
        return revision
    try:
        import huggingface_hub
        from huggingface_hub import constants
    except ImportError:
        return None
    if not constants.HF_HUB_OFFLINE:
        try:
            return huggingface_hub.HfApi().model_info(repo_id, revision=revision).sha
        except Exception:
            pass
    try:
        cached = huggingface_hub.try_to_load_from_cache(repo_id, filename, revision=revision)
    except Exception:
        return None
    if isinstance(cached, str) and Path(cached).parent.parent.name == "snapshots":
        return Path(cached).parent.name
    if isinstance(cached, str):
        parts = Path(cached).parts
        if "snapshots" in parts:
            return parts[parts.index("snapshots") + 1]
    return None


def files_input(paths: list[str | Path]) -> Input:
    """Corpus files or folders (an HF dataset saved with ``save_to_disk``) by their bytes."""
    refs = [str(Path(p).resolve()) for p in paths]
    return Input("files", refs, files_fingerprint(refs))


def tokenizer_input(name: str, revision: str | None, fingerprint: str) -> Input:
    return Input("tokenizer", local_ref(name), fingerprint, {"revision": revision})


def chat_template_input(name: str, revision: str | None) -> Input:
    """The chat template of a tokenizer, by its sha256 (``pipeline.inputs.vocab.tokenizer_facts``)."""
    return Input(
        "chat_template", local_ref(name), _template_sha(name, revision), {"revision": revision}
    )


def _template_sha(name: str, revision: str | None) -> str | None:
    try:
        from pipeline.inputs.tokenizer import load_tokenizer
        from pipeline.inputs.vocab import tokenizer_facts

        return tokenizer_facts(load_tokenizer(name, revision))["chat_template"]
    except Exception:
        return None


def current(store: Any, record: dict[str, Any]) -> str | None:
    """The identity now of an input recorded as ``record`` (None: unknown here)."""
    kind, ref = record.get("kind"), record.get("ref")
    if kind == "unit":
        return unit_input(store, ref).fingerprint
    if kind == "model":
        return model_input(ref, record.get("revision")).fingerprint
    if kind == "sae":
        if record.get("release"):
            return sae_input(record["release"], record.get("sae_id"), None).fingerprint
        return sae_input(None, None, ref).fingerprint
    if kind == "files":
        return files_fingerprint(ref)
    if kind == "chat_template":
        return _template_sha(ref, record.get("revision"))
    if kind == "tokenizer":
        try:
            from pipeline.inputs.tokenizer import load_tokenizer, tokenizer_fingerprint

            return tokenizer_fingerprint(load_tokenizer(ref, record.get("revision")))
        except Exception:
            return None
    return None


# ---- staleness -------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Stale:
    """Why a unit is stale: ``input`` (a lineage name) changed, or is itself stale (``via``)."""

    unit: str
    input: str
    what: str
    via: Stale | None = None

    def reason(self) -> str:
        if self.via is not None:
            return f"its input {self.what} is stale ({self.via.reason()})"
        return f"{self.what} changed since it was computed"


def changed_inputs(recorded: dict[str, Any], now: dict[str, Input]) -> list[tuple[str, Input]]:
    """Inputs whose identity now differs from the one recorded (unknown on either side: not)."""
    out = []
    for name, inp in now.items():
        old = (recorded.get(name) or {}).get("fingerprint")
        if old is not None and inp.fingerprint is not None and old != inp.fingerprint:
            out.append((name, inp))
    return out


def staleness(
    store: Any,
    unit: str,
    now: dict[str, Input] | None = None,
    memo: dict[str, Stale | None] | None = None,
) -> Stale | None:
    """Why ``unit`` is stale, or None. ``now``: its inputs' identities if the caller has them
    (a stage about to run); otherwise they are computed again from the recorded lineage. An input
    unit that is itself stale makes ``unit`` stale too."""
    memo = {} if memo is None else memo
    if now is None and unit in memo:
        return memo[unit]
    info = (store.group(unit).attrs.get("xprobe") or {}) if store.has(unit) else {}
    recorded = info.get("lineage") or {}
    if now is None:
        now = {
            name: Input(rec.get("kind"), rec.get("ref"), current(store, rec))
            for name, rec in recorded.items()
        }
    result = None
    changed = changed_inputs(recorded, now)
    if changed:
        name, inp = changed[0]
        result = Stale(unit, name, inp.describe())
    else:
        for name, inp in now.items():
            if inp.kind == "unit" and store.has(inp.ref):
                upstream = staleness(store, inp.ref, memo=memo)
                if upstream is not None:
                    result = Stale(unit, name, inp.describe(), via=upstream)
                    break
    memo[unit] = result
    return result

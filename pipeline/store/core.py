"""The store: one Zarr v3 group holding every stage's arrays, their provenance and chunk manifests.

Layout (see README "Store layout"):

    tokens/<corpus>/{ids,mask,doc}                 [n_seq, ctx]
    acts/<corpus>/<model>/<hook>/x                 [n_tok, d_model]
    feats/<corpus>/<sae>/...                       sparse feature activations
    probes/<name>/...                              fitted probes

A *unit* is the group a stage writes as one piece (``tokens/<corpus>``,
``acts/<corpus>/<model>/<hook>``...). Its ``attrs["xprobe"]`` holds the provenance and the
stage config; its ``_done/<i>.json`` files are the chunk manifest: a marker is written (atomically,
after the chunk's data files are fsynced) only once chunk ``i`` of every array in the unit is on
disk. A chunk without a marker does not exist as far as readers are concerned.

A store is written only at a local path; any fsspec URL (http, s3, gs, zip...) opens read-only.
A local store may name read-only *caches* (``Store(path, cache=[url])``): a unit missing locally
is read from the first cache holding it, after checking that its corpus and tokenizer fingerprints
match those of ``tokens/<corpus>`` as this store resolves it. Writes always go to the local store.

File-level mechanics (opening, durable writes, zip/fsspec reads, packing, provenance records) live
in ``pipeline.store.io``; the per-unit write locks in ``pipeline.store.locks``.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import warnings
import zlib
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.errors import XprobeError
from pipeline.lazy import zarr
from pipeline.store import io as store_io
from pipeline.store import locks, trust
from pipeline.store.io import checksum
from pipeline.store.layout import UNIT_KINDS, tokens_unit, unit_of

# Our side files (_done/, tokenizer.json) live inside unit folders; zarr warns about every non-zarr
# entry when it lists a group. They are ours, so that warning says nothing useful.
warnings.filterwarnings(
    "ignore", message=r"Object at .* is not recognized as a component of a Zarr hierarchy"
)

DONE_DIR = "_done"


class Store:
    """A Zarr v3 group at ``url``. ``mode="a"`` (local paths only) creates and writes; ``"r"`` reads."""

    def __init__(
        self,
        url: str | Path,
        mode: str = "a",
        storage_options: dict | None = None,
        cache: Sequence[str | Path] = (),
    ):
        url = str(url)
        self.url = url
        self.caches = [Store(c, mode="r", storage_options=storage_options) for c in cache]
        self._claimed: set[str] = set()  # units this process writes: never read from a cache
        self._resolved: dict[str, Store] = {}  # units found in a cache (fingerprints checked)
        self._trusted: set[tuple] = set()  # (unit, state) whose arrays were checked (trust.py)
        self.zip_path = Path(url) if url.endswith(".zip") and "://" not in url else None
        is_local = ("://" not in url or url.startswith("file://")) and self.zip_path is None
        self.local_path = Path(url.removeprefix("file://")).resolve() if is_local else None
        if mode != "r" and self.local_path is None:
            raise XprobeError(
                f"{url} is remote or a zip; xprobe writes only to local store folders (open it read-only)"
            )
        self.mode = mode
        self.root = store_io.open_root(url, mode, self.local_path, self.zip_path, storage_options)

    # ---- read-only caches --------------------------------------------------------------------
    def _source(self, path: str) -> Store:
        """The store that holds ``path``'s unit: this one, or the first cache that has it."""
        if not self.caches:
            return self
        unit = unit_of(path)
        if unit in self._claimed or self._local_has(unit):
            return self
        if unit not in self._resolved:
            for cache in self.caches:
                if cache.has(unit):
                    self._resolved[unit] = cache
                    self._check_cached(unit, cache)
                    break
            else:
                return self
        return self._resolved[unit]

    def _local_has(self, unit: str) -> bool:
        try:
            self.root[unit]
            return True
        except KeyError:
            return False

    def _check_cached(self, unit: str, cache: Store) -> None:
        """Refuse a cached unit computed on other tokens than this store's ``tokens/<corpus>``."""
        info = cache.group(unit).attrs.get("xprobe") or {}
        corpus = info.get("corpus")
        if unit.startswith("tokens/") or corpus is None:
            return
        tokens = tokens_unit(corpus)
        source = self._source(tokens)
        if not source.has(tokens):
            return
        tinfo = source.group(tokens).attrs.get("xprobe") or {}
        for key in ("corpus_fingerprint", "tokenizer_fingerprint"):
            if tinfo.get(key) and info.get(key) and tinfo[key] != info[key]:
                del self._resolved[unit]
                raise XprobeError(
                    f"{unit} in the cache {cache.url} was computed on tokens with {key} {info[key]}, "
                    f"but {tokens} in {source.url} has {tinfo[key]}: the two stores hold different "
                    f"token streams for corpus {corpus!r}. Read the cache's {tokens} (remove or rename "
                    "the local one) or compute this unit locally."
                )

    def claim(self, units: Sequence[str]) -> None:
        """Mark ``units`` as written by this process: from now on they resolve to the local store."""
        self._claimed.update(units)
        for unit in units:
            self._resolved.pop(unit, None)

    def has_local(self, path: str) -> bool:
        """Whether ``path`` exists in this store itself (not in a cache)."""
        return self._local_has(path)

    def cached_complete(self, units: Sequence[str], config_fingerprint: str) -> str | None:
        """URL of the cache(s) holding every one of ``units`` complete with this config, else None."""
        if not self.caches or not units or any(self._local_has(u) for u in units):
            return None
        sources = [self._source(u) for u in units]
        if any(src is self for src in sources):
            return None
        for unit, src in zip(units, sources, strict=True):
            info = src.checked_info(unit)
            if not info.get("complete") or info.get("config_fingerprint") != config_fingerprint:
                return None
        return ", ".join(dict.fromkeys(src.url for src in sources))

    # ---- nodes --------------------------------------------------------------------------
    def has(self, path: str) -> bool:
        if (src := self._source(path)) is not self:
            return src.has(path)
        try:
            self.root[path]
            return True
        except KeyError:
            return False

    def group(self, path: str) -> zarr.Group:
        if (src := self._source(path)) is not self:
            return src.group(path)
        try:
            node = self.root[path]
        except KeyError:
            raise XprobeError(
                f"{path} is not in the store {self.url}; run the stage that writes it"
            ) from None
        if not isinstance(node, zarr.Group):
            raise XprobeError(f"{path} in {self.url} is an array, expected a group")
        return node

    def array(self, path: str) -> zarr.Array:
        if (src := self._source(path)) is not self:
            return src.array(path)
        try:
            node = self.root[path]
        except KeyError:
            raise XprobeError(
                f"array {path} is not in the store {self.url}; run the stage that writes it"
            ) from None
        if not isinstance(node, zarr.Array):
            raise XprobeError(f"{path} in {self.url} is a group, expected an array")
        # zarr does not persist write_empty_chunks: without it, a chunk equal to the fill value
        # (all tokens masked, say) would get no file and could not be fsynced or told apart
        # from a missing one
        return node.with_config({"write_empty_chunks": True})

    def info(self, unit: str) -> dict[str, Any]:
        """A unit's provenance (``attrs["xprobe"]``); an error if the unit was never started."""
        info = self.group(unit).attrs.get("xprobe")
        if info is None:
            raise XprobeError(
                f"{unit} in {self.url} has no xprobe provenance; it was not written by xprobe"
            )
        return dict(trust.check_info(self._source(unit).url, unit, info))

    def units(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """Every unit in the store (and, not shadowed, in its caches) with its provenance."""
        members = sorted(self.root.members(max_depth=None), key=lambda m: m[0])
        seen = set()
        for path, node in members:
            if isinstance(node, zarr.Group) and "xprobe" in node.attrs:
                seen.add(path)
                yield path, dict(trust.check_info(self.url, path, node.attrs["xprobe"]))
        for cache in self.caches:
            for path, info in cache.units():
                if path not in seen and self._source(path) is cache:
                    seen.add(path)
                    yield path, info

    def create_unit(self, unit: str, prov: dict[str, Any]) -> zarr.Group:
        self.claim([unit])
        try:
            group = self.root[unit]  # a run killed before it wrote the provenance, or a restart
        except KeyError:
            # group and provenance in one metadata write: a kill can't leave a unit without it
            return self.root.create_group(unit, attributes={"xprobe": prov})
        group.attrs["xprobe"] = prov
        return group

    def create_array(
        self,
        path: str,
        shape: tuple[int, ...],
        chunks: tuple[int, ...],
        dtype: Any,
        prov: dict[str, Any],
        compressors: Any = "auto",
        fill_value: Any = 0,
    ) -> zarr.Array:
        """Create (or reopen, if its shape and dtype agree) an array chunked along axis 0 only."""
        if self.has(path):
            arr = self.array(path)
            if (
                arr.dtype == np.dtype(dtype)
                and arr.chunks == tuple(chunks)
                and arr.shape[1:] == tuple(shape[1:])
            ):
                return arr
            raise XprobeError(
                f"{path} exists with another shape/dtype; rerun the stage with --force"
            )
        return self.root.create_array(
            path,
            shape=shape,
            chunks=chunks,
            dtype=dtype,
            fill_value=fill_value,
            compressors=compressors,
            attributes={"xprobe": prov},
            # every chunk gets a file, so a deleted file can never read back as zeros
            config={"write_empty_chunks": True},
        )

    def delete(self, path: str) -> None:
        """Remove a unit (its arrays, provenance and manifest). Local stores only."""
        self._require_local()
        target = self.local_path / path
        if target.exists():
            shutil.rmtree(target)

    def nbytes_stored(self, path: str = "") -> int | None:
        """Bytes stored under ``path``: on disk, in the zip, or as the remote lists them (None: unknown)."""
        if (src := self._source(path)) is not self:
            return src.nbytes_stored(path)
        if self.local_path is None:
            return store_io.nbytes_remote(self.url, self.zip_path, path)
        total = 0
        for dirpath, _, files in os.walk(self.local_path / path):
            total += sum(os.path.getsize(os.path.join(dirpath, f)) for f in files)
        return total

    def write_text(self, path: str, text: str) -> None:
        """Write a side file (e.g. a unit's tokenizer.json) atomically inside the store."""
        self._require_local()
        store_io.atomic_write(self.local_path / path, text)

    def read_text(self, path: str) -> str | None:
        """A side file's text, or None if it does not exist (local or remote)."""
        if (src := self._source(path)) is not self:
            return src.read_text(path)
        if self.local_path is not None:
            target = self.local_path / path
            return target.read_text() if target.exists() else None
        return store_io.read_text_remote(self.url, self.zip_path, path)

    # ---- locks ------------------------------------------------------------------------------
    def acquire_lock(self, unit: str, stage: str) -> None:
        """Claim ``unit`` for this process, so two runs cannot write it at once.

        The lock is ``<unit>.lock`` beside the unit, put in place whole (a temp file holding
        the holder's record, hard-linked to that name: the link fails if it exists). A lock
        left by a dead process on this host is taken over; one held by a live process is
        refused, naming it.
        """
        self._require_local()
        locks.acquire_lock(self.local_path / f"{unit}.lock", unit, stage)

    def release_lock(self, unit: str) -> None:
        if self.local_path is not None:
            (self.local_path / f"{unit}.lock").unlink(missing_ok=True)

    # ---- chunk manifest ---------------------------------------------------------------------
    def _require_local(self) -> None:
        if self.local_path is None or self.mode == "r":
            raise XprobeError(f"store {self.url} is open read-only")

    def done_chunks(self, unit: str) -> set[int]:
        """Indices of the chunks of ``unit`` that are recorded complete."""
        if (src := self._source(unit)) is not self:
            return src.done_chunks(unit)
        info = self.checked_info(unit)
        if info.get("complete"):
            return set(range(info.get("n_chunks") or 0))
        if self.local_path is None:
            return store_io.marker_indices_remote(self.url, self.zip_path, f"{unit}/{DONE_DIR}")
        done_dir = self.local_path / unit / DONE_DIR
        if not done_dir.is_dir():
            return set()
        return {
            int(name[:-5])
            for name in os.listdir(done_dir)
            if name.endswith(".json") and name[:-5].isdigit()
        }

    def checked_info(self, unit: str) -> dict[str, Any]:
        """A unit's provenance (empty if it has none), its arrays checked against it and against
        its tokens unit once per state (``pipeline.store.trust``) before anything reads them."""
        info = trust.check_info(self.url, unit, self.group(unit).attrs.get("xprobe", {}))
        key = (unit, info.get("complete"), info.get("n_chunks"), info.get("n_chunks_planned"))
        if key not in self._trusted:
            if UNIT_KINDS.get(unit.split("/")[0], UNIT_KINDS["probes"]).chunked:
                trust.check_arrays(self, unit, info)
            self._trusted.add(key)
        return info

    def chunk_record(self, unit: str, index: int) -> dict[str, Any] | None:
        """The manifest record of a chunk (its checksums), or None if it has none."""
        text = self.read_text(f"{unit}/{DONE_DIR}/{index}.json")
        if not text:
            return None
        src = self._source(unit)
        try:
            record = json.loads(text)
        except (ValueError, RecursionError):
            raise trust.malformed(
                src.url, f"the marker of chunk {index} of {unit} is not JSON"
            ) from None
        return trust.check_marker(src.url, unit, index, record)

    def pack(self, out: str | Path) -> Path:
        """Write this (local) store as one zip file that opens read-only with ``Store(out, "r")``."""
        self._require_local()
        return store_io.pack_folder(self.local_path, Path(out))

    def sync_chunk(self, array: zarr.Array, index: int) -> None:
        """fsync the file(s) of chunk ``index`` (axis 0) of ``array``."""
        self._require_local()
        coords = (index,) + (0,) * (array.ndim - 1)
        path = self.local_path / array.path / array.metadata.encode_chunk_key(coords)
        store_io.fsync_path(path)

    def mark_done(self, unit: str, index: int, record: dict[str, Any]) -> None:
        """Record chunk ``index`` of ``unit`` as complete. Call only after its data is synced."""
        self._require_local()
        store_io.atomic_write(
            self.local_path / unit / DONE_DIR / f"{index}.json", json.dumps(record)
        )

    def update_info(self, unit: str, **extra: Any) -> None:
        """Add facts to a unit's provenance and to that of each array in it."""
        group = self.group(unit)
        info = dict(group.attrs["xprobe"])
        info.update(extra)
        group.attrs["xprobe"] = info
        for _, arr in group.arrays():
            if "xprobe" in arr.attrs:
                arr.attrs["xprobe"] = {**arr.attrs["xprobe"], **extra}

    def mark_complete(self, unit: str, n_chunks: int, **extra: Any) -> None:
        """Record ``unit`` complete with its content fingerprint (what downstream lineage names).

        A chunked unit's fingerprint hashes its chunk markers' checksums (no data is read); a
        whole unit's arrays are read back once for their crc32s, recorded as ``checksums`` so
        that ``xprobe verify`` can check them, and hashed into the fingerprint.
        """
        facts: dict[str, Any] = {}
        if UNIT_KINDS[unit.split("/")[0]].chunked:
            h = hashlib.sha256()
            for index in range(n_chunks):
                record = self.chunk_record(unit, index) or {}
                h.update(f"{index}:{json.dumps(record.get('crc32', {}), sort_keys=True)};".encode())
        else:
            facts["checksums"] = self.array_checksums(unit)
            h = hashlib.sha256(json.dumps(facts["checksums"], sort_keys=True).encode())
        facts["content_fingerprint"] = h.hexdigest()[:16]
        self.update_info(unit, complete=True, n_chunks=n_chunks, **extra, **facts)

    def array_checksums(self, unit: str) -> dict[str, int]:
        """crc32 of every array under ``unit`` (path relative to it), read in row blocks."""
        out = {}
        for path, node in sorted(self.group(unit).members(max_depth=None), key=lambda m: m[0]):
            if isinstance(node, zarr.Array):
                out[path] = array_crc32(node)
        return out

    # ---- eviction (segmented runs, --max-disk) ------------------------------------------------------
    def evict_chunk(self, unit: str, index: int, arrays: Sequence[str] = ("x",)) -> None:
        """Delete the data of chunk ``index`` of ``unit``'s ``arrays`` once every stage that needs it
        has consumed it (a segmented run, ``pipeline.segments``), keeping its marker (and the
        checksums in it: lineage and a later recomputation are checked against them) with the
        evicted arrays listed under ``evicted``. The marker is written before any file is deleted,
        so a reader never takes a deleted chunk for a written one."""
        self._require_local()
        record = self.chunk_record(unit, index)
        if record is None:
            raise XprobeError(f"chunk {index} of {unit} is not written; there is nothing to evict")
        gone = sorted(set(record.get("evicted") or []) | set(arrays))
        if record.get("evicted") != gone:
            self.mark_done(unit, index, {**record, "evicted": gone})
        for name in arrays:
            arr = self.array(f"{unit}/{name}")
            coords = (index,) + (0,) * (arr.ndim - 1)
            path = self.local_path / arr.path / arr.metadata.encode_chunk_key(coords)
            path.unlink(missing_ok=True)

    def evicted_chunks(self, unit: str) -> set[int]:
        """Chunks of ``unit`` recorded complete, then consumed and evicted (some data is gone)."""
        if (src := self._source(unit)) is not self:
            return src.evicted_chunks(unit)
        if self.local_path is None or not (self.local_path / unit / DONE_DIR).is_dir():
            return set()
        out = set()
        for name in os.listdir(self.local_path / unit / DONE_DIR):
            if name.endswith(".json") and name[:-5].isdigit():
                record = self.chunk_record(unit, int(name[:-5])) or {}
                if record.get("evicted"):
                    out.add(int(name[:-5]))
        return out

    def require_chunk(self, unit: str, index: int) -> None:
        if index not in self.done_chunks(unit):
            raise XprobeError(
                f"chunk {index} of {unit} is not written yet (run or resume the stage that writes it); "
                "xprobe never reads an unwritten chunk"
            )

    def read_chunk(self, array_path: str, index: int, verify: bool = True) -> np.ndarray:
        """Rows of chunk ``index`` of an array, refusing chunks its unit has not recorded complete.

        ``verify`` (the default; crc32 runs at several GB/s) checks the rows against the crc32 in
        the chunk's marker, so a corrupted file is never read as data.
        """
        unit = array_path.rsplit("/", 1)[0]
        self.require_chunk(unit, index)
        record = self.chunk_record(unit, index)
        name = array_path.rsplit("/", 1)[1]
        if record and name in (record.get("evicted") or ()):
            raise XprobeError(
                f"chunk {index} of {unit} was consumed and evicted (a run with --max-disk); "
                "`xprobe run CONFIG` recomputes the evicted chunks a stage still needs"
            )
        arr = self.array(array_path)
        rows = arr.chunks[0]
        try:
            data = arr[index * rows : min((index + 1) * rows, arr.shape[0])]
        except (RuntimeError, ValueError) as e:  # a truncated or garbled file fails to decode
            raise XprobeError(
                self._corrupt(array_path, index, f"it cannot be decoded: {e}")
            ) from None
        except MemoryError:
            raise trust.malformed(
                self._source(array_path).url,
                f"chunk {index} of {array_path} claims {rows:,} rows of shape {arr.shape[1:]} "
                f"({arr.dtype}): more than this machine's memory",
            ) from None
        if verify:
            if (
                record
                and name in record.get("crc32", {})
                and checksum(data) != record["crc32"][name]
            ):
                raise XprobeError(
                    self._corrupt(array_path, index, "it does not match its checksum")
                )
        return data

    def _corrupt(self, array_path: str, index: int, why: str) -> str:
        src = self._source(array_path)
        if src.local_path is not None:
            todo = (
                f"run `xprobe verify {src.url} --repair` (it drops the markers of bad chunks), then "
                "rerun the stage that wrote it to recompute them"
            )
        else:
            todo = (
                f"the copy at {src.url} is damaged: fetch it again or ask its author to re-share it"
            )
        return f"chunk {index} of {array_path} is corrupted ({why}); {todo}"


def array_crc32(array: zarr.Array, max_bytes: int = 256 * 2**20) -> int:
    """crc32 of a whole array's bytes in C order, read a block of rows at a time."""
    crc = 0
    if array.ndim == 0:
        return zlib.crc32(np.ascontiguousarray(array[...]).tobytes())
    row_bytes = max(1, int(np.prod(array.shape[1:])) * array.dtype.itemsize)
    step = max(1, max_bytes // row_bytes)
    for start in range(0, array.shape[0], step):
        block = np.ascontiguousarray(array[start : start + step])
        crc = zlib.crc32(block.view(np.uint8).reshape(-1), crc)
    return crc

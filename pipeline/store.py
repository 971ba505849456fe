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
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import shutil
import socket
import warnings
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import zarr

from pipeline.config import canonical, fingerprint
from pipeline.errors import XprobeError

# Our side files (_done/, tokenizer.json) live inside unit folders; zarr warns about every non-zarr
# entry when it lists a group. They are ours, so that warning says nothing useful.
warnings.filterwarnings(
    "ignore", message=r"Object at .* is not recognized as a component of a Zarr hierarchy"
)

FORMAT_VERSION = 1
DONE_DIR = "_done"


def xprobe_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("xprobe")
    except PackageNotFoundError:  # running from a source tree
        return "0+unknown"


def provenance(stage: str, cfg: Any, **extra: Any) -> dict[str, Any]:
    """The attributes every unit and array written by ``stage`` carries."""
    return {
        "format_version": FORMAT_VERSION,
        "stage": stage,
        "config": canonical(cfg),
        "config_fingerprint": fingerprint(cfg),
        "xprobe_version": xprobe_version(),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }


def checksum(data: np.ndarray) -> int:
    """crc32 of an array's bytes (C order): recorded per chunk to catch corrupted files."""
    return zlib.crc32(np.ascontiguousarray(data).view(np.uint8).reshape(-1))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid > 0


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see either nothing or all of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_path(path.parent)


class Store:
    """A Zarr v3 group at ``url``. ``mode="a"`` (local paths only) creates and writes; ``"r"`` reads."""

    def __init__(self, url: str | Path, mode: str = "a", storage_options: dict | None = None):
        url = str(url)
        self.url = url
        self.zip_path = Path(url) if url.endswith(".zip") and "://" not in url else None
        is_local = ("://" not in url or url.startswith("file://")) and self.zip_path is None
        self.local_path = Path(url.removeprefix("file://")).resolve() if is_local else None
        if mode != "r" and self.local_path is None:
            raise XprobeError(
                f"{url} is remote or a zip; xprobe writes only to local store folders (open it read-only)"
            )
        self.mode = mode
        try:
            if self.zip_path is not None:
                if not self.zip_path.exists():
                    raise FileNotFoundError(url)
                zip_store = zarr.storage.ZipStore(self.zip_path, mode="r")
                self.root = zarr.open_group(store=zip_store, mode="r", zarr_format=3)
            elif mode == "r":
                self.root = zarr.open_group(
                    store=str(self.local_path) if is_local else url,
                    mode="r",
                    zarr_format=3,
                    storage_options=None if is_local else storage_options,
                )
            else:
                self.root = zarr.open_group(store=str(self.local_path), mode="a", zarr_format=3)
        except (FileNotFoundError, zarr.errors.GroupNotFoundError) as e:
            raise XprobeError(
                f"no xprobe store at {url} ({e}); run a stage first to create one"
            ) from None
        if mode != "r":
            if "xprobe_store" not in self.root.attrs:
                self.root.attrs["xprobe_store"] = FORMAT_VERSION
        stored = self.root.attrs.get("xprobe_store", FORMAT_VERSION)
        if stored > FORMAT_VERSION:
            raise XprobeError(
                f"{url} was written by a newer xprobe (store format {stored}, this one reads {FORMAT_VERSION}); "
                "upgrade xprobe"
            )

    # ---- nodes --------------------------------------------------------------------------
    def has(self, path: str) -> bool:
        try:
            self.root[path]
            return True
        except KeyError:
            return False

    def group(self, path: str) -> zarr.Group:
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
        try:
            node = self.root[path]
        except KeyError:
            raise XprobeError(
                f"array {path} is not in the store {self.url}; run the stage that writes it"
            ) from None
        if not isinstance(node, zarr.Array):
            raise XprobeError(f"{path} in {self.url} is a group, expected an array")
        return node

    def info(self, unit: str) -> dict[str, Any]:
        """A unit's provenance (``attrs["xprobe"]``); an error if the unit was never started."""
        info = self.group(unit).attrs.get("xprobe")
        if info is None:
            raise XprobeError(
                f"{unit} in {self.url} has no xprobe provenance; it was not written by xprobe"
            )
        return dict(info)

    def units(self) -> Iterator[tuple[str, dict[str, Any]]]:
        """Every unit in the store with its provenance, depth first."""
        members = sorted(self.root.members(max_depth=None), key=lambda m: m[0])
        for path, node in members:
            if isinstance(node, zarr.Group) and "xprobe" in node.attrs:
                yield path, dict(node.attrs["xprobe"])

    def create_unit(self, unit: str, prov: dict[str, Any]) -> zarr.Group:
        group = self.root.require_group(unit)
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

    def nbytes_stored(self, path: str = "") -> int:
        """Bytes on disk under ``path`` (local stores; 0 when unknown)."""
        if self.local_path is None:
            return 0
        total = 0
        for dirpath, _, files in os.walk(self.local_path / path):
            total += sum(os.path.getsize(os.path.join(dirpath, f)) for f in files)
        return total

    def write_text(self, path: str, text: str) -> None:
        """Write a side file (e.g. a unit's tokenizer.json) atomically inside the store."""
        self._require_local()
        _atomic_write(self.local_path / path, text)

    def read_text(self, path: str) -> str | None:
        """A side file's text, or None if it does not exist (local or remote)."""
        if self.local_path is not None:
            target = self.local_path / path
            return target.read_text() if target.exists() else None
        if self.zip_path is not None:
            import zipfile

            with zipfile.ZipFile(self.zip_path) as zf:
                return zf.read(path).decode() if path in zf.namelist() else None
        import fsspec

        try:
            with fsspec.open(f"{self.url.rstrip('/')}/{path}", "r") as f:
                return f.read()
        except FileNotFoundError:
            return None

    # ---- locks ------------------------------------------------------------------------------
    def acquire_lock(self, unit: str, stage: str) -> None:
        """Claim ``unit`` for this process, so two runs cannot write it at once.

        The lock is ``<unit>.lock`` beside the unit (created with O_EXCL). A lock left by a dead
        process on this host is taken over; one held by a live process is refused, naming it.
        """
        self._require_local()
        path = self.local_path / f"{unit}.lock"
        path.parent.mkdir(parents=True, exist_ok=True)
        me = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "stage": stage,
            "since": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        }
        for _ in range(2):
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                try:
                    holder = json.loads(path.read_text() or "{}")
                except (OSError, json.JSONDecodeError):
                    holder = {}
                if holder.get("host") == me["host"] and not _pid_alive(holder.get("pid", -1)):
                    path.unlink(missing_ok=True)  # stale: its process is gone
                    continue
                raise XprobeError(
                    f"{unit} is being written by another run (stage {holder.get('stage')!r}, pid {holder.get('pid')} "
                    f"on {holder.get('host')}, since {holder.get('since')}). Wait for it to finish, or if that process "
                    f"is gone, delete {path}."
                ) from None
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
            return
        raise XprobeError(f"could not take the lock {path}; delete it if no run is using {unit}")

    def release_lock(self, unit: str) -> None:
        if self.local_path is not None:
            (self.local_path / f"{unit}.lock").unlink(missing_ok=True)

    # ---- chunk manifest ---------------------------------------------------------------------
    def _require_local(self) -> None:
        if self.local_path is None or self.mode == "r":
            raise XprobeError(f"store {self.url} is open read-only")

    def done_chunks(self, unit: str) -> set[int]:
        """Indices of the chunks of ``unit`` that are recorded complete."""
        info = self.group(unit).attrs.get("xprobe", {})
        if info.get("complete"):
            return set(range(info["n_chunks"]))
        if self.local_path is None:
            return self._done_chunks_remote(unit)
        done_dir = self.local_path / unit / DONE_DIR
        if not done_dir.is_dir():
            return set()
        return {
            int(name[:-5])
            for name in os.listdir(done_dir)
            if name.endswith(".json") and name[:-5].isdigit()
        }

    def _done_chunks_remote(self, unit: str) -> set[int]:
        if self.zip_path is not None:
            import zipfile

            prefix = f"{unit}/{DONE_DIR}/"
            with zipfile.ZipFile(self.zip_path) as zf:
                names = [n[len(prefix) :] for n in zf.namelist() if n.startswith(prefix)]
            return {int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit()}
        import fsspec

        fs, root = fsspec.core.url_to_fs(self.url)
        try:
            names = fs.ls(f"{root.rstrip('/')}/{unit}/{DONE_DIR}", detail=False)
        except (FileNotFoundError, NotImplementedError):
            return set()
        return {int(Path(n).stem) for n in names if Path(n).stem.isdigit()}

    def chunk_record(self, unit: str, index: int) -> dict[str, Any] | None:
        """The manifest record of a chunk (its checksums), or None if it has none."""
        text = self.read_text(f"{unit}/{DONE_DIR}/{index}.json")
        return json.loads(text) if text else None

    def pack(self, out: str | Path) -> Path:
        """Write this (local) store as one zip file that opens read-only with ``Store(out, "r")``."""
        import zipfile

        self._require_local()
        out = Path(out)
        tmp = out.with_name(f".{out.name}.tmp")
        # chunks are already compressed: store them as they are
        with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
            for dirpath, _, files in sorted(os.walk(self.local_path)):
                for name in sorted(files):
                    if name.endswith((".lock", ".tmp")):
                        continue
                    full = Path(dirpath) / name
                    zf.write(full, full.relative_to(self.local_path).as_posix())
        os.replace(tmp, out)
        return out

    def sync_chunk(self, array: zarr.Array, index: int) -> None:
        """fsync the file(s) of chunk ``index`` (axis 0) of ``array``."""
        self._require_local()
        coords = (index,) + (0,) * (array.ndim - 1)
        path = self.local_path / array.path / array.metadata.encode_chunk_key(coords)
        _fsync_path(path)

    def mark_done(self, unit: str, index: int, record: dict[str, Any]) -> None:
        """Record chunk ``index`` of ``unit`` as complete. Call only after its data is synced."""
        self._require_local()
        _atomic_write(self.local_path / unit / DONE_DIR / f"{index}.json", json.dumps(record))

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
        self.update_info(unit, complete=True, n_chunks=n_chunks, **extra)

    def require_chunk(self, unit: str, index: int) -> None:
        if index not in self.done_chunks(unit):
            raise XprobeError(
                f"chunk {index} of {unit} is not written yet (run or resume the stage that writes it); "
                "xprobe never reads an unwritten chunk"
            )

    def read_chunk(self, array_path: str, index: int, verify: bool = False) -> np.ndarray:
        """Rows of chunk ``index`` of an array, refusing chunks its unit has not recorded complete."""
        unit = array_path.rsplit("/", 1)[0]
        self.require_chunk(unit, index)
        arr = self.array(array_path)
        rows = arr.chunks[0]
        data = arr[index * rows : min((index + 1) * rows, arr.shape[0])]
        if verify:
            record = self.chunk_record(unit, index)
            name = array_path.rsplit("/", 1)[1]
            if (
                record
                and name in record.get("crc32", {})
                and checksum(data) != record["crc32"][name]
            ):
                raise XprobeError(
                    f"chunk {index} of {array_path} does not match its checksum (corrupted file); "
                    "delete its marker _done/{index}.json and resume the stage to recompute it"
                )
        return data

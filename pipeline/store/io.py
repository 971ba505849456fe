"""The store's on-disk side under ``Store``: what its records hold and how its bytes reach disk.

- the records: the store format version, a unit's ``provenance``, a chunk's ``checksum``;
- durable local writes: ``fsync_path``, ``atomic_write``, and ``new_temp_file`` /
  ``new_temp_dir``: every temp file or folder xprobe writes is made by ``tempfile`` beside its
  target (O_EXCL, a random name), so a symlink planted at a predictable name is never followed;
- opening a store's root group from a local folder, a zip file or any fsspec URL
  (``open_root``), checking its format version and turning the ways that fails into
  ``XprobeError``;
- reading what zarr does not cover from read-only zip and fsspec stores: side files, the names
  in a chunk manifest folder, sizes;
- ``pack_folder``: a local store as one zip file.

``Store`` decides which of these applies; nothing here knows about units or caches.
"""

from __future__ import annotations

import datetime as _dt
import os
import tempfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.config import canonical, fingerprint
from pipeline.errors import XprobeError
from pipeline.lazy import zarr

FORMAT_VERSION = 1
FSSPEC_EXTRAS = {
    "s3": "s3fs",
    "s3a": "s3fs",
    "gs": "gcsfs",
    "gcs": "gcsfs",
    "hf": "huggingface_hub",
}
"""The package fsspec needs for each URL scheme beyond http(s)."""


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


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _umask()


def new_temp_file(target: Path) -> tuple[int, Path]:
    """A new empty file beside ``target`` to write and then rename over it: ``(fd, path)``.

    ``tempfile.mkstemp`` creates it with O_EXCL under a random name (``.<name>.<pid>.<random>.tmp``:
    the pid lets a later run tell a dead writer's leftovers), so nothing planted in the folder,
    a symlink say, is ever opened in its place. Its mode is what ``open`` would give (the umask
    applied), not mkstemp's 0600: a store is shared by copying or serving its folder.
    """
    fd, name = tempfile.mkstemp(
        prefix=f".{target.name}.{os.getpid()}.", suffix=".tmp", dir=target.parent
    )
    os.fchmod(fd, 0o666 & ~_UMASK)
    return fd, Path(name)


def new_temp_dir(target: Path) -> Path:
    """A new empty folder beside ``target`` (``tempfile.mkdtemp``: O_EXCL semantics, a random
    name) to fill and then rename into place; mode as ``mkdir`` would give it."""
    path = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    path.chmod(0o777 & ~_UMASK)
    return path


def atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see either nothing or all of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = new_temp_file(path)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def open_root(
    url: str,
    mode: str,
    local_path: Path | None,
    zip_path: Path | None,
    storage_options: dict | None,
) -> zarr.Group:
    """The root group of the store at ``url`` (a zip file, a local folder, or an fsspec URL),
    stamped with ``FORMAT_VERSION`` when writable; refused if a newer xprobe wrote it."""
    is_local = local_path is not None
    try:
        if zip_path is not None:
            if not zip_path.exists():
                raise FileNotFoundError(url)
            _check_zip(url, zip_path)
            zip_store = zarr.storage.ZipStore(zip_path, mode="r")
            root = zarr.open_group(store=zip_store, mode="r", zarr_format=3)
        elif mode == "r":
            root = zarr.open_group(
                store=str(local_path) if is_local else url,
                mode="r",
                zarr_format=3,
                storage_options=None if is_local else storage_options,
            )
        else:
            root = zarr.open_group(store=str(local_path), mode="a", zarr_format=3)
    except XprobeError:
        raise
    except (FileNotFoundError, zarr.errors.GroupNotFoundError) as e:
        raise XprobeError(
            f"no xprobe store at {url} ({e}); run a stage first to create one"
        ) from None
    except ImportError as e:
        scheme = url.split("://", 1)[0]
        package = FSSPEC_EXTRAS.get(scheme, "the fsspec implementation for this URL")
        extra = {"s3fs": " (or xprobe[s3])", "gcsfs": " (or xprobe[gcs])"}.get(package, "")
        raise XprobeError(
            f"reading {scheme}:// stores needs {package}: pip install {package}{extra} ({e})"
        ) from None
    except Exception as e:  # network errors, permissions, a server that is not a store
        if is_local and not isinstance(e, OSError):
            raise
        raise XprobeError(f"cannot open the store {url}: {type(e).__name__}: {e}") from None
    if mode != "r":
        if "xprobe_store" not in root.attrs:
            root.attrs["xprobe_store"] = FORMAT_VERSION
    stored = root.attrs.get("xprobe_store", FORMAT_VERSION)
    if stored > FORMAT_VERSION:
        raise XprobeError(
            f"{url} was written by a newer xprobe (store format {stored}, this one reads {FORMAT_VERSION}); "
            "upgrade xprobe"
        )
    return root


# ---- read-only zip and fsspec stores ---------------------------------------------------------
def _check_zip(url: str, zip_path: Path) -> None:
    """A store zip that opens as a zip and whose members all lie inside it."""
    import zipfile

    from pipeline.store.trust import check_zip_names, malformed

    try:
        with zipfile.ZipFile(zip_path) as zf:
            check_zip_names(url, zf.namelist())
    except zipfile.BadZipFile as e:
        raise malformed(url, f"it is not a zip file ({e})") from None


def nbytes_remote(url: str, zip_path: Path | None, path: str) -> int | None:
    """Bytes stored under ``path`` in the zip, or as the remote lists them (None: unknown)."""
    if zip_path is not None:
        import zipfile

        prefix = f"{path.strip('/')}/" if path else ""
        with zipfile.ZipFile(zip_path) as zf:
            return sum(i.compress_size for i in zf.infolist() if i.filename.startswith(prefix))
    import fsspec

    try:
        fs, root = fsspec.core.url_to_fs(url)
        return int(fs.du(f"{root.rstrip('/')}/{path}".rstrip("/")))
    except Exception:  # http servers cannot list: size unknown
        return None


def read_text_remote(url: str, zip_path: Path | None, path: str) -> str | None:
    """A side file's text from the zip or the remote, or None if it does not exist."""
    if zip_path is not None:
        import zipfile

        with zipfile.ZipFile(zip_path) as zf:
            return zf.read(path).decode() if path in zf.namelist() else None
    import fsspec

    try:
        with fsspec.open(f"{url.rstrip('/')}/{path}", "r") as f:
            return f.read()
    except FileNotFoundError:
        return None


def marker_indices_remote(url: str, zip_path: Path | None, folder: str) -> set[int]:
    """The chunk indices named by the ``<i>.json`` markers in ``folder`` of the zip or remote."""
    if zip_path is not None:
        import zipfile

        prefix = f"{folder}/"
        with zipfile.ZipFile(zip_path) as zf:
            names = [n[len(prefix) :] for n in zf.namelist() if n.startswith(prefix)]
        return {int(n[:-5]) for n in names if n.endswith(".json") and n[:-5].isdigit()}
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    try:
        names = fs.ls(f"{root.rstrip('/')}/{folder}", detail=False)
    except (FileNotFoundError, NotImplementedError):
        return set()
    return {int(Path(n).stem) for n in names if Path(n).stem.isdigit()}


# ---- packing ---------------------------------------------------------------------------------
def pack_folder(folder: Path, out: Path) -> Path:
    """Write the store folder ``folder`` as the zip file ``out`` (locks and temp files left out),
    through a temp file beside ``out`` renamed over it once complete."""
    import zipfile

    fd, tmp = new_temp_file(out)
    try:
        # chunks are already compressed: store them as they are
        with (
            os.fdopen(fd, "wb") as f,
            zipfile.ZipFile(f, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf,
        ):
            for dirpath, _, files in sorted(os.walk(folder)):
                for name in sorted(files):
                    if name.endswith((".lock", ".tmp")):
                        continue
                    full = Path(dirpath) / name
                    if full.is_symlink():  # a store holds none: never pack what one points at
                        continue
                    zf.write(full, full.relative_to(folder).as_posix())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return out

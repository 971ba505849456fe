"""Per-unit write locks: ``<unit>.lock`` files beside a local store's units.

A lock is a JSON file naming its holder (pid, host, stage, since), created so that two runs
cannot write one unit at once: the record is written to a temp file beside it, which is then
hard-linked to the lock's name (the link fails if that name exists). A run killed at any point
thus leaves no lock or a whole one, never an empty lock file (which a later run could not tell
from one being written right now). ``Store.acquire_lock``/``release_lock`` are the entry points;
this module holds the file-level mechanics, including taking over stale locks.
"""

from __future__ import annotations

import datetime as _dt
import errno
import json
import os
import socket
from pathlib import Path
from typing import Any

from pipeline.errors import XprobeError


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return pid > 0


GARBLED_LOCK_SECONDS = 2.0
"""An empty or unreadable lock older than this was left by a writer killed while taking it."""


def _raw(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def _read_holder(path: Path) -> dict[str, Any] | None:
    """The holder a lock file names, or None if it is empty, garbled or not a holder record."""
    try:
        holder = json.loads(_raw(path) or "")
    except json.JSONDecodeError:
        return None
    ok = isinstance(holder, dict) and isinstance(holder.get("pid"), int) and holder.get("host")
    return holder if ok else None


def _age(path: Path) -> float:
    import time

    try:
        return time.time() - path.stat().st_mtime
    except OSError:
        return 0.0


def _remove_stale_lock(path: Path, holder: str | None) -> None:
    """Delete the lock ``path`` if it still holds the text ``holder``. Two runs that find the same stale
    lock take turns here, so the second cannot delete the fresh lock the first just took."""
    import fcntl

    with open(path.with_name(f".{path.name}"), "a") as guard:  # ".<unit>.lock": not packed
        fcntl.flock(guard, fcntl.LOCK_EX)
        if _raw(path) == holder:
            path.unlink(missing_ok=True)


NO_HARD_LINKS = (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK)
"""What ``os.link`` raises on a filesystem without hard links (FAT, some FUSE and SMB mounts)."""


def _create(path: Path, text: str) -> bool:
    """Create the lock file ``path`` holding ``text``; False if a lock is already there.

    The record goes to a temp file first (``.<unit>.lock.<pid>.<random>.tmp``), hard-linked to
    ``path`` once whole, so ``path`` never exists empty or half-written. Where hard links are
    not supported, the lock is created with O_EXCL and written after (a kill in between leaves
    an empty lock, taken over after ``GARBLED_LOCK_SECONDS``)."""
    from pipeline.store.io import new_temp_file

    _remove_dead_temp_files(path)
    fd, tmp = new_temp_file(path)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        try:
            os.link(tmp, path)
        except FileExistsError:
            return False
        except OSError as e:
            if e.errno not in NO_HARD_LINKS:
                raise
            try:
                fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                return False
            with os.fdopen(fd, "w") as f:
                f.write(text)
        return True
    finally:
        tmp.unlink(missing_ok=True)


def _remove_dead_temp_files(path: Path) -> None:
    """Delete the temp files of ``path`` (``.<name>.<pid>.<random>.tmp``) that a run killed
    while taking the lock left, if that run is gone."""
    prefix = f".{path.name}."
    try:
        names = os.listdir(path.parent)
    except OSError:
        return
    for name in names:
        if name.startswith(prefix) and name.endswith(".tmp"):
            pid = name[len(prefix) :].split(".", 1)[0]
            if not pid.isdigit() or int(pid) == os.getpid() or pid_alive(int(pid)):
                continue
            if _age(path.parent / name) > GARBLED_LOCK_SECONDS:  # not another host's, mid-take
                (path.parent / name).unlink(missing_ok=True)


def acquire_lock(path: Path, unit: str, stage: str) -> None:
    """Create the lock file ``path`` for ``unit``, taking over one left by a dead process on
    this host and refusing (naming the holder) one held by a live process."""
    path.parent.mkdir(parents=True, exist_ok=True)
    me = {
        "pid": os.getpid(),
        "host": socket.gethostname(),
        "stage": stage,
        "since": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
    }
    for _ in range(2):
        if not _create(path, json.dumps(me)):
            holder = _read_holder(path)
            if holder is None:  # empty or garbled: where there are no hard links (or from an
                # older xprobe), a writer killed between create and write, or one writing right
                # now (a few microseconds): wait that out, then take it over
                if _age(path) > GARBLED_LOCK_SECONDS:
                    _remove_stale_lock(path, _raw(path))
                    continue
                raise XprobeError(
                    f"{unit} has a lock file {path} that is empty or unreadable and was written "
                    f"{_age(path):.1f} s ago; if no run is using {unit}, run again in a few seconds "
                    "(such a lock is taken over after "
                    f"{GARBLED_LOCK_SECONDS:.0f} s) or delete it"
                ) from None
            if holder.get("host") == me["host"] and not pid_alive(holder.get("pid", -1)):
                _remove_stale_lock(path, _raw(path))  # its process is gone
                continue
            raise XprobeError(
                f"{unit} is being written by another run (stage {holder.get('stage')!r}, pid {holder.get('pid')} "
                f"on {holder.get('host')}, since {holder.get('since')}). Wait for it to finish, or if that process "
                f"is gone, delete {path}."
            ) from None
        return
    raise XprobeError(f"could not take the lock {path}; delete it if no run is using {unit}")

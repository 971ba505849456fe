"""Per-unit write locks: ``<unit>.lock`` files beside a local store's units.

A lock is a JSON file naming its holder (pid, host, stage, since), created with O_EXCL so that
two runs cannot write one unit at once. ``Store.acquire_lock``/``release_lock`` are the entry
points; this module holds the file-level mechanics, including taking over stale locks.
"""

from __future__ import annotations

import datetime as _dt
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


def _remove_stale_lock(path: Path, holder: dict[str, Any]) -> None:
    """Delete the lock ``path`` if it still names ``holder``. Two runs that find the same stale
    lock take turns here, so the second cannot delete the fresh lock the first just took."""
    import fcntl

    with open(path.with_name(f".{path.name}"), "a") as guard:  # ".<unit>.lock": not packed
        fcntl.flock(guard, fcntl.LOCK_EX)
        try:
            current = json.loads(path.read_text() or "{}")
        except FileNotFoundError:
            return
        except (OSError, json.JSONDecodeError):
            current = {}
        if current == holder:
            path.unlink(missing_ok=True)


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
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                holder = json.loads(path.read_text() or "{}")
            except (OSError, json.JSONDecodeError):
                holder = {}
            if holder.get("host") == me["host"] and not pid_alive(holder.get("pid", -1)):
                _remove_stale_lock(path, holder)  # its process is gone
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

"""The one way a whole-unit stage (fit, match) saves and resumes its accumulated state.

A checkpoint is ``<unit>/_checkpoint.pt`` (``torch.save`` of a dict), written to a temp file,
fsynced, then renamed over the old one: a kill leaves either the old or the new checkpoint. The
temp file is named after the writer's pid; temp files of writers that are no longer alive (a
killed run) are removed before each save, since a wide SAE's statistics are tens of GB. A full
disk during a save removes the partial temp file, keeps the previous checkpoint and raises the
one-line ``XprobeError`` that says how to resume.
"""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

from pipeline.errors import XprobeError
from pipeline.store.core import Store
from pipeline.store.locks import pid_alive

CHECKPOINT = "_checkpoint.pt"


def checkpoint_path(store: Store, unit: str) -> Path:
    if store.local_path is None:
        raise XprobeError(f"store {store.url} is read-only: it holds no checkpoints to write")
    return store.local_path / unit / CHECKPOINT


def load_checkpoint(store: Store, unit: str) -> dict[str, Any] | None:
    """The state last saved for ``unit``, on the CPU, or None if there is none."""
    import torch

    path = checkpoint_path(store, unit)
    if not path.exists():
        return None
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, OSError) as e:
        raise XprobeError(
            f"the checkpoint {path} cannot be read ({e}); delete it to restart {unit} from its "
            "first chunk, or rerun the stage with --force"
        ) from None


def remove_dead_temp_files(folder: Path) -> None:
    """Delete ``._checkpoint.pt.<pid>.tmp`` files whose writer is no longer alive."""
    prefix = f".{CHECKPOINT}."
    if not folder.is_dir():
        return
    for name in os.listdir(folder):
        if name.startswith(prefix) and name.endswith(".tmp"):
            pid = name[len(prefix) : -len(".tmp")]
            if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
                (folder / name).unlink(missing_ok=True)


def save_checkpoint(store: Store, unit: str, state: dict[str, Any]) -> None:
    """Save ``state`` for ``unit`` atomically and durably (see the module docstring)."""
    import torch

    path = checkpoint_path(store, unit)
    remove_dead_temp_files(path.parent)
    tmp = path.with_name(f".{CHECKPOINT}.{os.getpid()}.tmp")
    try:
        with tmp.open("wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except (OSError, RuntimeError) as e:
        tmp.unlink(missing_ok=True)
        full = isinstance(e, OSError) and e.errno == errno.ENOSPC
        # torch's zip writer reports a full disk as a RuntimeError naming the failed write
        full = full or (isinstance(e, RuntimeError) and "write" in str(e).lower())
        if full:
            raise XprobeError(
                f"the disk holding {store.url} is full while saving the checkpoint of {unit}; the "
                "previous checkpoint is intact. Free some space and run the same command again to "
                "resume."
            ) from None
        raise


def drop_checkpoint(store: Store, unit: str) -> None:
    """Remove ``unit``'s checkpoint once its results are written (nothing left to resume)."""
    checkpoint_path(store, unit).unlink(missing_ok=True)

"""The one way a whole-unit stage (fit, match) saves and resumes its accumulated state.

A checkpoint is ``<unit>/_checkpoint.safetensors``: the state's tensors as a safetensors file
(a JSON header of names, dtypes, shapes and byte offsets, then the raw bytes), and the state's
structure (nested dicts, lists, tuples, ints, floats, strings, None) as JSON in the header's
``__metadata__``, each tensor replaced by a reference to its name. Loading it parses JSON and
copies bytes: nothing in a checkpoint can run code, so a store copied from someone else is data,
never a program (a pickle, which ``torch.save`` writes, runs whatever it names when loaded).
Checkpoints of older xprobe versions (``_checkpoint.pt``, pickles) are refused, not loaded.

Writing streams each tensor's bytes to a temp file created with ``tempfile.mkstemp`` (O_EXCL, a
random name: nothing planted at a predictable name is followed) beside the checkpoint, fsyncs
it, then renames it over the old one: a kill leaves either the old or the new checkpoint. The
temp file's name carries the writer's pid; temp files of writers that are no longer alive (a
killed run) are removed before each save, since a wide SAE's statistics are tens of GB. A full
disk during a save removes the partial temp file, keeps the previous checkpoint and raises the
one-line ``XprobeError`` that says how to resume.
"""

from __future__ import annotations

import errno
import json
import os
import struct
from pathlib import Path
from typing import Any

from pipeline.errors import XprobeError
from pipeline.store.core import Store
from pipeline.store.io import fsync_path, new_temp_file
from pipeline.store.locks import pid_alive

CHECKPOINT = "_checkpoint.safetensors"
LEGACY_CHECKPOINT = "_checkpoint.pt"
"""What xprobe wrote before checkpoints were safetensors: a pickle, never loaded."""
FORMAT = "xprobe-checkpoint/1"

_DTYPES = {
    "float64": "F64",
    "float32": "F32",
    "float16": "F16",
    "bfloat16": "BF16",
    "int64": "I64",
    "int32": "I32",
    "int16": "I16",
    "int8": "I8",
    "uint8": "U8",
    "bool": "BOOL",
}
"""torch dtype name -> safetensors dtype: what a checkpoint may hold."""


def checkpoint_path(store: Store, unit: str) -> Path:
    if store.local_path is None:
        raise XprobeError(f"store {store.url} is read-only: it holds no checkpoints to write")
    return store.local_path / unit / CHECKPOINT


# ---- the structure as JSON ---------------------------------------------------------------------
def _encode(value: Any, tensors: dict[str, Any]) -> Any:
    """``value`` as JSON, each tensor replaced by ``{"tensor": name}`` and added to ``tensors``."""
    import torch

    if isinstance(value, torch.Tensor):
        name = str(len(tensors))
        tensors[name] = value
        return {"tensor": name}
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise TypeError(f"checkpoint dict keys must be strings: {list(value)[:5]}")
        return {"dict": {k: _encode(v, tensors) for k, v in value.items()}}
    if isinstance(value, (list, tuple)):
        kind = "list" if isinstance(value, list) else "tuple"
        return {kind: [_encode(v, tensors) for v in value]}
    if value is None or isinstance(value, (bool, int, float, str)):
        return {"value": value}
    raise TypeError(f"a checkpoint cannot hold a {type(value).__name__}")


def _decode(node: Any, tensors: dict[str, Any], where: str) -> Any:
    """The value ``_encode`` turned into ``node``; ``where`` names the checkpoint in errors."""
    if not isinstance(node, dict) or len(node) != 1:
        raise ValueError(f"{where}: a structure node is not a one-key object")
    ((kind, body),) = node.items()
    if kind == "tensor":
        if not isinstance(body, str) or body not in tensors:
            raise ValueError(f"{where}: a reference to a tensor {body!r} it does not hold")
        return tensors[body]
    if kind == "dict" and isinstance(body, dict):
        return {k: _decode(v, tensors, where) for k, v in body.items()}
    if kind in ("list", "tuple") and isinstance(body, list):
        items = [_decode(v, tensors, where) for v in body]
        return items if kind == "list" else tuple(items)
    if kind == "value" and (body is None or isinstance(body, (bool, int, float, str))):
        return body
    raise ValueError(f"{where}: a structure node of unknown kind {kind!r}")


# ---- the file --------------------------------------------------------------------------------
def _write(f: Any, structure: Any, tensors: dict[str, Any]) -> None:
    """A safetensors file on the open binary file ``f``, each tensor's bytes written in place
    (no copy of the whole state in memory: a wide SAE's statistics are tens of GB)."""
    import torch

    flat, header, offset = [], {}, 0
    for name, tensor in tensors.items():
        tensor = tensor.detach().to("cpu").contiguous()
        dtype = str(tensor.dtype).removeprefix("torch.")
        if dtype not in _DTYPES:
            raise TypeError(f"a checkpoint cannot hold a {dtype} tensor")
        nbytes = tensor.numel() * tensor.element_size()
        header[name] = {
            "dtype": _DTYPES[dtype],
            "shape": list(tensor.shape),
            "data_offsets": [offset, offset + nbytes],
        }
        flat.append(tensor)
        offset += nbytes
    header["__metadata__"] = {"format": FORMAT, "structure": json.dumps(structure)}
    head = json.dumps(header, separators=(",", ":")).encode()
    head += b" " * (-len(head) % 8)  # the data starts 8-byte aligned
    f.write(struct.pack("<Q", len(head)))
    f.write(head)
    for tensor in flat:
        if tensor.numel():
            f.write(memoryview(tensor.reshape(-1).view(torch.uint8).numpy()))


def _read(path: Path) -> dict[str, Any]:
    """The state in the checkpoint file ``path``; ValueError if it is not one xprobe wrote."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            if meta.get("format") != FORMAT:
                raise ValueError(f"it is not an xprobe checkpoint (format {meta.get('format')!r})")
            structure = json.loads(meta.get("structure", "null"))
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except SafetensorError as e:
        raise ValueError(f"it is not a safetensors file ({e})") from None
    except (RecursionError, json.JSONDecodeError) as e:
        raise ValueError(f"its structure is not valid JSON ({type(e).__name__})") from None
    try:
        state = _decode(structure, tensors, "the structure")
    except RecursionError:
        raise ValueError("its structure is nested too deeply") from None
    if not isinstance(state, dict):
        raise ValueError("its state is not a dict")
    return state


def load_checkpoint(store: Store, unit: str) -> dict[str, Any] | None:
    """The state last saved for ``unit``, on the CPU, or None if there is none. A file that is
    not a checkpoint xprobe wrote (a pickle planted there, a truncated write) is refused."""
    path = checkpoint_path(store, unit)
    legacy = path.with_name(LEGACY_CHECKPOINT)
    restart = f"delete it to restart {unit} from its first chunk, or rerun the stage with --force"
    if not path.exists():
        if legacy.exists():
            raise XprobeError(
                f"{legacy} is a checkpoint in the pickle format of an older xprobe (or a file "
                f"planted there): loading a pickle can run code, so it is not loaded; {restart}"
            )
        return None
    try:
        return _read(path)
    except (ValueError, OSError) as e:
        raise XprobeError(f"the checkpoint {path} cannot be read: {e}; {restart}") from None


def remove_dead_temp_files(folder: Path) -> None:
    """Delete ``._checkpoint.safetensors.<pid>.<random>.tmp`` files whose writer is no longer
    alive (and ``._checkpoint.pt.<pid>.tmp`` ones an older xprobe left)."""
    if not folder.is_dir():
        return
    for name in os.listdir(folder):
        for prefix in (f".{CHECKPOINT}.", f".{LEGACY_CHECKPOINT}."):
            if name.startswith(prefix) and name.endswith(".tmp"):
                pid = name[len(prefix) :].split(".", 1)[0]
                if pid.isdigit() and int(pid) != os.getpid() and not pid_alive(int(pid)):
                    (folder / name).unlink(missing_ok=True)


def save_checkpoint(store: Store, unit: str, state: dict[str, Any]) -> None:
    """Save ``state`` (nested dicts, lists, tuples, scalars, strings and tensors) for ``unit``
    atomically and durably (see the module docstring)."""
    path = checkpoint_path(store, unit)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_dead_temp_files(path.parent)
    tensors: dict[str, Any] = {}
    structure = _encode(state, tensors)
    fd, tmp = new_temp_file(path)
    try:
        with os.fdopen(fd, "wb") as f:
            _write(f, structure, tensors)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_path(path.parent)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise XprobeError(
                f"the disk holding {store.url} is full while saving the checkpoint of {unit}; the "
                "previous checkpoint is intact. Free some space and run the same command again to "
                "resume."
            ) from None
        raise


def drop_checkpoint(store: Store, unit: str) -> None:
    """Remove ``unit``'s checkpoint once its results are written (nothing left to resume)."""
    path = checkpoint_path(store, unit)
    path.unlink(missing_ok=True)
    path.with_name(LEGACY_CHECKPOINT).unlink(missing_ok=True)

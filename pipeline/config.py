"""Config dataclasses: loading from TOML tables, validation, canonical form and fingerprint.

Every stage exposes a frozen dataclass. A field whose metadata has ``runtime=True`` (progress
bars, prefetch depth, worker counts) does not change what the stage writes, so it is left out
of the fingerprint that guards a store against being resumed with another config.

A field made with ``path_field`` holds a local path (``kind="path"``) or a local path or hub name
(``kind="path_or_hub"``). Its canonical form is the absolute, normalised path, so ``tok``,
``./tok/`` and ``/abs/tok`` are one config; a relative path in a TOML file is relative to that
file's folder (``from_dict(..., base=folder)``).

Configs check themselves on construction: each stage config's ``__post_init__`` calls
``check_fields`` (types, with ints accepted for floats, lists for tuples and ``os.PathLike`` for
strings) and then its own pure checks (no file or network access).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import types
import typing
from pathlib import Path
from typing import Any, TypeVar

import tomllib

from pipeline.errors import XprobeError

T = TypeVar("T")


def runtime(default: Any, doc: str = "") -> Any:
    """A config field that does not affect the stage's output (excluded from the fingerprint)."""
    if isinstance(default, (list, dict)):
        return dataclasses.field(
            default_factory=lambda: type(default)(default), metadata={"runtime": True, "doc": doc}
        )
    return dataclasses.field(default=default, metadata={"runtime": True, "doc": doc})


def path_field(
    default: Any = dataclasses.MISSING, kind: str = "path", runtime: bool = False, doc: str = ""
) -> Any:
    """A config field holding a local path (``kind="path"``; a list of paths or globs too) or a
    local path or hub name (``kind="path_or_hub"``): normalised before fingerprinting."""
    metadata = {"path": kind, "doc": doc, **({"runtime": True} if runtime else {})}
    return dataclasses.field(default=default, metadata=metadata)


def normalize_path(value: str, kind: str = "path", base: str | Path | None = None) -> str:
    """``value`` joined to ``base`` (default: the working directory) and normalised (no trailing
    ``/``, no ``..``), user folder expanded. A ``path_or_hub`` value stays as given unless it names
    an existing local path or is written as one (``/``, ``./``, ``../``, ``~``)."""
    expanded = os.path.expanduser(value)
    joined = os.path.join(base, expanded) if base is not None else expanded
    if kind == "path_or_hub":
        looks_local = value.startswith(("/", "./", "../", "~")) or value in (".", "..")
        if not looks_local and not os.path.exists(joined):
            return value
    if base is not None and not os.path.isabs(str(base)):
        return os.path.normpath(joined)  # relative to a relative TOML folder: keep it readable
    return os.path.normpath(os.path.abspath(joined))


def _normalize_paths(cls: type, values: dict[str, Any], base: str | Path | None) -> dict[str, Any]:
    """``values`` with every path field's string(s) normalised (anything else left for the type
    check to report)."""
    out = dict(values)
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        kind = f.metadata.get("path")
        value = out.get(f.name)
        if kind is None:
            continue
        if isinstance(value, (str, os.PathLike)):
            out[f.name] = normalize_path(os.fspath(value), kind, base)
        elif isinstance(value, (tuple, list)) and all(isinstance(v, str) for v in value):
            out[f.name] = type(value)(normalize_path(v, kind, base) for v in value)
    return out


def relative_to(cls: type, data: dict[str, Any], base: str | Path | None) -> dict[str, Any]:
    """A TOML table for config ``cls`` with its relative paths made relative to ``base`` (the TOML
    file's folder) instead of the working directory; unchanged if ``base`` is None."""
    return data if base is None else _normalize_paths(cls, data, base)


def field_docs(cls: type) -> dict[str, str]:
    """The docstring written under each field of a config dataclass (used for CLI help)."""
    import ast
    import inspect
    import textwrap

    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(cls)))
    except (OSError, TypeError):
        return {}
    docs, body = {}, tree.body[0].body
    for node, nxt in zip(body, body[1:], strict=False):
        if isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            if isinstance(nxt, ast.Expr) and isinstance(getattr(nxt, "value", None), ast.Constant):
                docs[node.target.id] = " ".join(str(nxt.value.value).split())
    return docs


def load_toml(path: str | Path) -> dict[str, Any]:
    """Read a TOML file, turning parse errors into a message that names the file."""
    path = Path(path)
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise XprobeError(f"config file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise XprobeError(f"config file {path} is not valid TOML: {e}") from None


def _check_type(name: str, value: Any, annotation: Any) -> Any:
    """Coerce/validate one TOML value against a dataclass field annotation."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _check_type(name, value, arg)
            except XprobeError as e:
                errors.append(str(e))
        raise XprobeError(errors[0] if errors else f"{name}: bad value {value!r}")
    if origin is typing.Literal:
        if value not in args:
            raise XprobeError(f"{name} must be one of {list(args)}, got {value!r}")
        return value
    if origin in (list, tuple):
        if isinstance(value, (str, os.PathLike)) and args and args[0] is str:
            value = [value]
        elif (
            isinstance(value, str)
            and args
            and args[0] is int
            and value.replace(",", "").strip().isdigit()
        ):
            value = [int(v) for v in value.split(",")]  # "0,3,6" from a command-line flag
        if not isinstance(value, (list, tuple)):
            raise XprobeError(f"{name} must be a list, got {value!r}")
        item = args[0] if args else Any
        return tuple(_check_type(f"{name}[{i}]", v, item) for i, v in enumerate(value))
    if annotation is Any:
        return value
    if annotation is str and isinstance(value, os.PathLike):
        return os.fspath(value)
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation in (int, float, str, bool):
        if not isinstance(value, annotation) or (annotation is int and isinstance(value, bool)):
            raise XprobeError(f"{name} must be {annotation.__name__}, got {value!r}")
        return value
    return value


def from_dict(
    cls: type[T], data: dict[str, Any], where: str = "", base: str | Path | None = None
) -> T:
    """Build config dataclass ``cls`` from a TOML table, refusing unknown keys and bad types.

    ``base``: the folder relative paths are relative to (a TOML file's folder); by default they
    stay as written, i.e. relative to the working directory.
    """
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    data = relative_to(cls, data, base)
    prefix = f"[{where}] " if where else ""
    if unknown:
        raise XprobeError(f"{prefix}unknown config key(s) {unknown}; known keys: {sorted(fields)}")
    hints = _hints(cls)
    kwargs = {}
    for key, value in data.items():
        kwargs[key] = _check_type(f"{prefix}{key}", value, hints[key])
    missing = [
        f.name
        for f in fields.values()
        if f.name not in kwargs
        and f.default is dataclasses.MISSING
        and f.default_factory is dataclasses.MISSING
    ]
    if missing:
        raise XprobeError(f"{prefix}missing required config key(s) {missing}")
    try:
        return cls(**kwargs)
    except XprobeError as e:
        raise XprobeError(f"{prefix}{e}") from None


@functools.cache
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def check_fields(cfg: Any) -> None:
    """Check (and coerce: lists to tuples, ints to floats) every field of a frozen config dataclass
    against its annotation; call first in its ``__post_init__``."""
    hints = _hints(type(cfg))
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        checked = _check_type(f.name, value, hints[f.name])
        if checked is not value:
            object.__setattr__(cfg, f.name, checked)


def parse_flag(hint: Any, values: tuple[str, ...] | list[str], flag: str) -> Any:
    """A list-typed field's value from command-line strings: each repeated flag may hold several
    comma-separated items (``--layers 0,3 --layers 6``), each converted to the list's item type;
    a list-or-literal field (``layers``) also takes its literal (``--layers all``)."""
    options = [a for a in typing.get_args(hint) if a is not type(None)] or [hint]
    if typing.get_origin(hint) not in (typing.Union, types.UnionType):
        options = [hint]
    items = [p.strip() for v in values for p in str(v).split(",") if p.strip()]
    for option in options:
        if typing.get_origin(option) is typing.Literal and len(items) == 1:
            if items[0] in typing.get_args(option):
                return items[0]
    list_type = next((o for o in options if typing.get_origin(o) in (list, tuple)), None)
    item = (typing.get_args(list_type) or (str,))[0] if list_type is not None else str
    if item in (int, float):
        out = []
        for text in items:
            try:
                out.append(item(text))
            except ValueError:
                kind = "an integer" if item is int else "a number"
                raise XprobeError(f"{flag}: {text!r} is not {kind}") from None
        return out
    return items


def is_list_field(hint: Any) -> bool:
    """Whether a field annotation is a list/tuple, or a union holding one."""
    if typing.get_origin(hint) in (list, tuple):
        return True
    return any(typing.get_origin(a) in (list, tuple) for a in typing.get_args(hint))


def canonical(cfg: Any, include_runtime: bool = False) -> dict[str, Any]:
    """The config as a JSON-able dict (tuples as lists, path fields absolute and normalised),
    optionally without runtime fields. A plain dict (a stage's narrower identity) is returned in
    its JSON form."""
    if not dataclasses.is_dataclass(cfg):
        return json.loads(json.dumps(cfg, sort_keys=True, default=str))
    out = {}
    for f in dataclasses.fields(cfg):
        if f.metadata.get("runtime") and not include_runtime:
            continue
        value = getattr(cfg, f.name)
        if f.metadata.get("path") and value is not None:
            value = _normalize_paths(type(cfg), {f.name: value}, None)[f.name]
        out[f.name] = list(value) if isinstance(value, tuple) else value
    return json.loads(json.dumps(out, sort_keys=True, default=str))


def fingerprint(obj: Any) -> str:
    """sha256 of the canonical JSON of ``obj`` (a config dataclass or a plain JSON value)."""
    if dataclasses.is_dataclass(obj):
        obj = canonical(obj)
    blob = json.dumps(obj, sort_keys=True, separators=(",", ":"), default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def diff_keys(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """Keys whose values differ between two canonical configs, with both values shown."""
    keys = sorted(set(old) | set(new))
    return [
        f"{k}: stored {old.get(k)!r} != requested {new.get(k)!r}"
        for k in keys
        if old.get(k) != new.get(k)
    ]

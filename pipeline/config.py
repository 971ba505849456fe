"""Config dataclasses: loading from TOML tables, validation, canonical form and fingerprint.

Every stage exposes a frozen dataclass. A field whose metadata has ``runtime=True`` (progress
bars, prefetch depth, worker counts) does not change what the stage writes, so it is left out
of the fingerprint that guards a store against being resumed with another config.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
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
        if isinstance(value, str) and args and args[0] is str:
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
    if annotation is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if annotation in (int, float, str, bool):
        if not isinstance(value, annotation) or (annotation is int and isinstance(value, bool)):
            raise XprobeError(f"{name} must be {annotation.__name__}, got {value!r}")
        return value
    return value


def from_dict(cls: type[T], data: dict[str, Any], where: str = "") -> T:
    """Build config dataclass ``cls`` from a TOML table, refusing unknown keys and bad types."""
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - set(fields))
    prefix = f"[{where}] " if where else ""
    if unknown:
        raise XprobeError(f"{prefix}unknown config key(s) {unknown}; known keys: {sorted(fields)}")
    hints = typing.get_type_hints(cls)
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
    return cls(**kwargs)


def canonical(cfg: Any, include_runtime: bool = False) -> dict[str, Any]:
    """The config as a JSON-able dict (tuples as lists), optionally without runtime fields.
    A plain dict (a stage's narrower identity) is returned in its JSON form."""
    if not dataclasses.is_dataclass(cfg):
        return json.loads(json.dumps(cfg, sort_keys=True, default=str))
    out = {}
    for f in dataclasses.fields(cfg):
        if f.metadata.get("runtime") and not include_runtime:
            continue
        value = getattr(cfg, f.name)
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

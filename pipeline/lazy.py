"""torch and zarr, imported on first use: ``from pipeline.lazy import torch, zarr``.

Checking a config imports the stage modules (each holds its config dataclass), and importing
torch takes seconds (zarr a third of one); so the stage modules and the machinery they use take
``torch`` and ``zarr`` from here: stand-ins that import the real module the first time one of its
attributes is read. A config error is then reported before either is loaded. At import time
(decorators, default arguments, module constants) a module must not read ``torch.<anything>``:
use ``inference_mode`` below, and ``None`` defaults resolved in the function.
"""

from __future__ import annotations

import functools
import importlib
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

F = TypeVar("F", bound=Callable[..., Any])


class LazyModule:
    """A stand-in for the module ``name`` that imports it when an attribute is first read."""

    __slots__ = ("_name",)

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        if attr == "_name":  # not set yet (an instance being copied or unpickled)
            raise AttributeError(attr)
        # Reached for every name but _name, so for all of the module's; read from the module
        # each time, so that a name patched on it (tests) is seen here too.
        module = sys.modules.get(self._name) or importlib.import_module(self._name)
        return getattr(module, attr)

    def __dir__(self) -> list[str]:
        return dir(importlib.import_module(self._name))

    def __repr__(self) -> str:
        return f"<{self._name}, imported on first use (pipeline/lazy.py)>"

    def __reduce__(self) -> tuple[Any, ...]:
        return LazyModule, (self._name,)


if TYPE_CHECKING:  # type checkers and editors see the real modules
    import torch
    import zarr
else:
    torch = LazyModule("torch")
    zarr = LazyModule("zarr")


def inference_mode(fn: F) -> F:
    """``@torch.inference_mode()`` without importing torch when the function is defined: the
    decorated function (generators included, as torch wraps them) is built on the first call."""
    wrapped: Callable[..., Any] | None = None

    @functools.wraps(fn)
    def call(*args: Any, **kwargs: Any) -> Any:
        nonlocal wrapped
        if wrapped is None:
            wrapped = torch.inference_mode()(fn)
        return wrapped(*args, **kwargs)

    return call  # type: ignore[return-value]

"""One writer per unit kind, checked on the source: only the lifecycle locks a unit, creates it
with its provenance and marks it complete (``pipeline/lifecycle.py``); stages, the export and the
report go through it."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).parents[1]
LIFECYCLE_ONLY = ("acquire_lock", "release_lock", "create_unit", "mark_complete")
"""``Store`` methods that only the lifecycle (and the store itself) may call."""


def _calls(path: Path) -> set[str]:
    """Names of the methods ``path`` calls as ``<something>.<name>(...)``."""
    return {
        node.func.attr
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
    }


def test_only_the_lifecycle_locks_creates_and_completes_units():
    allowed = {ROOT / "pipeline" / "lifecycle.py"}
    allowed |= set((ROOT / "pipeline" / "store").glob("*.py"))  # the methods themselves
    files = sorted((ROOT / "pipeline").rglob("*.py")) + sorted((ROOT / "stages").glob("*.py"))
    assert len(files) > 50
    for path in files:
        if path in allowed:
            continue
        bad = _calls(path) & set(LIFECYCLE_ONLY)
        assert not bad, f"{path.relative_to(ROOT)} calls {sorted(bad)}: go through the lifecycle"
    assert set(LIFECYCLE_ONLY) <= _calls(ROOT / "pipeline" / "lifecycle.py")

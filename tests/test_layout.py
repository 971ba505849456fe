"""The layout's rules, checked on the source: the pure maths never reaches the store, stages
never import each other, and nothing imports across the boundaries the README describes."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).parents[1]


def _imports(path: Path) -> set[str]:
    """Every module ``path`` imports (at any depth: lazy imports inside functions count)."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            out.add(node.module)
            out.update(f"{node.module}.{a.name}" for a in node.names)
    return out


def test_pure_maths_never_imports_the_store_or_io():
    files = sorted((ROOT / "pipeline" / "maths").glob("*.py"))
    assert len(files) >= 7
    for path in files:
        bad = {
            m
            for m in _imports(path)
            if m.startswith(("pipeline.store", "zarr", "stages", "pipeline.lifecycle", "fsspec"))
            or m.startswith(("pipeline.report", "pipeline.inputs", "sae_lens", "transformers"))
        }
        assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_stages_never_import_each_other():
    stages = {p.stem for p in (ROOT / "stages").glob("*.py") if p.stem != "__init__"}
    for path in (ROOT / "stages").glob("*.py"):
        bad = {m for m in _imports(path) if m.split(".")[0] == "stages"}
        assert not bad, f"{path.name} imports {sorted(bad)}"
    assert {"tokenize", "activations", "features", "fit", "match", "report"} <= stages


def test_lifecycle_and_distributed_do_not_import_each_other_at_module_level():
    dist = _imports(ROOT / "pipeline" / "distributed.py")
    assert not any(m.startswith("pipeline.lifecycle") for m in dist)


def _loads_sae(path: Path) -> bool:
    return any(
        isinstance(node, ast.Attribute)
        and node.attr in ("load_from_disk", "from_pretrained")
        and isinstance(node.value, ast.Name)
        and node.value.id == "SAE"
        for node in ast.walk(ast.parse(path.read_text()))
    )


def test_one_sae_loader():
    files = list((ROOT / "pipeline").rglob("*.py")) + list((ROOT / "stages").glob("*.py"))
    users = sorted(p.relative_to(ROOT).as_posix() for p in files if _loads_sae(p))
    # the loader itself, the demo builder that trains and reloads its own SAE, and the bench,
    # whose reference is sae-lens's own loading and encoding
    assert users == [
        "pipeline/bench/bench_features.py",
        "pipeline/demo/build.py",
        "pipeline/demo/sae.py",
        "pipeline/inputs/sae.py",
    ]


def test_every_package_folder_is_installed():
    """pyproject lists its packages (``xprobe`` is pipeline/alias): a new package folder that is
    not listed would be missing from a wheel."""
    import tomllib

    listed = set(
        tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = {
        ".".join(p.parent.relative_to(ROOT).parts)
        for top in ("pipeline", "stages")
        for p in (ROOT / top).rglob("__init__.py")
    }
    assert found | {"xprobe"} == listed


def test_xprobe_is_pipeline():
    import pipeline
    import xprobe

    assert xprobe is pipeline and xprobe.direction is pipeline.direction

"""The newcomer's path: the README's "Your own pair of models" TOML and the chat example run as
the README and docs/chat.md write them, from a working directory that is not the TOML's folder
(relative paths resolve against the TOML's folder)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import xprobe
from pipeline.cli import cli
from pipeline.store import Store

ROOT = Path(__file__).parents[1]
PAIR = ROOT / "examples" / "pair.toml"


def _readme_block(marker: str) -> str:
    """The fenced block that follows ``<!-- marker`` in the README."""
    text = (ROOT / "README.md").read_text()
    after = text.split(f"<!-- {marker}", 1)[1]
    return after.split("```toml\n", 1)[1].split("```", 1)[0]


def test_readme_pair_toml_is_the_example_file():
    lines = PAIR.read_text().splitlines(keepends=True)
    body = "".join(lines[next(i for i, line in enumerate(lines) if not line.startswith("#")) :])
    assert _readme_block("pair-toml") == body


def test_readme_is_a_front_door():
    assert len((ROOT / "README.md").read_bytes()) <= 15_000
    for link in ("docs/config.md", "docs/report.md", "docs/chat.md", "docs/store.md"):
        assert (ROOT / link).exists(), link


def test_pair_dry_run_names_the_derived_units(tmp_path):
    result = CliRunner().invoke(
        cli, ["run", str(PAIR), "--store", str(tmp_path / "s"), "--dry-run"]
    )
    assert result.exit_code == 0, result.output
    for unit in ("tokens/code", "acts/code/A/blocks.2.hook_resid_post", "probes/ceiling"):
        assert unit in result.output
    assert "acts/code/random/blocks.3.hook_resid_post" in result.output
    assert "probes/random" in result.output and "report/main" in result.output
    assert not (tmp_path / "s").exists() and not (tmp_path / "s.floor").exists()


@pytest.mark.slow
def test_pair_toml_runs_as_written(tmp_path):
    """``xprobe run examples/pair.toml`` from another folder: the ceiling and the floor derived,
    the answers readable with ``xprobe.direction``."""
    store_path = tmp_path / "store"
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "run", str(PAIR), "--store", str(store_path)]
        + ["--no-progress"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "it/s]" not in result.stderr  # quiet: no transformers/hub bars either
    assert "B " in result.stdout and "random (floor)" in result.stdout
    store = Store(store_path, mode="r")
    ceiling = store.info("probes/ceiling")["config"]
    assert ceiling["model"] == "A" and ceiling["hooks"] == ["blocks.2.hook_resid_post"]
    b, floor = store.info("probes/B")["config"], store.info("probes/random")["config"]
    assert floor["model"] == "random" and floor["hooks"] == b["hooks"]
    assert (ceiling["split_seed"], ceiling["n_bootstrap"]) == (b["split_seed"], b["n_bootstrap"])
    # the floor is a seeded random initialisation of B's architecture, beside the store
    floor_model = store_path.parent / "store.floor" / "B"
    assert (floor_model / "xprobe-floor.json").exists()
    model_ref = store.info("acts/code/random/blocks.1.hook_resid_post")["lineage"]["model"]["ref"]
    assert model_ref == str(floor_model.resolve())
    table = xprobe.load_table(store)
    f = int(table.loc[table["status"] == "scored", "feature"].iloc[0])
    hook = xprobe.best_hook(store, "B", f)
    assert hook == table.loc[f, "B_best_hook"]
    w = xprobe.direction(store, "B", f)
    assert w.shape == (128,) and np.isfinite(w).all()
    assert np.array_equal(w, store.array(f"probes/B/{hook}/direction")[f])


@pytest.mark.slow
def test_chat_example_runs_as_written(tmp_path):
    """``python examples/chat_example.py`` then ``xprobe run examples/chat.toml`` (in a copy of
    the examples folder, run from the copy's parent as from a clone's root); the lineage
    records absolute paths, so ``xprobe status`` works from any folder without the network."""
    (tmp_path / "examples").mkdir()
    for name in ("chat_example.py", "chat.toml"):
        shutil.copy(ROOT / "examples" / name, tmp_path / "examples" / name)
    os.symlink(ROOT / "pipeline", tmp_path / "pipeline")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}

    def run(*args: str, cwd: Path = tmp_path) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, *args], capture_output=True, text=True, cwd=cwd, env=env
        )

    made = run("examples/chat_example.py")
    assert made.returncode == 0, made.stderr
    ran = run("-m", "pipeline.cli", "run", "examples/chat.toml", "--no-progress")
    assert ran.returncode == 0, ran.stdout + ran.stderr
    assert "acts/chats/B_instruct/blocks.2.hook_resid_post" in ran.stdout
    store = Store(tmp_path / "examples" / "work-chat" / "store", mode="r")
    info = store.info("tokens/chats")
    assert Path(info["chat_template_from"]).is_absolute()
    assert Path(info["lineage"]["tokenizer"]["ref"]).is_absolute()
    assert Path(info["lineage"]["chat_template"]["ref"]).is_absolute()
    status = run("-m", "pipeline.cli", "status", str(store.local_path), cwd=tmp_path / "examples")
    assert status.returncode == 0 and "STALE" not in status.stdout, status.stdout + status.stderr

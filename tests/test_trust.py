"""A cache from someone else is data, not code (issue 29).

Checkpoints cannot run code (a planted pickle is refused, and does not run); everything a store
says about itself is checked before it is used (chunk counts, shapes, dtypes, markers, zip member
names); ``export --force`` replaces only an earlier export, written elsewhere and moved into
place complete; temp files never follow a planted symlink; read-only stores serve what is
complete, and ``--force`` on one refuses.
"""

from __future__ import annotations

import json
import os
import pickle
import stat
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from pipeline.errors import XprobeError
from pipeline.store import Store
from pipeline.store.checkpoint import (
    CHECKPOINT,
    LEGACY_CHECKPOINT,
    load_checkpoint,
    save_checkpoint,
)
from tests import test_reliability
from tests.helpers import xprobe
from tests.test_reliability import _bind_read_only, _copy, _fit_cfg

ROOT = Path(__file__).parents[1]
HOOK = "blocks.0.hook_resid_post"
complete = test_reliability.complete
"""Every stage complete (tokens, acts, two SAEs' features, fits B and B2, a match, a report)."""


def _cli(*args: str) -> subprocess.CompletedProcess:
    """``xprobe ARGS`` in process (tests/helpers.py): the same main(), no interpreter to start."""
    return xprobe(*args)


def _one_error(proc: subprocess.CompletedProcess, *words: str) -> str:
    err = proc.stderr.strip()
    assert proc.returncode == 2, (proc.stdout, err)
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for w in words:
        assert w in err, err
    return err


# ---- 1. checkpoints cannot run code ------------------------------------------------------------
class _Payload:
    """Unpickled, it creates ``path``: what a sender's pickle would do on the receiver's machine."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (os.system, (f"touch {self.path}",))


def test_checkpoint_round_trips_the_nested_state_exactly(tmp_path):
    import torch

    store = Store(tmp_path / "s")
    state = {
        "consumed": [3, 1, 2],
        "plan": {"mode": "dense", "blocks": [(0, 5), (5, 9)]},
        "block": 1,
        "pairs": None,
        "ratio": 0.25,
        "flag": True,
        "stats": {
            "blocks.0.hook_resid_post": {
                "train": {
                    "n": torch.tensor(7, dtype=torch.int64),
                    "cxx": torch.randn(4, 4, dtype=torch.float64),
                    "half": torch.randn(3).to(torch.bfloat16),
                    "mask": torch.tensor([True, False]),
                    "empty": torch.zeros((0, 3), dtype=torch.int32),
                    "view": torch.arange(12.0).reshape(3, 4).T,  # not contiguous
                }
            }
        },
    }
    save_checkpoint(store, "probes/p", state)
    got = load_checkpoint(store, "probes/p")
    assert got["consumed"] == [3, 1, 2] and got["plan"]["blocks"] == [(0, 5), (5, 9)]
    assert (got["block"], got["pairs"], got["ratio"], got["flag"]) == (1, None, 0.25, True)
    for name, want in state["stats"]["blocks.0.hook_resid_post"]["train"].items():
        have = got["stats"]["blocks.0.hook_resid_post"]["train"][name]
        assert have.dtype == want.dtype and have.shape == want.shape, name
        assert torch.equal(have, want), name
    assert (tmp_path / "s/probes/p" / CHECKPOINT).exists()
    assert [p.name for p in (tmp_path / "s/probes/p").iterdir()] == [CHECKPOINT]  # no temp left


@pytest.mark.parametrize("name", [CHECKPOINT, LEGACY_CHECKPOINT])
def test_a_pickle_planted_as_a_checkpoint_is_refused_and_never_runs(complete, tmp_path, name):
    """An unfinished fit in a store copied from someone else, its checkpoint replaced by a
    pickle that would create a file: ``xprobe run`` refuses it in one line; no file appears."""
    from pipeline.probes import accumulate
    from stages.fit import run as fit

    root, config = _copy(complete, tmp_path)
    store = Store(root / "store")
    cfg = _fit_cfg("P", checkpoint_every=1)
    calls, add_chunk = {"n": 0}, accumulate.add_chunk

    def stop_after_three(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 3:
            raise RuntimeError("stopped")
        return add_chunk(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(accumulate, "add_chunk", stop_after_three)
        with pytest.raises(RuntimeError, match="stopped"):
            fit(cfg, store)
    unit = root / "store/probes/P"
    assert len(load_checkpoint(store, "probes/P")["consumed"]) == 3  # a real unfinished fit
    ran = tmp_path / "payload-ran"
    (unit / CHECKPOINT).unlink()
    (unit / name).write_bytes(pickle.dumps(_Payload(ran)))
    config.write_text(
        config.read_text()
        + f'\n[[fit]]\nname = "P"\ncorpus = "c"\nfeatures = "sae_a"\nmodel = "a"\n'
        f'hooks = ["{HOOK}"]\ndevice = "cpu"\nmin_active = 1\nprogress = false\n'
        "lambdas = [0.0]\ncheckpoint_every = 1\nn_bootstrap = 20\n"
    )
    proc = _cli("run", str(config), "--only", "fit")
    words = "pickle format" if name == LEGACY_CHECKPOINT else "cannot be read"
    _one_error(proc, str(unit / name), words, "--force")
    assert not ran.exists(), "the planted pickle ran"
    assert (unit / name).exists()  # refused, not deleted: the user decides
    assert not (root / "store/probes/P.lock").exists()


# ---- 4. crafted caches -------------------------------------------------------------------------
def _set_info(store_path: Path, unit: str, **facts) -> None:
    meta = store_path / unit / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["attributes"]["xprobe"].update(facts)
    meta.write_text(json.dumps(doc))


def _set_array(store_path: Path, array: str, shape: list[int], chunks: list[int]) -> None:
    meta = store_path / array / "zarr.json"
    doc = json.loads(meta.read_text())
    doc["shape"] = shape
    doc["chunk_grid"]["configuration"]["chunk_shape"] = chunks
    meta.write_text(json.dumps(doc))


ACTS = f"acts/c/a/{HOOK}"


@pytest.mark.parametrize(
    "craft, words",
    [
        (lambda s: _set_info(s, "tokens/c", n_chunks=10**11), "n_chunks = 100,000,000,000"),
        (lambda s: _set_info(s, ACTS, n_chunks=40), "but the unit records 40"),
        (lambda s: _set_info(s, ACTS, n_chunks="13"), "not a count"),
        (lambda s: _set_info(s, ACTS, dtype="float64"), "dtype 'float64'"),
        (
            lambda s: _set_array(s, f"{ACTS}/x", [13 * 10**10, 64], [10**10, 64]),
            "tokens unit has 1,600 positions",
        ),
        (lambda s: _set_array(s, "tokens/c/ids", [10**12, 32], [10**12, 32]), "ids"),
    ],
    ids=["n_chunks_1e11", "n_chunks_vs_grid", "n_chunks_str", "dtype", "shape_4TiB", "tokens"],
)
def test_a_crafted_cache_is_one_malformed_line_on_every_command(complete, tmp_path, craft, words):
    root, config = _copy(complete, tmp_path)
    cache = root / "store"
    craft(cache)
    for args in (["info", str(cache)], ["verify", str(cache)], ["status", str(cache)]):
        _one_error(_cli(*args), f"the cache {cache} is malformed", words)
    config.write_text(  # a new fit: it reads the crafted units from the cache
        config.read_text()
        + f'\n[[fit]]\nname = "N"\ncorpus = "c"\nfeatures = "sae_a"\nmodel = "a"\n'
        f'hooks = ["{HOOK}"]\ndevice = "cpu"\nmin_active = 1\nprogress = false\n'
    )
    local = tmp_path / "local"
    proc = _cli("run", str(config), "--store", str(local), "--cache", str(cache), "--only", "fit")
    _one_error(proc, f"the cache {cache} is malformed", words)
    assert not local.exists()


def test_crafted_markers_and_zip_member_names_are_malformed(complete, tmp_path):
    root, _ = _copy(complete, tmp_path)
    store_path = root / "store"
    packed = Store(store_path).pack(tmp_path / "s.zip")
    with zipfile.ZipFile(packed, "a") as zf:
        zf.writestr("../../outside.json", "{}")
    _one_error(_cli("info", str(packed)), "is malformed", "zip member named '../../outside.json'")
    (tmp_path / "not.zip").write_bytes(b"not a zip")
    _one_error(_cli("info", str(tmp_path / "not.zip")), "is malformed", "not a zip file")
    (store_path / "tokens/c/_done/2.json").write_text("[1, 2")
    _one_error(_cli("verify", str(store_path)), "marker of chunk 2 of tokens/c is not JSON")
    (store_path / "tokens/c/_done/2.json").write_text('{"crc32": {"ids": "x"}}')
    _one_error(_cli("verify", str(store_path)), "marker of chunk 2 of tokens/c has no valid")


# ---- 5. export --force ---------------------------------------------------------------------------
def test_export_force_replaces_only_an_earlier_export_and_never_leaves_a_partial_one(
    complete, tmp_path, monkeypatch
):
    import pipeline.export.run as export_run
    from pipeline.export.run import export_fit

    store = Store(complete / "store", mode="r")
    out = tmp_path / "exports" / "sae"
    mine = tmp_path / "exports" / "notes"
    mine.mkdir(parents=True)
    (mine / "thesis.tex").write_text("years of work")
    with pytest.raises(XprobeError, match="replaces only an earlier xprobe export"):
        export_fit(store, "B", mine, min_r2=0.0, eval_tokens=None, force=True)
    assert (mine / "thesis.tex").read_text() == "years of work"

    export_fit(store, "B", out, min_r2=0.0, eval_tokens=500)
    assert {p.name for p in out.iterdir()} >= {"cfg.json", "metrics.json"}
    first = (out / "cfg.json").read_bytes()
    with pytest.raises(XprobeError, match="not empty"):
        export_fit(store, "B", out, min_r2=0.0, eval_tokens=None)

    # killed while measuring: the earlier export stays whole, nothing partial is left beside it
    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(export_run, "measure", killed)
    with pytest.raises(KeyboardInterrupt):
        export_fit(store, "B", out, min_r2=0.0, eval_tokens=500, force=True)
    assert (out / "cfg.json").read_bytes() == first and (out / "metrics.json").exists()
    assert sorted(p.name for p in out.parent.iterdir()) == ["notes", "sae"]
    monkeypatch.undo()

    (out / "stray.txt").write_text("mine")  # an export folder with a file of someone else's
    with pytest.raises(XprobeError, match=r"files an export does not write \(stray.txt\)"):
        export_fit(store, "B", out, min_r2=0.0, eval_tokens=None, force=True)
    (out / "stray.txt").unlink()
    export_fit(store, "B", out, min_r2=0.5, eval_tokens=None, force=True)
    assert not (out / "metrics.json").exists()  # the earlier export replaced, not merged
    assert sorted(p.name for p in out.parent.iterdir()) == ["notes", "sae"]


# ---- 6. temp files never follow a planted symlink -------------------------------------------------
def test_temp_files_never_follow_a_planted_symlink(complete, tmp_path):
    root, _ = _copy(complete, tmp_path)
    store_path = root / "store"
    victim = tmp_path / "victim"
    victim.write_text("untouched")
    out = tmp_path / "shared.zip"
    pid = os.getpid()
    planted = [
        tmp_path / ".shared.zip.tmp",  # the names an older xprobe wrote through
        store_path / f"tokens/c/.note.txt.{pid}.tmp",
        store_path / f"probes/B/.{CHECKPOINT}.{pid}.tmp",
        store_path / f"probes/B/._checkpoint.pt.{pid}.tmp",
    ]
    for link in planted:
        link.symlink_to(victim)
    store = Store(store_path)
    store.pack(out)
    store.write_text("tokens/c/note.txt", "hello")
    save_checkpoint(store, "probes/B", {"consumed": [1]})
    assert victim.read_text() == "untouched"
    assert Store(out, mode="r").has("tokens/c") and store.read_text("tokens/c/note.txt") == "hello"
    assert load_checkpoint(store, "probes/B") == {"consumed": [1]}
    umask = os.umask(0)
    os.umask(umask)
    mode = stat.S_IMODE((store_path / "tokens/c/note.txt").stat().st_mode)
    assert mode == 0o666 & ~umask  # shareable as open() would make it, not mkstemp's 0600
    with zipfile.ZipFile(out) as zf:
        assert not any(n.endswith(".tmp") for n in zf.namelist())


# ---- 7. read-only stores -------------------------------------------------------------------------
def test_a_complete_report_is_served_not_rewritten(complete, tmp_path):
    """``xprobe report`` twice on a complete report: the table files keep their bytes and
    times (nothing is rewritten, so a read-only store serves it too)."""
    root, config = _copy(complete, tmp_path)
    first = _cli("report", "--config", str(config))
    assert first.returncode == 0, first.stderr
    files = [root / "store/report/main" / n for n in ("table.parquet", "table.csv", "report.html")]
    before = [(p.stat().st_mtime_ns, p.read_bytes()) for p in files]
    again = _cli("report", "--config", str(config))
    assert again.returncode == 0, again.stderr
    assert [(p.stat().st_mtime_ns, p.read_bytes()) for p in files] == before


def test_read_only_mount_serves_and_force_refuses(complete, tmp_path):
    root, config = _copy(complete, tmp_path)
    mnt = tmp_path / "ro"
    if not _bind_read_only(root / "store", mnt):
        pytest.skip("cannot bind-mount read-only here (needs root and mount)")
    try:
        ro = tmp_path / "ro.toml"
        ro.write_text(config.read_text().replace(str(root / "store"), str(mnt)))
        noop = _cli("run", str(ro))
        assert noop.returncode == 0 and "Traceback" not in noop.stderr, noop.stderr
        assert noop.stdout.count("already complete") == 7, noop.stdout
        assert "served as written" in noop.stdout  # the page names the store by its folder
        _one_error(_cli("run", str(ro), "--only", "fit", "--force"), "--force cannot start")
        assert not (mnt / "probes/B.lock").exists()
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_full_disk_anywhere_is_one_line(complete, tmp_path, monkeypatch, capsys):
    """ENOSPC from any write the CLI reaches (here: a store side file) is one ``error:`` line."""
    import errno

    from pipeline.cli import main
    from pipeline.store import io as store_io

    root, _ = _copy(complete, tmp_path)

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(store_io, "new_temp_file", full)
    monkeypatch.setattr(sys, "argv", ["xprobe", "pack", str(root / "store"), str(tmp_path / "z")])
    with pytest.raises(SystemExit) as exit_:
        main()
    err = capsys.readouterr().err.strip()
    assert exit_.value.code == 2 and err.startswith("error: the disk is full") and "\n" not in err
    assert not (tmp_path / "z").exists()
    assert np.all([not p.name.endswith(".tmp") for p in tmp_path.iterdir()])

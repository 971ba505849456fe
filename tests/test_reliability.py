"""What an independent fault harness found (issue 21), each as a test that failed before.

verify on whole-unit outputs, restarting a tokenize whose input was fixed, a full disk while a
checkpoint is saved, SIGTERM and Ctrl-C, read-only stores (mode "r" and a real read-only mount),
bad inputs that gave tracebacks or wrong words, and fits/matches served from a shared cache.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.cli import cli
from pipeline.errors import XprobeError
from pipeline.store import Store
from pipeline.store.verify import verify_store
from tests.helpers import pipeline_config, save_standard_sae, wait_for_markers, xprobe

ROOT = Path(__file__).parents[1]
HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def complete(tmp_path_factory, corpus_jsonl, tokenizer_dir, gpt2_dir) -> Path:
    """A store with every stage complete: tokens, activations, two SAEs' features, two fits,
    a match and a report. Tests copy it before changing anything."""
    root = tmp_path_factory.mktemp("complete")
    sae_a = save_standard_sae(root / "sae_a", hook=HOOK, seed=0)
    sae_b = save_standard_sae(root / "sae_b", hook=HOOK, seed=3)
    config = pipeline_config(root, corpus_jsonl, tokenizer_dir, gpt2_dir, sae_a, sae_b, hook=HOOK)
    result = CliRunner().invoke(cli, ["run", str(config)])
    assert result.exit_code == 0, result.output
    return root


def _copy(complete: Path, tmp_path: Path) -> tuple[Path, Path]:
    """A copy of the complete store and a config pointing at it."""
    root = tmp_path / "copy"
    shutil.copytree(complete, root, symlinks=True)
    config = root / "x.toml"
    text = (complete / "x.toml").read_text()
    config.write_text(text.replace(str(complete / "store"), str(root / "store")))
    return root, config


def _fit_cfg(name: str, **kw):
    """The config of fit ``name`` of model a on sae_a; the defaults are those of fit B."""
    from stages.fit import FitConfig

    kw = {
        "min_active": 1,
        "lambdas": (0.0,),
        "n_bootstrap": 20,
        "device": "cpu",
        "progress": False,
        **kw,
    }
    return FitConfig(name=name, corpus="c", features="sae_a", model="a", hooks=(HOOK,), **kw)


# ---- 1. verify checks what each unit promises ------------------------------------------------------
def test_verify_is_clean_on_whole_unit_outputs_and_catches_their_corruption(complete, tmp_path):
    root, config = _copy(complete, tmp_path)
    store_path = root / "store"
    clean = CliRunner().invoke(cli, ["verify", str(store_path)])
    assert clean.exit_code == 0, clean.output
    assert "matches its checksum" in clean.output
    packed = Store(store_path).pack(tmp_path / "s.zip")
    assert verify_store(Store(packed, mode="r")) == []
    # corrupt one array of the fit: its file is rewritten with other values of the same shape
    store = Store(store_path)
    arr = store.array(f"probes/B/{HOOK}/r2_held_out")
    arr[:] = arr[:] + 1.0
    problems = verify_store(store)
    assert [(p.unit, p.array) for p in problems] == [("probes/B", f"{HOOK}/r2_held_out")]
    assert problems[0].chunk is None
    verify_store(store, repair=True)
    assert not store.info("probes/B").get("complete")
    rerun = CliRunner().invoke(cli, ["run", str(config)])
    assert rerun.exit_code == 0, rerun.output
    assert "fit: wrote" in rerun.output and rerun.output.count("fit: already complete") == 1
    assert verify_store(Store(store_path)) == []
    fresh = np.asarray(Store(complete / "store", mode="r").array(f"probes/B/{HOOK}/r2_held_out"))
    assert np.array_equal(Store(store_path).array(f"probes/B/{HOOK}/r2_held_out")[:], fresh)


# ---- 2. a tokenize that failed on bad input restarts once the input is fixed -----------------------
def _tok(corpus: Path, tokenizer_dir: Path, **kw):
    from stages.tokenize import TokenizeConfig

    return TokenizeConfig(
        corpus="c",
        source=(str(corpus),),
        tokenizer=str(tokenizer_dir),
        ctx=32,
        chunk_seqs=1,
        batch_docs=4,
        progress=False,
        **kw,
    )


def test_tokenize_restarts_after_bad_input_is_fixed(tmp_path, documents, tokenizer_dir):
    from stages.tokenize import run

    lines = [json.dumps({"text": d}).encode() + b"\n" for d in documents[:60]]
    corpus = tmp_path / "docs.jsonl"
    bad = lines[:40] + [b'{"text": "caf\xe9"}\n'] + lines[40:]  # latin-1 byte mid-file
    corpus.write_bytes(b"".join(bad))
    store = Store(tmp_path / "s")
    with pytest.raises(XprobeError, match="not valid UTF-8"):
        run(_tok(corpus, tokenizer_dir), store)
    assert store.done_chunks("tokens/c"), "chunks before the bad line were committed"
    corpus.write_bytes(b"".join(lines))  # fixed
    with pytest.raises(XprobeError, match="tokens/c is stale: the files .* changed"):
        run(_tok(corpus, tokenizer_dir), store)  # resuming would mix two corpora
    run(_tok(corpus, tokenizer_dir), store, force=True)
    ref = Store(tmp_path / "ref")
    run(_tok(corpus, tokenizer_dir), ref)
    assert (
        store.info("tokens/c")["content_fingerprint"] == ref.info("tokens/c")["content_fingerprint"]
    )
    # bad from the first line: nothing committed, so the fixed input just runs
    corpus.write_bytes(b'{"text": "caf\xe9"}\n' + b"".join(lines))
    other = Store(tmp_path / "o")
    with pytest.raises(XprobeError, match="not valid UTF-8"):
        run(_tok(corpus, tokenizer_dir), other)
    corpus.write_bytes(b"".join(lines))
    assert run(_tok(corpus, tokenizer_dir), other)["chunks_written"] > 0


# ---- 3. a full disk while a checkpoint is saved ---------------------------------------------------
def test_full_disk_in_a_fit_checkpoint_is_one_line_and_leaves_no_temp_file(
    complete, tmp_path, monkeypatch
):
    from pipeline.store import checkpoint
    from stages.fit import FitConfig
    from stages.fit import run as fit

    root, _ = _copy(complete, tmp_path)
    store = Store(root / "store")
    unit_dir = root / "store/probes/F"
    unit_dir.mkdir(parents=True)
    dead = (
        unit_dir / "._checkpoint.safetensors.999999.x1y2z3.tmp"
    )  # left by a writer that was killed
    dead.write_bytes(b"x" * 1000)
    real_write, calls = checkpoint._write, []

    def write_until_full(f, *args):
        calls.append(1)
        if len(calls) >= 2:  # the second checkpoint hits a full disk halfway through
            f.write(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(f, *args)

    monkeypatch.setattr(checkpoint, "_write", write_until_full)
    cfg = _fit_cfg("F", checkpoint_every=2, min_active=10, lambdas=FitConfig.lambdas)
    with pytest.raises(XprobeError) as e:
        fit(cfg, store)
    assert "disk holding" in str(e.value) and "is full" in str(e.value) and "\n" not in str(e.value)
    left = sorted(p.name for p in unit_dir.iterdir() if p.name.startswith("."))
    assert left == [], left  # neither the dead writer's temp file nor ours
    state = checkpoint.load_checkpoint(store, "probes/F")
    assert state is not None and len(state["consumed"]) == 2  # the first checkpoint is intact
    monkeypatch.setattr(checkpoint, "_write", real_write)
    assert fit(cfg, store)["chunks_written"] > 0
    assert not (root / "store/probes/F.lock").exists()


# ---- 4. SIGTERM and Ctrl-C -------------------------------------------------------------------------
HELD = """
import sys, time
from pathlib import Path
import signal
# a pytest-xdist worker may hand its children SIGINT ignored; a user's terminal does not
signal.signal(signal.SIGINT, signal.default_int_handler)
import stages.tokenize as t

compute = t.TokenizeStage.compute
def held(self, store, todo):  # one chunk, then wait for the signal
    for result in compute(self, store, todo):
        yield result
        while True:
            time.sleep(0.02)
t.TokenizeStage.compute = held
from pipeline.cli import main
sys.argv = ["xprobe", *sys.argv[1:]]
main()
"""


@pytest.mark.slow  # signals a running process
@pytest.mark.parametrize(
    "sig, code, words", [("SIGTERM", 143, "SIGTERM"), ("SIGINT", 130, "Ctrl-C")]
)
def test_signals_keep_chunks_release_locks_and_say_how_to_resume(
    tmp_path, corpus_jsonl, tokenizer_dir, sig, code, words
):
    store = tmp_path / "s"
    args = ["tokenize", "--store", str(store), "--corpus", "c", "--source", str(corpus_jsonl)]
    args += ["--tokenizer", str(tokenizer_dir), "--ctx", "32", "--chunk-seqs", "2"]
    args += ["--max-tokens", "1200", "--no-progress"]
    proc = subprocess.Popen(
        [sys.executable, "-c", HELD, *args], cwd=ROOT, stderr=subprocess.PIPE, text=True
    )
    assert wait_for_markers(store / "tokens/c/_done", 1) >= 1
    time.sleep(0.3)  # the marker is written: the writer thread is past it
    proc.send_signal(getattr(signal, sig))
    _, stderr = proc.communicate(timeout=400)  # a loaded 2-core machine is slow to unwind
    assert proc.returncode == code, stderr
    assert f"interrupted ({words})" in stderr and "run the same command again" in stderr
    assert "Traceback" not in stderr and "aborted" not in stderr
    assert not (store / "tokens/c.lock").exists()
    kept = Store(store).done_chunks("tokens/c")
    assert kept
    resumed = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args], cwd=ROOT, capture_output=True, text=True
    )
    assert resumed.returncode == 0, resumed.stderr
    assert verify_store(Store(store)) == []


# ---- 5. read-only stores -----------------------------------------------------------------------------
def test_read_only_store_serves_complete_work_and_refuses_writes_in_words(complete, tmp_path):
    from stages.fit import run as fit

    store = Store(complete / "store", mode="r")
    cfg = _fit_cfg("B")
    assert fit(cfg, store)["already_complete"]
    with pytest.raises(XprobeError, match="is open read-only, and probes/new must be computed"):
        fit(_fit_cfg("new"), store)
    assert not (complete / "store/probes/new").exists()


def _bind_read_only(src: Path, dst: Path) -> bool:
    if shutil.which("mount") is None or os.geteuid() != 0:
        return False
    dst.mkdir()
    if subprocess.run(["mount", "--bind", str(src), str(dst)], capture_output=True).returncode:
        return False
    ro = ["mount", "-o", "remount,bind,ro", str(dst)]
    if subprocess.run(ro, capture_output=True).returncode:
        subprocess.run(["umount", "-l", str(dst)], capture_output=True)
        return False
    return True


def test_read_only_mount_runs_what_is_complete_without_a_traceback(complete, tmp_path):
    root, config = _copy(complete, tmp_path)
    mnt = tmp_path / "ro"
    if not _bind_read_only(root / "store", mnt):
        pytest.skip("cannot bind-mount read-only here (needs root and mount)")
    try:
        text = config.read_text().replace(str(root / "store"), str(mnt))
        ro_config = tmp_path / "ro.toml"
        ro_config.write_text(text)
        done = xprobe("run", str(ro_config), "--only", "fit")  # in process: the mount is real
        assert done.returncode == 0, done.stderr
        assert done.stdout.count("already complete") == 2 and "Traceback" not in done.stderr
        more = ro_config.read_text() + (
            f'\n[[fit]]\nname = "C"\ncorpus = "c"\nfeatures = "sae_a"\nmodel = "a"\n'
            f'hooks = ["{HOOK}"]\ndevice = "cpu"\nprogress = false\n'
        )
        ro_config.write_text(more)
        refused = xprobe("run", str(ro_config), "--only", "fit")  # in process: the mount is real
        assert refused.returncode == 2 and "Traceback" not in refused.stderr
        assert "is not writable" in refused.stderr and "probes/C must be computed" in refused.stderr
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


# ---- 6. bad inputs ----------------------------------------------------------------------------------
def test_bad_inputs_get_words_not_tracebacks(complete, tmp_path, corpus_jsonl, tokenizer_dir):
    from stages.activations import ActivationsConfig
    from stages.activations import run as activations
    from stages.fit import FitConfig
    from stages.fit import run as fit
    from stages.tokenize import run as tokenize

    root, _ = _copy(complete, tmp_path)
    store = Store(root / "store")
    with pytest.raises(XprobeError, match="checkpoint_every must be at least 1"):
        fit(FitConfig("F", "c", "sae_a", "a", (HOOK,), checkpoint_every=0), store)
    missing = str(tmp_path / "no" / "such" / "model")
    with pytest.raises(XprobeError, match="the model folder .* does not exist"):
        activations(ActivationsConfig("c", missing, hooks=(HOOK,), progress=False), store)
    with pytest.raises(XprobeError, match="the tokenizer folder .* does not exist"):
        tokenize(_tok(corpus_jsonl, Path(missing)), Store(tmp_path / "t"))
    with pytest.raises(XprobeError, match="max_tokens must be at least 1"):
        tokenize(_tok(corpus_jsonl, tokenizer_dir, max_tokens=0), Store(tmp_path / "t"))
    # an empty lock file, as a run killed between creating and writing it leaves
    lock = root / "store/probes/B.lock"
    lock.write_text("")
    os.utime(lock, (time.time() - 60, time.time() - 60))
    cfg = _fit_cfg("B")
    assert fit(cfg, store)["already_complete"] and not lock.exists()
    lock.write_text("{garbled")  # fresh: it may be a run taking it right now
    with pytest.raises(XprobeError) as e:
        fit(cfg, store)
    assert "empty or unreadable" in str(e.value) and "None" not in str(e.value)


def test_report_before_its_fits_ran_says_to_run_them(complete, tmp_path):
    from stages.report import ReportConfig
    from stages.report import run as report

    root, _ = _copy(complete, tmp_path)
    shutil.rmtree(root / "store/probes")
    with pytest.raises(XprobeError) as e:
        report(ReportConfig(corpus="c", features="sae_a", fits=("B2",)), Store(root / "store"))
    assert "run it first" in str(e.value)


# ---- 7. shared caches serve fits and matches ---------------------------------------------------------
def test_fit_and_match_complete_in_a_cache_are_not_recomputed(complete, tmp_path):
    config = complete / "x.toml"
    out = CliRunner().invoke(
        cli,
        [
            "run",
            str(config),
            "--store",
            str(tmp_path / "local"),
            "--cache",
            str(complete / "store"),
        ],
    )
    assert out.exit_code == 0, out.output
    assert out.output.count("fit: already complete in the cache") == 2
    assert "match: already complete in the cache" in out.output
    assert not (tmp_path / "local/probes").exists() and not (tmp_path / "local/matches").exists()

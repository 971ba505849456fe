"""A config error is reported before torch is imported: checking a config imports every stage
module it names (each holds its config dataclass), so none of them may import torch, zarr,
transformers or sae_lens at import time (pipeline/lazy.py)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
HEAVY = ("torch", "zarr", "transformers", "sae_lens")

# `xprobe` itself, then (even when it exits) which heavy modules it imported, on the last line
WRAPPER = f"""
import sys
try:
    from pipeline.cli import main
    main()
finally:
    print("imported:", [m for m in {HEAVY!r} if m in sys.modules], file=sys.stderr)
"""

SECTIONS = [  # every stage, each section valid
    ("tokenize", 'corpus = "web"\nsource = ["docs.jsonl"]\ntokenizer = "gpt2"\nctx = 32\n'),
    ("[activations]", 'corpus = "web"\nmodel = "model_a"\nname = "A"\nlayers = [1]\n'),
    ("[activations]", 'corpus = "web"\nmodel = "model_b"\nname = "B"\nlayers = "all"\n'),
    ("features", 'corpus = "web"\nmodel = "A"\nsae_path = "sae_a"\nname = "sae_a"\n'),
    (
        "[fit]",
        'name = "B"\ncorpus = "web"\nfeatures = "sae_a"\nmodel = "B"\n'
        'hooks = ["blocks.1.hook_resid_post"]\n',
    ),
    ("match", 'name = "ab"\ncorpus = "web"\nfeatures_a = "sae_a"\nfeatures_b = "sae_a"\n'),
    ("report", 'corpus = "web"\nfeatures = "sae_a"\nfits = ["B"]\n'),
]


def _config(
    tmp_path: Path, bad_section: int, bad_line: str, sections: list[tuple[str, str]] = SECTIONS
) -> Path:
    """A TOML of ``sections``, with ``bad_line`` added to section number ``bad_section``."""
    (tmp_path / "docs.jsonl").write_text('{"text": "hello world"}\n')
    text = f'store = "{tmp_path / "store"}"\n'
    for i, (name, body) in enumerate(sections):
        text += f"\n[{name}]\n{body}" + (bad_line + "\n" if i == bad_section else "")
    path = tmp_path / "bad.toml"
    path.write_text(text)
    return path


def _xprobe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", WRAPPER, *args], capture_output=True, text=True, cwd=ROOT
    )


def _check(result: subprocess.CompletedProcess, message: str) -> None:
    """Exit status 2, one line ``error: <message>...``, and no heavy module imported."""
    *lines, imported = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].startswith(f"error: {message}"), result.stderr
    assert imported == "imported: []", f"checking the config imported {imported}"


@pytest.mark.parametrize(
    "bad_section, bad_line, message",
    [
        (4, "lamdas = [0.1]", "[fit] unknown config key(s) ['lamdas']; known keys: "),
        (6, "confidence = 1.5", "[report] confidence must be in (0, 1), got 1.5"),
        (3, "k = 0", "[features] k must be positive, got 0"),
        (2, "batch_seqs = 0", "[activations.1] batch_seqs must be positive, got 0"),
        (5, 'k = "five"', "[match] k must be int, got 'five'"),
    ],
)
def test_run_reports_a_config_error_without_importing_torch(
    tmp_path, bad_section, bad_line, message
):
    _check(_xprobe("run", str(_config(tmp_path, bad_section, bad_line))), message)
    assert not (tmp_path / "store").exists()


def test_a_bad_fit_after_a_valid_tokenize_is_reported_without_importing_torch(tmp_path):
    config = _config(tmp_path, 1, "lamdas = [0.1]", [SECTIONS[0], SECTIONS[4]])
    _check(_xprobe("run", str(config)), "[fit] unknown config key(s) ['lamdas']; known keys: ")
    assert not (tmp_path / "store").exists()


@pytest.mark.parametrize(
    "stage, bad_section, bad_line, message",
    [
        ("fit", 4, "lamdas = [0.1]", "[fit] unknown config key(s) ['lamdas']; known keys: "),
        ("report", 6, "confidence = 1.5", "[report] confidence must be in (0, 1), got 1.5"),
    ],
)
def test_stage_command_reports_a_config_error_without_importing_torch(
    tmp_path, stage, bad_section, bad_line, message
):
    _check(_xprobe(stage, "--config", str(_config(tmp_path, bad_section, bad_line))), message)


def test_inference_mode_is_torchs_decorator_built_on_first_call():
    """``@inference_mode`` (pipeline/lazy.py) behaves as ``@torch.inference_mode()``: on a
    function, and on a generator, where the mode holds inside each step, not between them."""
    from pipeline.lazy import inference_mode, torch

    @inference_mode
    def double(x):
        assert torch.is_inference_mode_enabled()
        return x * 2

    @inference_mode
    def steps():
        yield torch.is_inference_mode_enabled()
        yield torch.is_inference_mode_enabled()

    assert double.__name__ == "double" and double(torch.ones(2)).is_inference()
    gen = steps()
    assert next(gen) and not torch.is_inference_mode_enabled() and next(gen)
    assert repr(torch).startswith("<torch, imported on first use")
    assert torch.float32 is sys.modules["torch"].float32

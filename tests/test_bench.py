"""`make bench` keeps working: the suite's code paths at toy sizes (its figures mean nothing)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_bench_smoke_runs_every_section(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        # every section but segments, whose machinery tests/test_segments.py runs (CI time)
        [sys.executable, "-m", "pipeline.bench", "--smoke", "--out", str(out), "--only"]
        + ["tokenize", "activations", "features", "fit"],
        cwd=Path(__file__).parents[1],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    for section in ("tokenize", "activations", "features", "fit"):
        assert "error" not in result[section], result[section]
        assert result[section]["peak_rss_MiB"] > 0
    acts = result["activations"]
    assert acts["ratio_stage_vs_bare_forward"] > 0
    # sae-lens cached the same activations xprobe stored (float32, same model and tokens)
    assert acts["saelens"]["matches_xprobe_row0_max_abs_diff"] == 0.0
    width = result["features"]["widths"]["512"]
    assert width["dropped_fraction"] == 0.0 and width["ratio_stage_vs_bare_encode"] > 0
    fit = result["fit"]
    assert fit["sklearn"]["max_rel_coef_diff"] < 1e-3  # float32 products vs sklearn's float64

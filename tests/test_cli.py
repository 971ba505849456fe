"""The CLI end to end: run from TOML, per-stage flags, status, info, errors without tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from pipeline.cli import cli


def _xprobe(*args: str, cwd=None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "pipeline.cli", *args], capture_output=True, text=True, cwd=cwd
    )


def test_run_status_info_from_toml(tmp_path, corpus_jsonl, tokenizer_dir):
    store = tmp_path / "store"
    config = tmp_path / "xprobe.toml"
    config.write_text(
        f'store = "{store}"\n\n[tokenize]\ncorpus = "web"\nsource = ["{corpus_jsonl}"]\n'
        f'tokenizer = "{tokenizer_dir}"\nctx = 32\nchunk_seqs = 16\nprogress = false\n'
    )
    runner = CliRunner()
    first = runner.invoke(cli, ["run", str(config)])
    assert first.exit_code == 0, first.output
    assert "tokenize: wrote" in first.output
    second = runner.invoke(cli, ["run", str(config)])
    assert "already complete" in second.output
    status = runner.invoke(cli, ["status", str(store)])
    assert "tokens/web" in status.output and "complete" in status.output
    info = runner.invoke(cli, ["info", str(store)])
    assert "corpus=web" in info.output and "tokenizer=" in info.output and "n_tok=" in info.output
    full = json.loads(runner.invoke(cli, ["info", "--json", str(store)]).output)
    prov = full["tokens/web"]
    for key in (
        "stage",
        "config",
        "tokenizer_fingerprint",
        "corpus_fingerprint",
        "n_tok",
        "xprobe_version",
        "created",
        "dtype",
    ):
        assert key in prov, key
    assert prov["bytes"] > 0


def test_stage_subcommand_flags_override_toml(tmp_path, corpus_jsonl, tokenizer_dir):
    store = tmp_path / "store"
    runner = CliRunner()
    args = [
        "tokenize",
        "--store",
        str(store),
        "--corpus",
        "c",
        "--source",
        str(corpus_jsonl),
        "--tokenizer",
        str(tokenizer_dir),
        "--ctx",
        "24",
        "--no-progress",
    ]
    result = runner.invoke(cli, args)
    assert result.exit_code == 0, result.output
    from pipeline.store import Store

    assert Store(store, mode="r").array("tokens/c/ids").shape[1] == 24


@pytest.mark.parametrize(
    "toml, message",
    [
        (
            'store = "S"\n[tokenize]\ncorpus = "c"\nsource = ["SRC"]\ntokenizer = "TOK"\nctxx = 3\n',
            "unknown config key(s) ['ctxx']",
        ),
        ('store = "S"\n[tokenise]\n', "unknown config section(s) ['tokenise']"),
        (
            'store = "S"\n[tokenize]\ncorpus = "c"\nsource = ["SRC"]\ntokenizer = "TOK"\nctx = "long"\n',
            "ctx must be int",
        ),
        ('store = "S"\n[tokenize]\ncorpus = "c"\n', "missing required config key(s)"),
    ],
)
def test_config_errors_are_one_clear_line(tmp_path, corpus_jsonl, tokenizer_dir, toml, message):
    config = tmp_path / "bad.toml"
    config.write_text(
        toml.replace("S", str(tmp_path / "s"))
        .replace("SRC", str(corpus_jsonl))
        .replace("TOK", str(tokenizer_dir))
    )
    result = _xprobe("run", str(config))
    assert result.returncode == 2
    assert message in result.stderr and "Traceback" not in result.stderr


def test_config_change_refused_from_cli(tmp_path, corpus_jsonl, tokenizer_dir):
    base = [
        "tokenize",
        "--store",
        str(tmp_path / "s"),
        "--corpus",
        "c",
        "--source",
        str(corpus_jsonl),
        "--tokenizer",
        str(tokenizer_dir),
        "--no-progress",
    ]
    assert _xprobe(*base, "--ctx", "32").returncode == 0
    refused = _xprobe(*base, "--ctx", "40")
    assert (
        refused.returncode == 2
        and "ctx: stored 32 != requested 40" in refused.stderr
        and "--force" in refused.stderr
    )
    assert _xprobe(*base, "--ctx", "40", "--force").returncode == 0


def test_missing_store_is_a_clear_error(tmp_path):
    result = _xprobe("status", str(tmp_path / "nothing"))
    assert result.returncode == 2 and "no xprobe store" in result.stderr

"""The CLI end to end: run from TOML, per-stage flags, status, info, errors without tracebacks."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from click.testing import CliRunner

from pipeline.cli import cli
from pipeline.store import Store
from tests.helpers import xprobe as _xprobe  # in process: exit code, stdout, stderr of main()


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
    """The real entry point, in a fresh interpreter: ``python -m pipeline.cli``."""
    result = subprocess.run(
        [sys.executable, "-m", "pipeline.cli", "status", str(tmp_path / "nothing")],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2 and "no xprobe store" in result.stderr


def _tokenize_toml(store: str, source: str, tokenizer: str, extra: str = "") -> str:
    return (
        f'store = "{store}"\n\n[tokenize]\ncorpus = "web"\nsource = ["{source}"]\n'
        f'tokenizer = "{tokenizer}"\nctx = 32\nchunk_seqs = 16\nprogress = false\n{extra}'
    )


def test_fit_list_flags_from_the_command_line(tmp_path):
    """``--lambdas 1`` and comma-separated hooks are parsed as lists of their item type; the run
    then stops at the missing inputs, not at the flags, and leaves no store behind."""
    store = tmp_path / "store"
    args = ["fit", "--store", str(store), "--name", "f", "--corpus", "c", "--features", "s"]
    args += ["--model", "B", "--hooks", "blocks.0.hook_resid_post,blocks.1.hook_resid_post"]
    for lambdas in (["1"], ["0"], ["0,0.1"], ["0", "--lambdas", "0.1"]):
        result = CliRunner().invoke(cli, [*args, "--lambdas", *lambdas])
        assert "tokens/c is not in the store" in str(result.exception), (lambdas, result.output)
    assert not store.exists()


def test_run_resolves_toml_paths_from_its_folder_and_accepts_rewritten_paths(
    tmp_path, corpus_jsonl, tokenizer_dir, monkeypatch
):
    """Relative paths in a TOML are relative to its folder, not the working directory; the same
    tokenizer written with a trailing slash (or relative) is the same config, so the complete unit
    is reused instead of refused."""
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "data" / "docs.jsonl").write_bytes(corpus_jsonl.read_bytes())
    config = project / "xprobe.toml"
    config.write_text(_tokenize_toml("store", "data/docs.jsonl", str(tokenizer_dir)))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    runner = CliRunner()
    first = runner.invoke(cli, ["run", str(config)])
    assert first.exit_code == 0, first.output
    assert (project / "store").is_dir() and not (elsewhere / "store").exists()
    config.write_text(_tokenize_toml("store/", "./data/docs.jsonl", f"{tokenizer_dir}/"))
    again = runner.invoke(cli, ["run", str(config), "--no-progress"])
    assert again.exit_code == 0, again.output
    assert "already complete" in again.output
    info = runner.invoke(cli, ["info", str(project / "store")])
    counted = Store(project / "store", mode="r").info("tokens/web")
    assert f"{counted['n_counted']:,} tokens that count" in info.output
    assert f"from {counted['n_docs']:,} documents" in info.output


def test_failed_run_leaves_no_store_and_checks_every_section_first(
    tmp_path, corpus_jsonl, tokenizer_dir
):
    store = tmp_path / "runs" / "store"
    bad_fit = '\n[[fit]]\nname = "f"\ncorpus = "web"\nfeatures = "s"\nmodel = "B"\nhooks = []\n'
    config = tmp_path / "xprobe.toml"
    config.write_text(_tokenize_toml(str(store), str(corpus_jsonl), str(tokenizer_dir), bad_fit))
    result = _xprobe("run", str(config))
    assert result.returncode == 2 and "[fit] fit needs at least one hook" in result.stderr
    assert "tokenize: wrote" not in result.stdout  # nothing ran before the bad section was found
    assert not (tmp_path / "runs").exists()
    config.write_text(
        _tokenize_toml(str(store), str(tmp_path / "missing.jsonl"), str(tokenizer_dir))
    )
    result = CliRunner().invoke(cli, ["run", str(config)])
    assert "matches no file" in str(result.exception)
    assert not (tmp_path / "runs").exists()
    wrong_field = 'field = "body"\n'  # fails while tokenizing, after the unit was created
    config.write_text(
        _tokenize_toml(str(store), str(corpus_jsonl), str(tokenizer_dir), wrong_field)
    )
    result = CliRunner().invoke(cli, ["run", str(config)])
    assert "has no field 'body'" in str(result.exception)
    assert not (tmp_path / "runs").exists()


def test_activations_negative_layer_and_default_name_of_a_local_model(
    tmp_path, corpus_jsonl, tokenizer_dir, gpt2_dir
):
    store = tmp_path / "s"
    runner = CliRunner()
    tok = ["tokenize", "--store", str(store), "--corpus", "c", "--source", str(corpus_jsonl)]
    tok += [
        "--tokenizer",
        str(tokenizer_dir),
        "--ctx",
        "32",
        "--max-tokens",
        "200",
        "--no-progress",
    ]
    assert runner.invoke(cli, tok).exit_code == 0
    acts = ["activations", "--store", str(store), "--corpus", "c", "--model", f"{gpt2_dir}/"]
    result = runner.invoke(cli, [*acts, "--layers", "-1", "--no-progress"])
    assert result.exit_code == 0, result.output
    assert f"acts/c/{gpt2_dir.name}/blocks.1.hook_resid_post" in result.output

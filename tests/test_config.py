"""The config layer: lists from command-line flags, path identity, validation on construction."""

from __future__ import annotations

import typing

import pytest

from pipeline.config import canonical, fingerprint, from_dict, parse_flag
from pipeline.errors import XprobeError
from stages.activations import ActivationsConfig
from stages.features import FeaturesConfig
from stages.fit import FitConfig
from stages.match import MatchConfig
from stages.report import ReportConfig
from stages.tokenize import TokenizeConfig

FIT = dict(name="f", corpus="c", features="s", model="B", hooks=("blocks.0.hook_resid_post",))


@pytest.mark.parametrize(
    "field, flags, expected",
    [
        ("lambdas", ("1",), (1.0,)),
        ("lambdas", ("0",), (0.0,)),
        ("lambdas", ("0,0.1",), (0.0, 0.1)),
        ("lambdas", ("0", "1e-3"), (0.0, 1e-3)),
        ("hooks", ("blocks.0.hook_resid_post,blocks.1.hook_resid_post",), None),
    ],
)
def test_list_flags_split_on_commas_and_take_the_item_type(field, flags, expected):
    hint = typing.get_type_hints(FitConfig)[field]
    cfg = from_dict(FitConfig, {**FIT, field: parse_flag(hint, flags, f"--{field}")})
    if expected is None:
        expected = ("blocks.0.hook_resid_post", "blocks.1.hook_resid_post")
    assert getattr(cfg, field) == expected


def test_layers_flag_takes_negative_indices_and_all():
    hint = typing.get_type_hints(ActivationsConfig)["layers"]
    assert parse_flag(hint, ("-1",), "--layers") == [-1]
    assert parse_flag(hint, ("0,2", "-1"), "--layers") == [0, 2, -1]
    assert parse_flag(hint, ("all",), "--layers") == "all"
    with pytest.raises(XprobeError, match="--layers: 'x' is not an integer"):
        parse_flag(hint, ("x",), "--layers")


def test_a_path_is_one_config_however_it_is_written(tmp_path, monkeypatch):
    (tmp_path / "tok").mkdir()
    (tmp_path / "data").mkdir()
    monkeypatch.chdir(tmp_path)
    written = [
        ("tok", "data/a.jsonl"),
        ("./tok/", "./data/a.jsonl"),
        (str(tmp_path / "tok"), str(tmp_path / "data" / "a.jsonl")),
        (str(tmp_path / "tok") + "/", str(tmp_path / "data") + "/../data/a.jsonl"),
    ]
    prints = {
        fingerprint(TokenizeConfig(corpus="c", source=(src,), tokenizer=tok))
        for tok, src in written
    }
    assert len(prints) == 1
    cfg = canonical(TokenizeConfig(corpus="c", source=("data/a.jsonl",), tokenizer="tok/"))
    assert cfg["tokenizer"] == str(tmp_path / "tok")
    assert cfg["source"] == [str(tmp_path / "data" / "a.jsonl")]
    # a hub name is not a path: left as written
    assert (
        canonical(TokenizeConfig(corpus="c", source=("x",), tokenizer="gpt2"))["tokenizer"]
        == "gpt2"
    )


def test_relative_paths_in_a_toml_table_are_relative_to_its_folder(tmp_path):
    (tmp_path / "cfg" / "tok").mkdir(parents=True)
    table = {"corpus": "c", "source": ["data/*.txt"], "tokenizer": "tok"}
    cfg = from_dict(TokenizeConfig, table, base=tmp_path / "cfg")
    assert cfg.source == (str(tmp_path / "cfg" / "data" / "*.txt"),)
    assert cfg.tokenizer == str(tmp_path / "cfg" / "tok")
    hub = from_dict(TokenizeConfig, {**table, "tokenizer": "gpt2"}, base=tmp_path / "cfg")
    assert hub.tokenizer == "gpt2"


@pytest.mark.parametrize(
    "build, message",
    [
        (lambda: TokenizeConfig(corpus="c", source=("x",), tokenizer="t", ctx=1), "ctx must be"),
        (
            lambda: TokenizeConfig(corpus="c", source=("x",), tokenizer="t", ctx="32"),
            "ctx must be int",
        ),
        (lambda: ActivationsConfig(corpus="c", model="m"), "give layers"),
        (
            lambda: ActivationsConfig(corpus="c", model="m", hooks=("blocks.1.hook_mlp_out",)),
            "residual stream",
        ),
        (lambda: FeaturesConfig(corpus="c", model="A"), "give either sae"),
        (lambda: FitConfig(**{**FIT, "hooks": ()}), "at least one hook"),
        (lambda: FitConfig(**FIT, lambdas=(-1.0,)), "lambdas must be"),
        (lambda: FitConfig(**FIT, held_out_fraction=1.5), "held_out_fraction"),
        (lambda: MatchConfig(name="m", corpus="c", features_a="a", features_b="b", k=0), "k must"),
        (lambda: ReportConfig(corpus="c", features="s", fits=()), "at least one fit"),
        (
            lambda: ReportConfig(corpus="c", features="s", fits=("B",), present_at=0.2),
            "partial_at <= present_at",
        ),
    ],
)
def test_configs_check_themselves_on_construction(build, message):
    with pytest.raises(XprobeError, match=message):
        build()


def test_construction_coerces_like_the_toml_loader(tmp_path):
    cfg = FitConfig(**{**FIT, "hooks": ["blocks.0.hook_resid_post"]}, lambdas=[0, 1])
    assert cfg.hooks == ("blocks.0.hook_resid_post",) and cfg.lambdas == (0.0, 1.0)
    tok = TokenizeConfig(corpus="c", source=tmp_path / "a.txt", tokenizer=tmp_path)
    assert tok.source == (str(tmp_path / "a.txt"),) and tok.tokenizer == str(tmp_path)


def test_toml_errors_name_the_section():
    with pytest.raises(XprobeError, match=r"^\[fit\] lambdas must be"):
        from_dict(FitConfig, {**FIT, "lambdas": [-1]}, where="fit")

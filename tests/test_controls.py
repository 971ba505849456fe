"""The controls a run derives (pipeline.controls): the ceiling fit always, the floor on
``floor = "random"``; sections the user wrote always win. (The token controls are tested in
tests/test_token_control.py: these configs write ``token_fits = []``.)"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest

from pipeline.api import plan
from pipeline.controls import FloorModel, derive
from pipeline.errors import XprobeError

SAE = str(Path(__file__).parents[1] / "pipeline" / "demo" / "data" / "sae")
HOOKS = ["blocks.0.hook_resid_post", "blocks.1.hook_resid_post"]


def _config(tmp_path: Path, **report) -> dict:
    return {
        "store": str(tmp_path / "store"),
        "activations": [
            {"corpus": "c", "model": "/models/a", "name": "A", "layers": [2]},
            {"corpus": "c", "model": "/models/b", "name": "B", "layers": "all", "device": "cpu"},
        ],
        "features": {"corpus": "c", "model": "A", "sae_path": SAE, "name": "sae"},
        "fit": [
            {"name": "B", "corpus": "c", "features": "sae", "model": "B", "hooks": HOOKS}
            | {"n_bootstrap": 7, "split_seed": 3, "lambdas": [0.0, 0.1], "affine_map": True}
        ],
        "report": {"corpus": "c", "features": "sae", "fits": ["B"], "token_fits": [], **report},
    }


def test_ceiling_is_derived_from_b_fit_at_the_sae_hook(tmp_path):
    config = _config(tmp_path)
    before = copy.deepcopy(config)
    out, floors = derive(config, None, config["store"])
    assert config == before and floors == []  # the given tables are left as they were
    ceiling = out["fit"][-1]
    assert ceiling["name"] == "ceiling" and ceiling["model"] == "A"
    assert ceiling["hooks"] == ["blocks.2.hook_resid_post"]  # the demo SAE's cfg.json
    assert (ceiling["n_bootstrap"], ceiling["split_seed"], ceiling["lambdas"]) == (7, 3, [0.0, 0.1])
    assert "affine_map" not in ceiling
    names = [
        cfg.name
        for entry, cfg, _ in plan(config, None, store_path=config["store"])
        if entry.name == "fit"
    ]
    assert names == ["B", "ceiling"]


def test_a_written_ceiling_wins(tmp_path):
    config = _config(tmp_path, ceiling="mine")
    config["fit"].append(
        {
            "name": "mine",
            "corpus": "c",
            "features": "sae",
            "model": "A",
            "hooks": ["blocks.2.hook_resid_post"],
        }
    )
    assert [f["name"] for f in derive(config, None, config["store"])[0]["fit"]] == ["B", "mine"]
    config = _config(tmp_path)  # any fit of A on these features is the ceiling's candidate
    config["fit"].append({**config["fit"][0], "name": "a_self", "model": "A"})
    assert [f["name"] for f in derive(config, None, config["store"])[0]["fit"]] == ["B", "a_self"]


def test_hook_from_features_section_and_a_clear_error_without_one(tmp_path):
    config = _config(tmp_path)
    config["features"]["hook"] = "blocks.1.hook_resid_post"
    assert derive(config, None, None)[0]["fit"][-1]["hooks"] == ["blocks.1.hook_resid_post"]
    config["features"] = {"corpus": "c", "model": "A", "sae_path": str(tmp_path), "name": "sae"}
    with pytest.raises(XprobeError, match=r"set\s+hook = "):
        derive(config, None, None)


def test_floor_random_derives_activations_and_fit_next_to_the_store(tmp_path):
    config = _config(tmp_path, floor="random")
    out, floors = derive(config, None, config["store"])
    (floor,) = floors
    assert floor.source == "/models/b" and floor.path == str(tmp_path / "store.floor" / "B")
    acts = out["activations"][-1]
    assert acts["model"] == floor.path and acts["name"] == "random" and acts["hooks"] == HOOKS
    assert "layers" not in acts and acts["device"] == "cpu"
    fit = next(f for f in out["fit"] if f["name"] == "random")
    assert fit["model"] == "random" and fit["hooks"] == HOOKS and fit["n_bootstrap"] == 7
    assert not Path(floor.path).exists()  # deriving writes nothing; the run writes the model


def test_a_written_floor_wins_and_a_floor_needs_b_activations(tmp_path):
    config = _config(tmp_path, floor="random")
    config["fit"].append({**config["fit"][0], "name": "random", "model": "R"})
    out, floors = derive(config, None, config["store"])
    assert floors == [] and len(out["activations"]) == 2
    config = _config(tmp_path, floor="random")
    config["activations"] = config["activations"][:1]
    with pytest.raises(XprobeError, match="copies B's"):
        derive(config, None, config["store"])


def test_floor_model_is_seeded_and_written_once(tmp_path, gpt2_dir):
    first, second = (FloorModel(str(gpt2_dir), str(tmp_path / name)) for name in "ab")
    first.write()
    second.write()
    weights = [(tmp_path / n / "model.safetensors").read_bytes() for n in "ab"]
    assert weights[0] == weights[1]
    FloorModel(str(gpt2_dir), str(tmp_path / "c"), seed=1).write()
    assert weights[0] != (tmp_path / "c" / "model.safetensors").read_bytes()
    stamp = (tmp_path / "a" / "model.safetensors").stat().st_mtime_ns
    first.write()  # already there: kept
    assert (tmp_path / "a" / "model.safetensors").stat().st_mtime_ns == stamp

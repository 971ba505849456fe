"""The demo end to end at a tiny size: the builder (models, sae-lens SAE, ablation) and the pipeline."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from safetensors.torch import load_file, save_file

from pipeline.cli import cli
from pipeline.config import load_toml
from pipeline.demo.build import SIZES, build
from pipeline.demo.run import run_demo

MODELS = ("model_a", "b_finetune", "b_scratch", "b_random", "b_ablated", "b_erased")


def _build_one_thread(out):
    """The tiny demo build on one torch thread (its bytes depend on the thread count), leaving
    the worker's thread count as it was for the tests after it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        build(out, SIZES["tiny"], seed=0)
    finally:
        torch.set_num_threads(threads)
    return out


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    return _build_one_thread(tmp_path_factory.mktemp("demo") / "demo_data")


def test_builder_writes_loadable_models_and_sae(demo_data):
    from sae_lens import SAE
    from transformers import AutoModelForCausalLM, AutoTokenizer

    size = SIZES["tiny"]
    for name in MODELS:
        model = AutoModelForCausalLM.from_pretrained(demo_data / name)
        assert model.config.n_embd == size.d_model and model.config.n_layer == size.n_layer
        assert len(AutoTokenizer.from_pretrained(demo_data / name)) == size.vocab_size
    sae = SAE.load_from_disk(demo_data / "sae", device="cpu")
    assert sae.cfg.d_sae == size.d_sae and sae.cfg.k == size.sae_k
    assert sae.cfg.metadata.hook_name == f"blocks.{size.sae_layer}.hook_resid_post"
    build_info = json.loads((demo_data / "build.json").read_text())
    # trained models predict held-out text better than the untrained one
    losses = build_info["held_out_loss"]
    assert losses["model_a"]["all"] < losses["b_random"]["all"] - 0.3
    # the finetune moved towards code: its code loss improved more than its prose loss
    a, ft = losses["model_a"], losses["b_finetune"]
    assert a["code"] - ft["code"] > a["prose"] - ft["prose"]


def test_ablated_model_lacks_the_directions_and_nothing_else_changed(demo_data):
    from sae_lens import SAE
    from transformers import AutoModelForCausalLM

    ablation = json.loads((demo_data / "ablation.json").read_text())
    size = SIZES["tiny"]
    assert len(ablation["ablated"]) == len(ablation["kept"]) == size.n_ablate
    assert not set(ablation["ablated"]) & set(ablation["kept"])
    sae = SAE.load_from_disk(demo_data / "sae", device="cpu")
    directions = sae.W_dec.detach()[ablation["ablated"]].double()
    a = AutoModelForCausalLM.from_pretrained(demo_data / "model_a", dtype=torch.float32)
    b = AutoModelForCausalLM.from_pretrained(demo_data / "b_ablated", dtype=torch.float32)
    ids = torch.randint(
        0, size.vocab_size, (4, size.ctx), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():  # sae_layer 0 of 2: hidden_states[1] is the block output, no final norm
        x_a = a(ids, output_hidden_states=True).hidden_states[size.sae_layer + 1].double()
        x_b = b(ids, output_hidden_states=True).hidden_states[size.sae_layer + 1].double()
    basis, _ = torch.linalg.qr(directions.T)
    assert (x_a @ basis).norm() / x_a.norm() > 0.05  # A does use these directions
    assert (x_b @ basis).norm() / x_b.norm() < 1e-3  # float16 rounding is all that is left
    changed = set(ablation["projected"])
    sa, sb = (
        load_file(demo_data / "model_a" / "model.safetensors"),
        load_file(demo_data / "b_ablated" / "model.safetensors"),
    )
    for key in sa:
        same = torch.equal(sa[key], sb[key])
        assert same == (key not in changed and "lm_head" not in key), key


def test_builder_is_reproducible(demo_data, tmp_path):
    again = _build_one_thread(tmp_path / "again")
    for name in (*MODELS, "sae"):
        for file in sorted((demo_data / name).glob("*.safetensors")):
            assert file.read_bytes() == (again / name / file.name).read_bytes(), file
    assert (demo_data / "ablation.json").read_text() == (again / "ablation.json").read_text()


@pytest.mark.slow  # the whole demo, twice
def test_demo_runs_end_to_end_then_from_cache(demo_data, tmp_path):
    root = tmp_path / "xprobe-demo"
    demo_data = Path(shutil.copytree(demo_data, tmp_path / "data"))  # this test rewrites a model
    first = run_demo(root, demo_data, max_tokens=20_000, progress=False)
    stages = [s["stage"] for s in first.summaries]
    assert stages[:2] == ["tokenize", "activations"]
    fits = sorted(u for s in first.summaries if s["stage"] == "fit" for u in s["units"])
    # the six fits of the TOML, and the token control of A and of every model B (derived)
    models = ("ceiling", "finetune", "scratch", "ablated", "erased", "random")
    assert sorted({u.split("/")[1] for u in fits}) == sorted(
        [*models, "A.tokens", *(f"b_{m}.tokens" for m in models[1:])]
    ), fits
    assert not any(s.get("already_complete") for s in first.summaries)
    n = first.numbers
    for name in ("ablated", "erased"):
        auroc = n["ratio_separation"][name]["auroc"]
        assert auroc != auroc or 0.0 <= auroc <= 1.0  # NaN only if a set has no fitted feature
    assert n["ratio_median"]["finetune"] > n["ratio_median"]["random"]
    config = load_toml(root / "xprobe.toml")
    assert config["store"] == "store" and len(config["fit"]) == 6  # relative to the TOML's folder
    assert config["tokenize"]["source"] == ["corpus/stdlib.jsonl"]
    if "report" in stages:
        assert first.report_html and (root / "store").exists()
        assert n["presence"] is not None
        from pipeline.api import load_table

        table = load_table(root / "store", "demo")  # the affine-map baseline beside every probe
        assert {f"{fit}_map_r2" for fit in ("finetune", "erased")} <= set(table.columns)

    result = CliRunner().invoke(
        cli, ["demo", "--path", str(root), "--data", str(demo_data), "--max-tokens", "20000"]
    )
    assert result.exit_code == 0, result.output
    assert result.output.count("already complete") == len(first.summaries) - stages.count("report")
    assert "AUROC" in result.output and "R²/ceiling" in result.output
    again = run_demo(root, demo_data, max_tokens=20_000, progress=False)
    assert json.dumps(again.numbers, sort_keys=True) == json.dumps(n, sort_keys=True)
    # a rebuilt demo model under the same path: exactly what was computed from it is redone
    weights = demo_data / "b_random" / "model.safetensors"
    tensors = load_file(weights)
    save_file({k: v * 1.5 for k, v in tensors.items()}, weights, metadata={"format": "pt"})
    rebuilt = run_demo(root, demo_data, max_tokens=20_000, progress=False)
    redone = sorted(
        u for s in rebuilt.summaries if not s.get("already_complete") for u in s["units"]
    )
    assert [u.rsplit("/", 1)[0] for u in redone] == [
        "acts/stdlib/b_random.tokens", "acts/stdlib/b_random", "probes", "probes", "report"
    ], redone  # B's activations, its token control's, their fits, the report (renders every run)
    assert redone[2:] == ["probes/b_random.tokens", "probes/random", "report/demo"]
    assert rebuilt.numbers["ratio_median"]["random"] != n["ratio_median"]["random"]


def test_erased_model_changes_only_what_feeds_the_sae_layer(demo_data):
    size = SIZES["tiny"]
    a = load_file(demo_data / "model_a" / "model.safetensors")
    b = load_file(demo_data / "b_erased" / "model.safetensors")
    fed = ("transformer.wte.", "transformer.wpe.")
    fed += tuple(f"transformer.h.{i}." for i in range(size.sae_layer + 1))
    later = [k for k in a if not k.startswith(fed) and "lm_head" not in k]
    assert later and all(torch.equal(a[k], b[k]) for k in later)
    assert not torch.equal(a["transformer.wte.weight"], b["transformer.wte.weight"])
    record = json.loads((demo_data / "ablation.json").read_text())
    first, last = record["erased_distance_first_last_tenth"]
    assert last < first / 3  # training brought the residual close to the erased one


def test_kept_features_survive_the_eraser_and_removed_ones_do_not(demo_data):
    record = json.loads((demo_data / "ablation.json").read_text())
    size = SIZES["tiny"]
    assert record["eraser_rank"] == size.n_ablate
    assert all(s < 1e-6 for s in record["survival_ablated"])
    assert all(s >= size.min_survival for s in record["survival_kept"])
    assert record["band_surviving"] >= size.n_ablate


def test_leace_eraser_zeroes_every_linear_readout_and_moves_nothing_else():
    import numpy as np

    from pipeline.demo.lm import leace_eraser

    gen = torch.Generator().manual_seed(0)
    raw = torch.randn(4000, 6, generator=gen, dtype=torch.float64)
    # uncorrelated columns in the sample itself, so "nothing else" is exact
    q, _ = torch.linalg.qr(raw - raw.mean(0))
    x = q * torch.tensor([3.0, 2.0, 1.0, 1.0, 0.5, 0.5], dtype=torch.float64) * 60 + 5
    z = x[:, :2] @ torch.randn(2, 3, generator=gen, dtype=torch.float64)  # 3 targets, rank 2
    m, c = leace_eraser(x, z)
    erased = (x @ m.T + c).numpy()

    design = np.c_[erased, np.ones(len(erased))]
    y = z.numpy()
    fit = design @ np.linalg.lstsq(design, y, rcond=None)[0]
    r2 = 1 - ((y - fit) ** 2).sum(0) / ((y - y.mean(0)) ** 2).sum(0)
    assert np.abs(r2).max() < 1e-9  # before: R² near 1
    np.testing.assert_allclose(erased[:, 2:], x[:, 2:].numpy(), atol=1e-9)
    np.testing.assert_allclose(erased.mean(0), x.mean(0).numpy(), atol=1e-9)
    assert torch.linalg.matrix_rank(torch.eye(6, dtype=torch.float64) - m) == 2


def test_readout_r2_matches_lstsq_and_token_means():
    from types import SimpleNamespace

    import numpy as np

    from pipeline.demo.ablation import linear_r2, token_r2

    gen = torch.Generator().manual_seed(0)
    acts = torch.randn(3000, 8, generator=gen)
    ids = torch.randint(0, 20, (3000,), generator=gen)
    acts[:, 0] += ids.float() / 5  # part of the residual is the token
    weights = torch.randn(8, 6, generator=gen)
    sae = SimpleNamespace(cfg=SimpleNamespace(d_sae=6), encode=lambda x: torch.relu(x @ weights))

    x, y, tok = acts.double().numpy(), sae.encode(acts).double().numpy(), ids.numpy()
    design = np.c_[x, np.ones(len(x))]
    fit = design @ np.linalg.lstsq(design, y, rcond=None)[0]
    sst = ((y - y.mean(0)) ** 2).sum(0)
    linear = 1 - ((y - fit) ** 2).sum(0) / sst
    means = np.stack([y[tok == v].mean(0) for v in range(20)])
    token = 1 - ((y - means[tok]) ** 2).sum(0) / sst
    np.testing.assert_allclose(linear_r2(acts, sae, acts), linear, atol=1e-8)
    np.testing.assert_allclose(token_r2(sae, acts, ids, vocab_size=20), token, atol=1e-8)

"""On a CUDA device (skipped without one): each stage with ``device = "cuda"`` against its
independent reference computed on the same device, and the whole pipeline against its CPU run.

Nothing here runs on the project's CPU machines; the device machine runs this file (see
docs/benchmarks.md, "On a GPU"). Comparisons on the GPU are to float32 rounding, not bit for bit:
cuBLAS may pick other kernels than the CPU's MKL for the same shapes.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from pipeline.cli import cli
from pipeline.maths.lstsq import SufficientStats, solve_ridge
from pipeline.store import Store
from stages.activations import ActivationsConfig
from stages.activations import run as activations
from stages.features import FeaturesConfig
from stages.features import run as features
from tests.helpers import pipeline_config, save_standard_sae, tokenize_small

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

HOOKS = ("blocks.0.hook_resid_post", "blocks.1.hook_resid_post")


@pytest.fixture
def store(tmp_path, corpus_jsonl, tokenizer_dir) -> Store:
    store = Store(tmp_path / "store")
    tokenize_small(store, corpus_jsonl, tokenizer_dir, 1600)
    return store


def _activations(store: Store, model_dir, device: str, name: str) -> None:
    activations(
        ActivationsConfig(
            corpus="c",
            model=str(model_dir),
            name=name,
            hooks=HOOKS,
            device=device,
            batch_seqs=3,
            progress=False,
        ),
        store,
    )


@pytest.mark.parametrize("model_fixture", ["gpt2_dir", "llama_dir"])
def test_activations_on_cuda_equal_output_hidden_states_on_cuda(store, model_fixture, request):
    model_dir = request.getfixturevalue(model_fixture)
    _activations(store, model_dir, "cuda", "g")
    _activations(store, model_dir, "cpu", "c")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval().cuda()
    ids = torch.from_numpy(store.array("tokens/c/ids")[:].astype(np.int64))
    want = []
    with torch.inference_mode():
        for chunk in ids.split(4):
            for batch in chunk.split(3):  # the stage's batch shapes
                hs = model(batch.cuda(), output_hidden_states=True).hidden_states
                want.append(hs[1].reshape(-1, hs[1].shape[-1]).cpu().numpy())
    # block 0's output against the reference on the same device (the last block's hidden state
    # in transformers has the final norm applied; tests/test_activations.py checks it on the CPU)
    got = store.array(f"acts/c/g/{HOOKS[0]}/x")[:]
    np.testing.assert_allclose(got, np.concatenate(want), rtol=1e-5, atol=1e-6)
    for hook in HOOKS:  # and every hook against the CPU run of the same stage
        assert store.info(f"acts/c/g/{hook}")["complete"]
        np.testing.assert_allclose(
            store.array(f"acts/c/g/{hook}/x")[:],
            store.array(f"acts/c/c/{hook}/x")[:],
            rtol=1e-4,
            atol=1e-5,
        )


def test_features_on_cuda_equal_sae_encode_on_cuda(store, gpt2_dir, tmp_path):
    from sae_lens import SAE

    _activations(store, gpt2_dir, "cpu", "a")
    sae_dir = save_standard_sae(tmp_path / "sae", hook=HOOKS[0])
    features(
        FeaturesConfig(
            corpus="c", model="a", sae_path=str(sae_dir), name="s", device="cuda", progress=False
        ),
        store,
    )
    sae = SAE.load_from_disk(str(sae_dir), device="cuda")
    x = torch.from_numpy(store.array(f"acts/c/a/{HOOKS[0]}/x")[:]).cuda()
    mask = store.array("tokens/c/mask")[:].reshape(-1)
    with torch.inference_mode():
        ref = sae.encode(x).cpu().numpy()
    ref[~mask] = 0
    idx, val = store.array("feats/c/s/idx")[:], store.array("feats/c/s/val")[:]
    dense = np.zeros_like(ref)
    rows, slots = np.nonzero(idx >= 0)
    dense[rows, idx[rows, slots]] = val[rows, slots]
    kept = dense != 0
    np.testing.assert_allclose(dense[kept], ref[kept], rtol=1e-5, atol=1e-6)
    if store.info("feats/c/s")["dropped_mass"] == 0:
        assert ((ref != 0) & ~kept).sum() <= 0.001 * ref.size  # ties at 0 may round either way


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.float64])
def test_fitter_on_cuda_equals_lstsq(compute_dtype):
    gen = torch.Generator().manual_seed(0)
    n, d, n_feat = 6000, 48, 40
    x = torch.randn(n, d, generator=gen) @ torch.randn(d, d, generator=gen) + 3.0
    w = torch.randn(d, n_feat, generator=gen)
    y = torch.relu(x @ w / d**0.5 + torch.randn(n, n_feat, generator=gen) - 1.0)
    rows, cols = torch.nonzero(y, as_tuple=True)
    stats = SufficientStats(d, n_feat, torch.device("cuda"), compute_dtype)
    for start in range(0, n, 1024):  # chunks, as the fitter streams them
        keep = (rows >= start) & (rows < start + 1024)
        r, c = rows[keep] - start, cols[keep]
        stats.update(x[start : start + 1024].cuda(), r.cuda(), c.cuda(), y[rows[keep], c].cuda())
    solved = solve_ridge(stats, None, [0.0], min_active=1, direction_dtype=torch.float64)
    design = np.hstack([x.double().numpy(), np.ones((n, 1))])
    coef = np.linalg.lstsq(design, y.double().numpy(), rcond=None)[0]
    rtol = 1e-3 if compute_dtype == torch.float32 else 1e-8
    np.testing.assert_allclose(solved["direction"], coef[:-1].T, rtol=rtol, atol=rtol)
    np.testing.assert_allclose(solved["intercept"], coef[-1], rtol=rtol, atol=rtol * 10)


def test_pipeline_on_cuda_close_to_its_cpu_run(tmp_path, corpus_jsonl, tokenizer_dir, gpt2_dir):
    """`xprobe run` of the same config with every device "cuda", then "cpu": the same statuses
    and held-out scores to float32 rounding."""
    sae = save_standard_sae(tmp_path / "sae", hook=HOOKS[0])
    stores = {}
    for device in ("cuda", "cpu"):
        root = tmp_path / device
        root.mkdir()
        config = pipeline_config(root, corpus_jsonl, tokenizer_dir, gpt2_dir, sae)
        config.write_text(config.read_text().replace('device = "cpu"', f'device = "{device}"'))
        result = CliRunner().invoke(cli, ["run", str(config)])
        assert result.exit_code == 0, result.output
        stores[device] = Store(root / "store", mode="r")
    gpu, cpu = stores["cuda"], stores["cpu"]
    unit = f"probes/B/{HOOKS[0]}"
    np.testing.assert_array_equal(gpu.array(f"{unit}/status")[:], cpu.array(f"{unit}/status")[:])
    for key in ("r2_held_out", "linear_r2_held_out"):
        np.testing.assert_allclose(
            gpu.array(f"{unit}/{key}")[:], cpu.array(f"{unit}/{key}")[:], atol=1e-3
        )

"""The seed's single-layer model (pipeline/probes/encoder.py, ``predictor = "sae"``): A → A at the
SAE's hook returns A's encoder for ReLU, JumpReLU and TopK SAEs (cosine with ``W_enc`` > 0.9999,
held-out R² ≈ 1); on another model its closed form equals ``numpy.linalg.lstsq`` of A's
pre-activations (``sae.encode``'s ``hook_sae_acts_pre``) on B's stored rows; a gated SAE is
refused; the linear probe is kept beside it as ``linear_*``."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.errors import XprobeError
from pipeline.inputs.sae import load_sae
from pipeline.store import Store
from stages.activations import ActivationsConfig
from stages.activations import run as activations
from stages.features import FeaturesConfig
from stages.features import run as features
from stages.fit import FitConfig
from stages.fit import run as fit
from tests.helpers import (
    held_out_split,
    save_gated_sae,
    save_jumprelu_sae,
    save_standard_sae,
    save_topk_sae,
    tokenize_small,
)

HOOK = "blocks.0.hook_resid_post"
B_HOOK = "blocks.1.hook_resid_post"


@pytest.fixture(scope="module")
def store_path(tmp_path_factory, corpus_jsonl, tokenizer_dir, gpt2_dir, llama_dir):
    root = tmp_path_factory.mktemp("encoder")
    store = Store(root / "store")
    tokenize_small(store, corpus_jsonl, tokenizer_dir, 6000)
    for name, model, layers in (("A", gpt2_dir, (0,)), ("B", llama_dir, (1,))):
        activations(
            ActivationsConfig(
                corpus="c", model=str(model), name=name, layers=layers, device="cpu", progress=False
            ),
            store,
        )
    for name, save in (
        ("relu", save_standard_sae),
        ("jumprelu", save_jumprelu_sae),
        ("topk", save_topk_sae),
        ("gated", save_gated_sae),
    ):
        sae = save(root / f"sae_{name}", hook=HOOK)
        features(
            FeaturesConfig(
                corpus="c", model="A", sae_path=str(sae), name=name, device="cpu", progress=False
            ),
            store,
        )
    return root


def _fit(store: Store, name: str, sae: str, model: str, hook: str, **kw) -> None:
    base = dict(
        corpus="c",
        features=sae,
        model=model,
        hooks=(hook,),
        held_out_fraction=0.25,
        lambdas=(0.0,),
        compute_dtype="float64",
        n_bootstrap=4,
        device="cpu",
        progress=False,
    )
    fit(FitConfig(name=name, **{**base, **kw}), store)


@pytest.mark.parametrize("sae", ["relu", "jumprelu", "topk"])
def test_a_to_a_is_a_s_encoder(store_path, sae):
    store = Store(store_path / "store")
    _fit(store, f"ceil_{sae}", sae, "A", HOOK)
    unit = f"probes/ceil_{sae}/{HOOK}"
    w_enc = load_sae(sae_path=str(store_path / f"sae_{sae}")).W_enc.detach().double().numpy()
    direction = store.array(f"{unit}/direction")[:].astype(np.float64)  # [F, d]
    ok = store.array(f"{unit}/status")[:] == 0
    assert ok.sum() > 20
    cos = (direction * w_enc.T).sum(1) / (
        np.linalg.norm(direction, axis=1) * np.linalg.norm(w_enc.T, axis=1)
    )
    r2 = store.array(f"{unit}/r2_held_out")[:]
    defined = ok & np.isfinite(r2)
    worst = np.argsort(np.where(ok, cos, 2))[:3]
    why = f"worst cosines {cos[worst]} (features {worst}, held-out R² {r2[worst]})"
    # one TopK feature was seen once at cosine 0.968 (not reproduced since; cause unknown)
    assert np.median(cos[ok]) > 0.99999 and np.mean(cos[ok] > 0.9999) > 0.99, why
    # TopK: a pre-activation within float32 round-off of the k-th largest may swap places with it,
    # which costs a rarely firing feature a few per cent of R² (seen: one at 0.95)
    assert np.median(r2[defined]) > 0.999 and np.mean(r2[defined] > 0.99) > 0.95, why
    assert r2[defined].min() > 0.9, why
    # the linear probe of the post-activation is kept beside it, and is a weaker instrument
    linear = store.array(f"{unit}/linear_r2_held_out")[:]
    assert np.median(linear[defined]) < np.median(r2[defined])
    assert store.has(f"{unit}/linear_direction") and store.has(f"{unit}/write_direction")


def test_closed_form_equals_lstsq_of_the_preactivation(store_path):
    store = Store(store_path / "store")
    _fit(store, "b_relu", "relu", "B", B_HOOK)
    sae = load_sae(sae_path=str(store_path / "sae_relu")).double()
    info = store.info("tokens/c")
    mask = store.array("tokens/c/mask")[:].reshape(-1).astype(bool)
    held = np.repeat(held_out_split(store, info["n_seq"], 0.25, 0), info["ctx"])
    train = mask & ~held
    x_b = store.array(f"acts/c/B/{B_HOOK}/x")[:].astype(np.float64)[train]
    x_a = torch.from_numpy(store.array(f"acts/c/A/{HOOK}/x")[:].astype(np.float64)[train])
    captured = []
    handle = sae.hook_sae_acts_pre.register_forward_hook(lambda _m, _i, o: captured.append(o))
    with torch.no_grad():
        sae.encode(x_a)
    handle.remove()
    z = captured[0].numpy()  # [n_train, F] A's pre-activations, as sae-lens computes them
    design = np.hstack([x_b, np.ones((len(x_b), 1))])
    solution = np.linalg.lstsq(design, z, rcond=None)[0]
    unit = "probes/b_relu/" + B_HOOK
    ok = store.array(f"{unit}/status")[:] == 0
    direction = store.array(f"{unit}/direction")[:].astype(np.float64)
    np.testing.assert_allclose(direction[ok], solution[:-1].T[ok], rtol=1e-4, atol=1e-4)
    intercept = store.array(f"{unit}/intercept")[:]
    np.testing.assert_allclose(intercept[ok], solution[-1][ok], rtol=1e-4, atol=1e-4)
    # the held-out score is R² of relu(x_B·w + c) against A's features on held-out tokens
    scored = mask & held
    x_held = store.array(f"acts/c/B/{B_HOOK}/x")[:].astype(np.float64)[scored]
    pred = np.maximum(x_held @ direction.T + intercept, 0)
    with torch.no_grad():
        y = sae.encode(
            torch.from_numpy(store.array(f"acts/c/A/{HOOK}/x")[:].astype(np.float64)[scored])
        ).numpy()
    r2 = 1 - ((y - pred) ** 2).sum(0) / ((y - y.mean(0)) ** 2).sum(0)
    stored = store.array(f"{unit}/r2_held_out")[:]
    defined = ok & np.isfinite(stored)
    np.testing.assert_allclose(stored[defined], r2[defined], atol=2e-3)


def test_gated_sae_is_refused_with_the_way_out(store_path):
    store = Store(store_path / "store")
    with pytest.raises(XprobeError, match='predictor = "linear"'):
        _fit(store, "ceil_gated", "gated", "A", HOOK)
    _fit(store, "ceil_gated_linear", "gated", "A", HOOK, predictor="linear")
    assert not store.has(f"probes/ceil_gated_linear/{HOOK}/linear_direction")


@pytest.mark.parametrize("save", [save_topk_sae, save_jumprelu_sae])
def test_rotated_b_gets_the_rotated_encoder_and_a_s_features(tmp_path, save):
    """B's residual an exact rotation of A's (x_B = a·Q): the closed form is ``w_f = Qᵀ·W_enc[:, f]``
    and σ_A(x_B·w + c) is A's own encoding (R² 1, so presence 1), from the statistics alone."""
    from pipeline.maths.lstsq import SufficientStats
    from pipeline.probes.encoder import SaeActivation, solve_encoder
    from pipeline.probes.sae_map import SaeThroughMap

    sae = load_sae(sae_path=str(save(tmp_path / "sae")))
    activation = SaeActivation(SaeThroughMap(sae, centered=False))
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 64, generator=g, dtype=torch.float64) * 0.5 + 0.1
    q, _ = torch.linalg.qr(torch.randn(64, 64, generator=g, dtype=torch.float64))
    x_b = a @ q
    cpu = torch.device("cpu")
    cross = SufficientStats(64, 64, cpu, torch.float64)
    own = SufficientStats(64, 0, cpu, torch.float64)
    cross.update_dense(x_b, a)
    own.update_dense(a, a.new_zeros(len(a), 0))
    n_active = torch.full((sae.cfg.d_sae,), 1000)
    out = solve_encoder(cross, own, activation, n_active, [0.0], 4096, 10)
    expected = (q.T @ sae.W_enc.detach().double()).T.numpy()  # [F, d_B]
    np.testing.assert_allclose(out["direction"], expected, atol=1e-5)
    predict = activation.predictor(out["direction"], out["intercept"], cpu, torch.float64)
    with torch.no_grad():
        own_features = sae.encode(a.float()).double()
    close = np.isclose(predict(x_b).numpy(), own_features.numpy(), atol=1e-4)
    # a JumpReLU pre-activation within float32 rounding of its threshold may flip (seen: 1 of 10⁶)
    assert close.mean() > 1 - 1e-5, (~close).sum()

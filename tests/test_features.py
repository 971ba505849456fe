"""Features stage: sparse storage equals sae.encode, refusals, overflow, resume, direct transfer."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from sae_lens import SAE

from pipeline.errors import XprobeError
from pipeline.store import Store
from pipeline.store.sparse import iter_sparse
from stages.activations import ActivationsConfig
from stages.activations import run as activations
from stages.features import FeaturesConfig, run
from tests.helpers import (
    save_gated_sae,
    save_jumprelu_sae,
    save_standard_sae,
    save_topk_sae,
    tokenize_small,
    wait_for_markers,
)

HOOK = "blocks.0.hook_resid_post"
UNIT = "feats/c/sae"


def _save_model(model, tokenizer_dir: Path, out: Path) -> Path:
    from transformers import AutoTokenizer

    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def base_store(tmp_path_factory, corpus_jsonl, tokenizer_dir, gpt2_dir) -> Path:
    """Tokens (ctx 32, 4 seqs/chunk, ~2000 tokens) and layer-0 resid_post of three models:
    ``a`` (the test GPT-2), ``b`` (its weights perturbed) and ``narrow`` (d_model 32)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("feats")
    torch.manual_seed(5)
    b = GPT2LMHeadModel.from_pretrained(gpt2_dir)
    with torch.no_grad():
        for p in b.parameters():
            p.add_(0.3 * p.std() * torch.randn_like(p))
    b_dir = _save_model(b.eval(), tokenizer_dir, root / "b_model")
    narrow_cfg = GPT2Config(
        vocab_size=b.config.vocab_size,
        n_layer=1,
        n_embd=32,
        n_head=2,
        n_positions=128,
        bos_token_id=0,
        eos_token_id=0,
    )
    narrow_dir = _save_model(
        GPT2LMHeadModel(narrow_cfg).eval(), tokenizer_dir, root / "narrow_model"
    )
    store = Store(root / "store")
    tokenize_small(store, corpus_jsonl, tokenizer_dir, 2000)
    for name, model_dir in (("a", gpt2_dir), ("b", b_dir), ("narrow", narrow_dir)):
        activations(
            ActivationsConfig(
                corpus="c",
                model=str(model_dir),
                name=name,
                hooks=(HOOK,),
                device="cpu",
                progress=False,
            ),
            store,
        )
    return root / "store"


@pytest.fixture
def store_path(base_store, tmp_path) -> Path:
    path = tmp_path / "store"
    shutil.copytree(base_store, path)
    return path


@pytest.fixture(scope="module")
def sae_dir(tmp_path_factory) -> Path:
    return save_standard_sae(tmp_path_factory.mktemp("sae") / "sae")


def _cfg(sae_path, **kw) -> FeaturesConfig:
    base = dict(
        corpus="c", model="a", sae_path=str(sae_path), name="sae", device="cpu", progress=False
    )
    base.update(kw)
    return FeaturesConfig(**base)


def _reference(store: Store, sae_path, model="a"):
    """sae.encode on each stored chunk (the same rows the stage encodes), with the mask."""
    sae = SAE.load_from_disk(str(sae_path))
    n_chunks = store.info("tokens/c")["n_chunks"]
    acts, feats, masks = [], [], []
    with torch.inference_mode():
        for i in range(n_chunks):
            x = torch.from_numpy(store.read_chunk(f"acts/c/{model}/{HOOK}/x", i))
            acts.append(x.numpy())
            feats.append(sae.encode(x).numpy())
            masks.append(store.read_chunk("tokens/c/mask", i).reshape(-1))
    return sae, np.concatenate(acts), np.concatenate(feats), np.concatenate(masks)


def _dense(store: Store, n_feat: int) -> np.ndarray:
    idx, val = store.array(f"{UNIT}/idx")[:], store.array(f"{UNIT}/val")[:]
    dense = np.zeros((len(idx), n_feat), np.float32)
    rows, slots = np.nonzero(idx >= 0)
    dense[rows, idx[rows, slots]] = val[rows, slots]
    assert np.all(val[idx < 0] == 0)
    return dense


def test_stored_features_equal_sae_encode_and_stats(store_path, sae_dir):
    store = Store(store_path)
    run(_cfg(sae_dir), store)
    info = store.info(UNIT)
    _, _, ref, mask = _reference(store, sae_dir)
    l0 = (ref[mask] != 0).sum(1)
    assert 5 < l0.mean() < 120, "the test SAE must have a moderate L0"
    assert info["complete"] and info["k"] >= l0[: 4 * 32].max()  # calibrated on chunk 0
    ref[~mask] = 0  # masked positions are stored without features
    if info["dropped_mass"] == 0:
        np.testing.assert_array_equal(_dense(store, 256), ref)
    else:  # calibration on chunk 0 may under-size K for a later chunk: kept features still exact
        dense = _dense(store, 256)
        kept = dense != 0
        np.testing.assert_array_equal(dense[kept], ref[kept])
        assert info["dropped_fraction"] <= 1e-3
    # per-feature stats over counted tokens, from the dense activations
    counted = ref[mask].astype(np.float64)
    count = (counted != 0).sum(0)
    np.testing.assert_array_equal(store.array(f"{UNIT}/stats/count")[:], count)
    np.testing.assert_array_equal(store.array(f"{UNIT}/stats/dead")[:], count == 0)
    np.testing.assert_allclose(store.array(f"{UNIT}/stats/mean")[:], counted.mean(0), rtol=1e-12)
    np.testing.assert_allclose(
        store.array(f"{UNIT}/stats/sum_sq")[:], (counted**2).sum(0), rtol=1e-12
    )
    np.testing.assert_array_equal(store.array(f"{UNIT}/stats/max")[:], counted.max(0))
    np.testing.assert_allclose(store.array(f"{UNIT}/stats/frequency")[:], count / mask.sum())
    assert info["dense_bytes_per_token"] == 256 * 4 and info["bytes_per_token"] == 8 * info["k"]
    assert info["bytes_per_token_on_disk"] < info["dense_bytes_per_token"]
    # the COO reader gives the same features
    coo = np.zeros_like(ref)
    rows_per_chunk = 4 * 32
    for index, rows, cols, vals in iter_sparse(store, "c", "sae"):
        coo[index * rows_per_chunk + rows.numpy(), cols.numpy()] = vals.numpy()
    np.testing.assert_array_equal(coo, _dense(store, 256))


def test_topk_sae_keeps_its_k_exactly(store_path, tmp_path):
    sae_dir = save_topk_sae(tmp_path / "topk", k=8)
    store = Store(store_path)
    run(_cfg(sae_dir, max_dropped_fraction=0.0), store)
    info = store.info(UNIT)
    assert info["k"] == 8 and info["dropped_mass"] == 0 and info["sae_architecture"] == "topk"
    _, _, ref, mask = _reference(store, sae_dir)
    ref[~mask] = 0
    np.testing.assert_array_equal(_dense(store, 256), ref)
    idx = store.array(f"{UNIT}/idx")[:]
    assert np.all((idx >= 0).sum(1)[mask] == 8) and np.all(idx[~mask] == -1)


@pytest.mark.parametrize("architecture", ["jumprelu", "gated"])
def test_jumprelu_and_gated_saes_equal_their_encode(store_path, tmp_path, architecture):
    save = {"jumprelu": save_jumprelu_sae, "gated": save_gated_sae}[architecture]
    sae_dir = save(tmp_path / architecture)
    store = Store(store_path)
    run(_cfg(sae_dir), store)
    info = store.info(UNIT)
    assert info["sae_architecture"] == architecture and info["dropped_mass"] == 0
    _, _, ref, mask = _reference(store, sae_dir)
    l0 = (ref[mask] != 0).sum(1)
    assert 2 < l0.mean() < 150, f"the test {architecture} SAE must have a moderate L0"
    ref[~mask] = 0
    np.testing.assert_array_equal(_dense(store, 256), ref)


def test_mismatches_refused_before_writing(store_path, tmp_path, sae_dir):
    store = Store(store_path)
    narrow_sae = save_standard_sae(tmp_path / "narrow", d_in=32)
    with pytest.raises(XprobeError, match=r"d_in = 32 .* d_model = 64"):
        run(_cfg(narrow_sae), store)
    other_hook = save_standard_sae(tmp_path / "l1", hook="blocks.1.hook_resid_post")
    with pytest.raises(XprobeError, match=r"blocks.1.hook_resid_post.*Run the activations stage"):
        run(_cfg(other_hook), store)
    with pytest.raises(XprobeError, match=r"transfer model 'narrow' has d_model = 32"):
        run(_cfg(sae_dir, transfer_models=("narrow",)), store)
    assert not store.has("feats") and not (store_path / "feats").exists()


def test_overflow_records_dropped_mass_and_refuses_past_limit(store_path, sae_dir, tmp_path):
    store = Store(store_path)
    run(_cfg(sae_dir, k=2, max_dropped_fraction=1.0), store)
    info = store.info(UNIT)
    _, _, ref, mask = _reference(store, sae_dir)
    mags = -np.sort(-np.abs(ref[mask]), axis=1)
    want = 1 - mags[:, :2].sum() / mags.sum()
    assert info["dropped_fraction"] == pytest.approx(want, rel=1e-6) and want > 0.1
    record = store.chunk_record(UNIT, 0)
    assert 0 < record["dropped_fraction"] <= 1 and record["dropped_mass"] > 0
    # the kept values are each token's 2 largest
    kept = -np.sort(-np.abs(store.array(f"{UNIT}/val")[:][mask]), axis=1)
    np.testing.assert_allclose(kept, mags[:, :2], rtol=0)
    with pytest.raises(XprobeError, match=r"drops .* of the activation mass.*larger k"):
        run(_cfg(sae_dir, name="tight", k=2, max_dropped_fraction=1e-6), store)
    assert not store.done_chunks("feats/c/tight")


KILL_SCRIPT = """
import sys, time
from pipeline.lifecycle import run as run_stage
from pipeline.store import Store
from stages.features import FeaturesConfig, FeaturesStage

class Slow(FeaturesStage):
    def compute(self, store, todo):
        for result in super().compute(store, todo):
            yield result
            time.sleep(0.3)

cfg = FeaturesConfig(corpus="c", model="a", sae_path=sys.argv[2], name="sae", device="cpu", k=64,
                     transfer_models=("b",), progress=False)
run_stage(Slow(cfg), Store(sys.argv[1]), progress=False)
"""


@pytest.mark.slow  # kills and resumes
def test_sigkill_then_resume_is_bit_identical(store_path, base_store, sae_dir, tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-c", KILL_SCRIPT, str(store_path), str(sae_dir)],
        cwd=Path(__file__).parents[1],
    )
    done_dir = store_path / UNIT / "_done"
    wait_for_markers(done_dir, 1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed = Store(store_path)
    n_chunks = killed.info("tokens/c")["n_chunks"]
    assert 1 <= len(killed.done_chunks(UNIT)) < n_chunks, "the kill must land partway"
    cfg = _cfg(sae_dir, k=64, transfer_models=("b",))
    resumed = run(cfg, killed)
    assert 0 < resumed["chunks_written"] < n_chunks
    shutil.copytree(base_store, tmp_path / "ref")
    ref = Store(tmp_path / "ref")
    run(cfg, ref)
    names = [
        "idx",
        "val",
        "chunk_stats",
        "stats/count",
        "stats/mean",
        "stats/max",
        "stats/sum",
        "stats/sum_sq",
        "stats/dead",
        "transfer/b/corr",
    ]
    for name in names:
        got, want = killed.array(f"{UNIT}/{name}")[:], ref.array(f"{UNIT}/{name}")[:]
        assert got.tobytes() == want.tobytes(), name
    for key in ("dropped_mass", "transfer", "n_dead"):
        assert killed.info(UNIT)[key] == ref.info(UNIT)[key]


def test_direct_transfer_metrics_equal_numpy(store_path, sae_dir):
    store = Store(store_path)
    run(_cfg(sae_dir, k=256, transfer_models=("b",)), store)
    sae, xa, fa, mask = _reference(store, sae_dir, "a")
    _, xb, fb, _ = _reference(store, sae_dir, "b")
    xa, xb, fa, fb = (t[mask].astype(np.float64) for t in (xa, xb, fa, fb))
    with torch.inference_mode():
        rec_a = sae.decode(torch.from_numpy(fa).float()).double().numpy()
        rec_b = sae.decode(torch.from_numpy(fb).float()).double().numpy()

    def explained(x, rec):
        return 1 - ((x - rec) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()

    cos = (xa * xb).sum(1) / (np.linalg.norm(xa, axis=1) * np.linalg.norm(xb, axis=1))
    corr = np.full(fa.shape[1], np.nan)
    for j in range(fa.shape[1]):
        if fa[:, j].std() > 0 and fb[:, j].std() > 0:
            corr[j] = np.corrcoef(fa[:, j], fb[:, j])[0, 1]
    got = store.info(UNIT)["transfer"]["b"]
    assert got["n_counted"] == mask.sum()
    assert got["explained_variance_a"] == pytest.approx(explained(xa, rec_a), abs=1e-6)
    assert got["explained_variance_b"] == pytest.approx(explained(xb, rec_b), abs=1e-6)
    assert got["mean_cosine"] == pytest.approx(cos.mean(), abs=1e-9)
    assert 0.3 < got["mean_cosine"] < 0.999, "B must be a perturbed, not identical, model"
    stored = store.array(f"{UNIT}/transfer/b/corr")[:]
    assert np.isfinite(corr).sum() > 50
    np.testing.assert_array_equal(np.isnan(stored), np.isnan(corr))
    np.testing.assert_allclose(stored[~np.isnan(corr)], corr[~np.isnan(corr)], atol=1e-6)


def test_sae_on_a_hook_xprobe_cannot_store_is_told_so(tmp_path):
    """An SAE on ``hook_mlp_out`` is not told to run the activations stage with that hook (which
    the activations stage refuses): it is told the hook cannot be stored."""
    sae = save_standard_sae(tmp_path / "sae_mlp", hook="blocks.1.hook_mlp_out")
    cfg = FeaturesConfig(corpus="c", model="a", sae_path=str(sae), name="sae", progress=False)
    with pytest.raises(XprobeError, match="cannot store: the activations stage stores") as e:
        run(cfg, Store(tmp_path / "s"))
    assert "Run the activations stage with hooks" not in str(e.value)
    with pytest.raises(XprobeError, match="cannot be read"):
        FeaturesConfig(corpus="c", model="a", sae_path=str(sae), hook="blocks.1.hook_mlp_out")

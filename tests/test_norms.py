"""Per-token residual norms recorded by the activations stage, against numpy on the stored values."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pipeline.cli import cli
from pipeline.maths import norms
from pipeline.store import Store
from pipeline.store.reader import load_acts
from stages.activations import ActivationsConfig, run
from tests.helpers import tokenize_small

CTX = 32


def _reference(values: np.ndarray, q: float) -> float:
    return float(np.quantile(values, q, method="inverted_cdf"))


def _close(got: float, want: float) -> bool:
    return abs(got - want) <= norms.TOLERANCE * want + 1e-12


@pytest.mark.parametrize(
    ("model_fixture", "dtype"), [("gpt2_dir", "float32"), ("llama_dir", "bfloat16")]
)
def test_recorded_norm_quantiles_equal_numpy_on_stored_activations(
    tmp_path, corpus_jsonl, tokenizer_dir, model_fixture, dtype, request
):
    store = Store(tmp_path / "s")
    tokenize_small(store, corpus_jsonl, tokenizer_dir, max_tokens=600)
    model = request.getfixturevalue(model_fixture)
    run(
        ActivationsConfig(
            corpus="c",
            model=str(model),
            name="m",
            layers=(0, 1),
            device="cpu",
            dtype=dtype,
            progress=False,
        ),
        store,
    )
    mask = store.array("tokens/c/mask")[:].reshape(-1)
    position = np.arange(len(mask)) % CTX
    for layer in (0, 1):
        unit = f"acts/c/m/blocks.{layer}.hook_resid_post"
        x = np.concatenate(
            [
                load_acts(store, unit, i).double().numpy()
                for i in range(store.info(unit)["n_chunks"])
            ]
        )
        n = np.linalg.norm(x, axis=1)
        rec = store.info(unit)["norms"]
        counted = n[mask]
        assert rec["n"] == mask.sum()
        assert _close(rec["median"], _reference(counted, 0.5))
        assert _close(rec["p99"], _reference(counted, 0.99))
        assert rec["max"] == pytest.approx(counted.max(), rel=1e-12)
        groups = {
            "pos0": mask & (position == 0),
            "pos1": mask & (position == 1),
            "pos2+": mask & (position >= 2),
            "not_counted": ~mask,
        }
        for name, sel in groups.items():
            g = rec["by_position"][name]
            assert g["n"] == sel.sum()
            if sel.any():
                assert _close(g["median"], _reference(n[sel], 0.5))
                assert g["max"] == pytest.approx(n[sel].max(), rel=1e-12)
    out = CliRunner().invoke(cli, ["info", str(tmp_path / "s")])
    assert out.exit_code == 0, out.output
    assert "residual norms: median" in out.output


def test_histogram_quantiles_against_numpy_with_a_huge_position_zero():
    """Position 0 scaled 1000x (an attention sink): the median stays the bulk's, the max and the
    position-0 group show the sink, every quantile within the stated tolerance of numpy's."""
    rng = np.random.default_rng(0)
    rows = 40 * CTX
    values = np.exp(rng.normal(1.0, 0.5, rows))
    values[np.arange(rows) % CTX == 0] *= 1000.0
    mask = np.ones(rows, dtype=bool)
    mask[:: CTX * 3] = False
    # two chunks summed equal one histogram of everything
    h1, t1 = norms.chunk_histograms(values[: 16 * CTX], mask[: 16 * CTX], CTX)
    h2, t2 = norms.chunk_histograms(values[16 * CTX :], mask[16 * CTX :], CTX)
    h, t = norms.chunk_histograms(values, mask, CTX)
    assert np.array_equal(h1.astype(np.int64) + h2, h) and np.array_equal(np.maximum(t1, t2), t)
    s = norms.summary(h.astype(np.int64), t)
    counted = values[mask]
    for q in (0.01, 0.25, 0.5, 0.9, 0.99):
        assert _close(
            norms.quantile(h[:3].sum(axis=0), q, float(t[:3].max())), _reference(counted, q)
        )
    assert s["max"] == counted.max()
    pos0 = values[mask & (np.arange(rows) % CTX == 0)]
    assert _close(s["by_position"]["pos0"]["median"], _reference(pos0, 0.5))
    assert s["by_position"]["pos0"]["median"] > 100 * s["median"]
    assert "position 0: median" in norms.describe(s)


def test_norms_outside_the_grid_go_to_the_end_bins():
    b = norms.bin_of(np.array([0.0, 2.0**norms.LOG2_MIN / 4, 1.0, 2.0**norms.LOG2_MAX * 4]))
    assert b[0] == 0 and b[1] == 0 and b[3] == norms.N_BINS - 1 and 0 < b[2] < norms.N_BINS - 1


HOOK = "blocks.0.hook_resid_post"


@pytest.fixture(scope="module")
def sink_store(tmp_path_factory, corpus_jsonl, tokenizer_dir, gpt2_dir, llama_dir):
    """A GPT-2 whose position-1 embedding (the first counted position after the masked BOS) is
    scaled 300x, so that position's residual norm is far above the median (an attention sink);
    B is the plain test Llama."""
    import torch
    from transformers import AutoTokenizer, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("sink")
    model = GPT2LMHeadModel.from_pretrained(gpt2_dir)
    with torch.no_grad():
        model.transformer.wpe.weight[1] *= 300.0
    model.save_pretrained(root / "sink")
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(root / "sink")
    store = Store(root / "store")
    tokenize_small(store, corpus_jsonl, tokenizer_dir, 3000)
    for name, model_dir in (("a", root / "sink"), ("B", llama_dir)):
        run(
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
    return store


@pytest.mark.slow  # five fits and a report, float64
def test_exclusion_drops_exactly_the_high_norm_positions_and_fit_equals_lstsq_without_them(
    sink_store, tmp_path
):
    from stages.features import FeaturesConfig
    from stages.features import run as features
    from stages.fit import FitConfig
    from stages.fit import run as fit
    from tests.helpers import held_out_split, save_standard_sae

    store = sink_store
    a_unit, b_unit = f"acts/c/a/{HOOK}", f"acts/c/B/{HOOK}"
    mask = store.array("tokens/c/mask")[:].reshape(-1)
    xa = store.array(f"{a_unit}/x")[:].astype(np.float64)
    na = np.linalg.norm(xa, axis=1)
    rec = store.info(a_unit)["norms"]
    assert rec["by_position"]["pos1"]["median"] > 10 * rec["median"]  # the sink is recorded
    threshold = 5.0 * rec["median"]
    want = mask & (na > threshold)
    assert 0 < want.sum() < mask.sum()

    sae = save_standard_sae(tmp_path / "sae")
    features(
        FeaturesConfig(
            corpus="c",
            model="a",
            sae_path=str(sae),
            name="sae",
            device="cpu",
            exclude_norm_above=5.0,
            progress=False,
        ),
        store,
    )
    unit = "feats/c/sae"
    info = store.info(unit)
    excluded = store.array(f"{unit}/excluded")[:]
    assert np.array_equal(excluded, want)  # exactly what numpy says exceeds the threshold
    assert info["n_excluded"] == want.sum() and info["norm_threshold"] == threshold
    assert info["n_counted"] == mask.sum() - want.sum()
    idx, val = store.array(f"{unit}/idx")[:], store.array(f"{unit}/val")[:]
    assert np.all(idx[excluded] == -1) and np.all(val[excluded] == 0)  # no features there
    assert (idx[mask & ~excluded] >= 0).any()

    n_feat = int(info["n_feat"])
    y = np.zeros((len(idx), n_feat))
    rows, slots = np.nonzero(idx >= 0)
    y[rows, idx[rows, slots]] = val[rows, slots]
    xb = store.array(f"{b_unit}/x")[:].astype(np.float64)
    held = np.repeat(held_out_split(store, store.info("tokens/c")["n_seq"], 0.25, 0), 32)
    base = dict(
        corpus="c",
        features="sae",
        model="B",
        hooks=(HOOK,),
        held_out_fraction=0.25,
        lambdas=(0.0,),
        compute_dtype="float64",
        device="cpu",
        n_bootstrap=0,
        progress=False,
        predictor="linear",  # checked against lstsq of the post-activation
    )
    nb = np.linalg.norm(xb, axis=1)
    b_threshold = 1.2 * store.info(b_unit)["norms"]["median"]
    for name, factor, keep in (
        ("f", None, mask & ~excluded),
        ("g", 1.2, mask & ~excluded & ~(nb > b_threshold)),
    ):
        fit(FitConfig(name=name, exclude_norm_above=factor, **base), store)
        finfo = store.info(f"probes/{name}")
        assert finfo["n_excluded"] == mask.sum() - keep.sum()
        assert finfo["n_tok_train"] == (keep & ~held).sum()
        assert finfo["n_tok_held_out"] == (keep & held).sum()
        train = keep & ~held
        a = np.hstack([xb[train], np.ones((train.sum(), 1))])
        coef = np.linalg.lstsq(a, y[train], rcond=None)[0]
        got = store.array(f"probes/{name}/{HOOK}/direction")[:]
        ok = store.array(f"probes/{name}/{HOOK}/status")[:] == 0
        assert ok.sum() > 0
        np.testing.assert_allclose(
            got[ok], coef[:-1].T[ok], rtol=1e-4, atol=1e-5 * np.abs(coef).max()
        )
        r2 = store.array(f"probes/{name}/{HOOK}/r2_held_out")[:]
        test = keep & held
        f = int(np.nonzero(ok)[0][0])
        pred = (
            xb[test] @ got[f].astype(np.float64) + store.array(f"probes/{name}/{HOOK}/intercept")[f]
        )
        ss = ((y[test, f] - y[test, f].mean()) ** 2).sum()
        assert abs((1 - ((y[test, f] - pred) ** 2).sum() / ss) - r2[f]) < 1e-5
    # unset, the option is not in the config identity: fingerprints made before it stay valid
    from stages.features import FeaturesStage
    from stages.fit import FitStage

    assert "exclude_norm_above" not in FitStage(FitConfig(name="h", **base)).identity()
    stage = FeaturesStage(
        FeaturesConfig(corpus="c", model="a", sae_path=str(sae), name="x", device="cpu")
    )
    assert "exclude_norm_above" not in stage.identity()
    # the report: its token pass skips the excluded positions, its header counts them
    from stages.report import ReportConfig
    from stages.report import run as report
    from tests.test_report import shrunk_token_means

    fit(FitConfig(name="ceil", **{**base, "model": "a"}), store)
    out = report(
        ReportConfig(
            corpus="c", features="sae", fits=("g",), ceiling="ceil", n_shown=0, progress=False
        ),
        store,
    )
    ids = store.array("tokens/c/ids")[:].reshape(-1)
    train, test = mask & ~excluded & ~held, mask & ~excluded & held
    pred = shrunk_token_means(ids[train], y[train], ids[test])
    sst = ((y[test] - y[test].mean(0)) ** 2).sum(0)
    defined = sst > 0
    got = store.array("report/main/token_r2")[:]
    want_r2 = 1 - ((y[test] - pred) ** 2).sum(0)[defined] / sst[defined]
    np.testing.assert_allclose(got[defined], want_r2, rtol=1e-9, atol=1e-9)
    page = Path(out["html"]).read_text()
    assert "high-norm positions (A)" in page and f"{int(want.sum()):,} counted positions" in page
    assert (
        "high-norm positions (fit &#x27;g&#x27;)" in page or "high-norm positions (fit 'g')" in page
    )
    assert "residual norms at blocks.0.hook_resid_post" in page
    # the match stage counts only the positions that keep their features
    from stages.match import MatchConfig
    from stages.match import run as match

    match(
        MatchConfig(
            name="self",
            corpus="c",
            features_a="sae",
            features_b="sae",
            device="cpu",
            progress=False,
        ),
        store,
    )
    assert store.info("matches/self")["summary"]["n_counted"] == mask.sum() - want.sum()

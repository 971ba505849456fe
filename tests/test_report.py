"""Report stage: a tiny pipeline end to end, the token baseline against numpy, presence edge cases."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from sae_lens import SAE

from pipeline.cli import cli
from pipeline.errors import XprobeError
from pipeline.maths import presence as presence_module
from pipeline.maths.lstsq import STATUS_CONSTANT_HELD_OUT, STATUS_DEAD, STATUS_OK, STATUS_RARE
from pipeline.maths.presence import (
    TOKEN_SHRINKAGE,
    TokenBaseline,
    TopActivations,
    classify,
    classify_interval,
    feature_status,
    percentile_interval,
    presence,
    presence_replicates,
)
from pipeline.store import Store
from pipeline.store.checkpoint import load_checkpoint
from stages.activations import ActivationsConfig
from stages.activations import run as activations
from stages.features import FeaturesConfig
from stages.features import run as features
from stages.fit import FitConfig
from stages.fit import run as fit
from stages.report import ReportConfig
from stages.report import run as report
from tests.helpers import held_out_split, save_standard_sae, tokenize_small

HOOK = "blocks.1.hook_resid_post"
HOOKS_B = ("blocks.0.hook_resid_post", HOOK)


def _fit(name: str, model: str, hooks: tuple[str, ...], **kw) -> FitConfig:
    base = dict(
        name=name,
        corpus="c",
        features="sae",
        model=model,
        hooks=hooks,
        held_out_fraction=0.25,
        lambdas=(0.0, 1e-3, 1e-1),
        compute_dtype="float64",
        device="cpu",
        progress=False,
        split_by="sequence",  # the numpy references below split by sequence
    )
    base.update(kw)
    return FitConfig(**base)


@pytest.fixture(scope="module")
def pipeline_store(tmp_path_factory, corpus_jsonl, tokenizer_dir, gpt2_dir) -> Path:
    """tokenize -> activations of A, B (A + 10% noise), random -> A's SAE features (with direct
    transfer to B) -> fits of B (two layers), random (the floor) and A itself (the ceiling)."""
    from transformers import AutoTokenizer, GPT2LMHeadModel

    root = tmp_path_factory.mktemp("report")
    torch.manual_seed(3)
    b = GPT2LMHeadModel.from_pretrained(gpt2_dir)
    with torch.no_grad():
        for p in b.parameters():
            p.add_(0.1 * p.std() * torch.randn_like(p))
    rand = GPT2LMHeadModel(b.config)  # same architecture, fresh initialisation
    for name, model in (("b_model", b), ("random_model", rand)):
        model.eval().save_pretrained(root / name)
        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(root / name)
    sae = save_standard_sae(root / "sae", d_sae=96, hook=HOOK, bias=-1.5)
    loaded = SAE.load_from_disk(str(sae), device="cpu")
    with torch.no_grad():
        loaded.b_enc[-2:] = -1e4  # two features that never fire
    loaded.save_model(str(sae))
    store = Store(root / "store")
    tokenize_small(store, corpus_jsonl, tokenizer_dir, 4000)
    for name, path, layers in (
        ("A", gpt2_dir, (1,)),
        ("B", root / "b_model", (0, 1)),
        ("random", root / "random_model", (1,)),
    ):
        activations(
            ActivationsConfig(
                corpus="c", model=str(path), name=name, layers=layers, device="cpu", progress=False
            ),
            store,
        )
    features(
        FeaturesConfig(
            corpus="c",
            model="A",
            sae_path=str(sae),
            name="sae",
            transfer_models=("B",),
            device="cpu",
            progress=False,
        ),
        store,
    )
    fit(_fit("B", "B", HOOKS_B), store)
    fit(_fit("random", "random", (HOOK,)), store)
    fit(_fit("ceiling", "A", (HOOK,)), store)
    return root / "store"


def _report_cfg(**kw) -> ReportConfig:
    base = dict(corpus="c", features="sae", fits=("B",), floor="random", progress=False)
    base.update(kw)
    return ReportConfig(**base)


def _dense_features(store: Store) -> np.ndarray:
    idx, val = store.array("feats/c/sae/idx")[:], store.array("feats/c/sae/val")[:]
    n_feat = store.info("feats/c/sae")["n_feat"]
    y = np.zeros((len(idx), n_feat))
    rows, slots = np.nonzero(idx >= 0)
    y[rows, idx[rows, slots]] = val[rows, slots]
    return y


def test_report_end_to_end(pipeline_store):
    store = Store(pipeline_store)
    out = report(_report_cfg(), store)
    df = pd.read_parquet(out["table"])
    csv = pd.read_csv(Path(out["table"]).with_suffix(".csv"))
    assert list(csv.columns) == list(df.columns)
    np.testing.assert_allclose(csv["B_presence"], df["B_presence"], rtol=1e-12)
    n_feat = store.info("feats/c/sae")["n_feat"]
    assert list(df["feature"]) == list(range(n_feat))
    # the ceiling was found without being named, and the table carries its R²
    np.testing.assert_array_equal(
        df["ceiling_r2"], store.array(f"probes/ceiling/{HOOK}/r2_held_out")[:]
    )
    for col in (
        "frequency",
        "token_r2",
        "B_r2",
        "B_presence",
        "floor_presence",
        "encoder_cosine",
        "B_transfer_corr",
        f"B_r2@{HOOKS_B[0]}",
        "B_best_hook",
        "B_r2_clipped",
        "B_auroc",
        "B_r2_lo",
        "B_r2_hi",
        "B_presence_lo",
        "B_presence_hi",
        "ceiling_r2_clipped",
        "ceiling_auroc",
        "ceiling_r2_lo",
        "ceiling_r2_clipped_lo",
        "B_r2_clipped_hi",
    ):
        assert col in df, col
    # the intervals hold their point values (percentile intervals of 200 replicates usually do)
    for col in ("B_r2", "B_r2_clipped", "ceiling_r2", "ceiling_r2_clipped"):
        slack = 1e-9  # the ceiling's R² is 1 up to round-off in every replicate
        inside = (df[f"{col}_lo"] - slack <= df[col]) & (df[col] <= df[f"{col}_hi"] + slack)
        assert inside[df["status"] == "scored"].mean() > 0.9, col
    # a score exists exactly where the feature is scored, and is then in [0, 1]
    for label in ("B", "floor"):
        score, cls = df[f"{label}_presence"], df[f"{label}_class"]
        assert (score.notna() == (df["status"] == "scored")).all()
        assert (cls == "unscored").eq(score.isna()).all()
        assert score.dropna().between(0, 1).all()
        low, high = df[f"{label}_presence_lo"], df[f"{label}_presence_hi"]
        informative = df[f"{label}_presence_informative"]
        assert (low.notna() == (score.notna() & informative)).all()  # never an interval [0, 1]
        assert cls[~informative].isin(["no ceiling margin", "undetermined"]).all()
        assert ((low <= high) | low.isna()).all()
        # a class only where the whole interval lies in its band; straddling: undetermined
        assert (cls[low >= 0.7] == "present").all() and (cls[high < 0.3] == "absent").all()
        assert (cls[(low >= 0.3) & (high < 0.7)] == "partial").all()
        straddles = ((low < 0.7) & (high >= 0.7)) | ((low < 0.3) & (high >= 0.3))
        assert (cls[straddles] == "undetermined").all()
        assert (cls[score >= 0.7].isin(["present", "undetermined", "no ceiling margin"])).all()
    assert (df["status"] == "scored").sum() >= 20
    dead = store.array("feats/c/sae/stats/dead")[:]
    assert dead.sum() == 2 and (df["status"][dead] == "dead").all()
    # B is A plus 10% noise: it has A's features; the random model has far fewer
    assert df["B_presence"].median() > 0.8
    assert df["B_presence"].median() > df["floor_presence"].median() + 0.2
    # best layer is B's probed hook with the larger GCV R² (chosen on training tokens)
    r2_by_hook = np.stack([store.array(f"probes/B/{h}/r2_gcv")[:] for h in HOOKS_B])
    ok = df["B_fit_status"] == "ok"
    assert (df["B_best_hook"][ok] == np.asarray(HOOKS_B)[r2_by_hook.argmax(0)][ok]).all()
    # calibration: the A -> A probe points along the SAE's encoder row
    sae = SAE.load_from_disk(store.info("feats/c/sae")["config"]["sae_path"], device="cpu")
    w = sae.W_enc.detach().double().numpy()
    direction = store.array(f"probes/ceiling/{HOOK}/direction")[:].astype(np.float64)
    f = int(df.index[df["status"] == "scored"][0])
    expect = direction[f] @ w[:, f] / np.linalg.norm(direction[f]) / np.linalg.norm(w[:, f])
    assert abs(df["encoder_cosine"][f] - expect) < 1e-9
    assert df["encoder_cosine"][df["status"] == "scored"].median() > 0.5
    # the same cosines for every fit in A's basis, at its best hook; and with the decoder row
    hooks = np.asarray(HOOKS_B)
    g = int(df.index[(df["status"] == "scored") & (df["B_fit_status"] == "ok")][0])
    hook = str(df["B_best_hook"][g])
    b_dir = store.array(f"probes/B/{hook}/direction")[g].astype(np.float64)
    w_dec = sae.W_dec.detach().double().numpy()[g]
    expect = b_dir @ w_dec / np.linalg.norm(b_dir) / np.linalg.norm(w_dec)
    assert hook in hooks and abs(df["B_decoder_cosine"][g] - expect) < 1e-9
    scored = df["status"] == "scored"
    assert df["B_encoder_cosine"][scored].median() > 0.2
    # the random floor is not in A's basis (its probes do not match the ceiling's): its cosines
    # with A's SAE would mean nothing and are NaN
    assert "decoder_cosine" in df and df["floor_decoder_cosine"].isna().all()
    assert df["floor_encoder_cosine"].isna().all()
    # Latent Scaling: least-squares scale of A's decoder row fitted to the model's training
    # activations where the feature fires, against numpy lstsq on the stored rows
    info = store.info("tokens/c")
    mask = store.array("tokens/c/mask")[:].reshape(-1)
    train = mask & ~np.repeat(
        held_out_split(store, info["n_seq"], 0.25, 0, split_by="sequence"), info["ctx"]
    )
    y = _dense_features(store)[train]
    w_dec = sae.W_dec.detach().double().numpy()
    acts: dict[str, np.ndarray] = {}
    for f in np.nonzero(scored.to_numpy() & (y != 0).any(0))[0][:4]:
        for label, model, at in (
            ("ceiling", "A", HOOK),
            ("floor", "random", HOOK),
            ("B", "B", str(df["B_best_hook"][f])),
        ):
            key = f"acts/c/{model}/{at}/x"
            if key not in acts:
                acts[key] = store.array(key)[:].astype(np.float64)[train]
            design = (y[:, f, None] * w_dec[f]).reshape(-1, 1)
            beta = np.linalg.lstsq(design, acts[key].reshape(-1), rcond=None)[0][0]
            got = df[f"{label}_latent_scale"][f]
            if label == "floor":  # not in A's basis: NaN in the table, computed in the fit
                assert np.isnan(got)
                got = store.array(f"probes/random/{HOOK}/latent_scale")[f]
            assert abs(got - beta) < 1e-6 * max(1, abs(beta)), (label, f, got, beta)
    floor_scale = store.array(f"probes/random/{HOOK}/latent_scale")[:][scored.to_numpy()]
    assert df["ceiling_latent_scale"][scored].median() > np.median(floor_scale)
    # top contexts: the first is the feature's largest stored activation
    y = _dense_features(store)
    top_value = store.array("report/main/top_value")[:]
    top_token = store.array("report/main/top_token")[:]
    fires = y.max(0) > 0
    np.testing.assert_allclose(top_value[fires, 0], y.max(0)[fires])
    assert (y[top_token[fires, 0], np.nonzero(fires)[0]] == y.max(0)[fires]).all()
    # the HTML stands alone: plots embedded, contexts with the activating token outlined
    page = Path(out["html"]).read_text()
    assert page.count("data:image/png;base64,") >= 4
    assert page.count('class="feature"') >= 2 and "peak" in page
    assert "http://" not in page and "https://" not in page and "<script src" not in page
    # every feature is a row of the searchable table, an anchor the cards link to
    for f in range(n_feat):
        assert f'<tr id="f{f}" data-f="{f}"' in page
    assert 'id="feature-search"' in page and page.count('<a href="#f') >= 2
    scored = df.index[df["status"] == "scored"]
    assert page.count("<details><summary>") >= len(scored)
    # a shared file: no absolute path of this machine; the store by its folder name
    assert str(pipeline_store.parent) not in page and "<td>store</td><td>store</td>" in page
    # one meaning of "dead"; the calibration caption does not call low cosines a mismatch
    assert re.search(r"<td>SAE</td><td>[^<]*dead", page) is None  # "dead" is a status only
    assert re.search(r"never fires? on this corpus", page)
    assert "flags a mismatch" not in page
    # one image per model against the ceiling, wrapping on a narrow page
    assert page.count('class="panel"') == len(df.filter(like="_presence_raw").columns)
    assert "Standard baselines" in page and "firing AUROC" in page and "latent scale" in page
    # B is A plus noise: in A's basis, its weight-space baselines kept; the random floor's not
    assert df["B_same_basis"].all() and df["B_latent_scale"].notna().any()
    assert "B is in A's basis" in df["B_basis_reason"].iloc[0]
    assert not df["floor_same_basis"].any() and df["floor_decoder_cosine"].isna().all()
    # the terminal summary shows the thresholds and the table's counts
    counts = df["B_class"].value_counts()
    line = next(s for s in out["message"].splitlines() if s.strip().startswith("B "))
    classes = ("present", "partial", "absent", "undetermined", "no ceiling margin", "unscored")
    assert line.split()[1:7] == [str(int(counts.get(c, 0))) for c in classes]
    # "no ceiling margin" is counted apart from undetermined (the column above); with the
    # single-layer ceiling (R² 1) it is empty here: test_no_ceiling_margin_is_its_own_class_...
    assert counts.get("undetermined", 0) > 0  # 25% of 16 sequences held out: wide intervals
    assert "undetermined = the interval straddles a threshold" in out["message"]
    assert "present: ≥ 0.7" in out["message"] and "partial: ≥ 0.3" in out["message"]


def shrunk_token_means(ids: np.ndarray, y: np.ndarray, test_ids: np.ndarray) -> np.ndarray:
    """Dense reference [n_test, F]: per feature, ridge on a one-hot token code around the global
    mean (sklearn), its penalty k chosen from TOKEN_SHRINKAGE by GCV with an explicit hat matrix;
    predicted at ``test_ids`` (unseen ids: the global mean)."""
    from sklearn.linear_model import Ridge

    vocab = np.unique(ids)
    n = len(ids)
    mu = y.mean(0)
    one_hot = (ids[:, None] == vocab[None, :]).astype(np.float64)
    test_hot = (test_ids[:, None] == vocab[None, :]).astype(np.float64)
    counts = one_hot.sum(0)
    best, choice = np.full(y.shape[1], np.inf), np.zeros(y.shape[1])
    for k in TOKEN_SHRINKAGE:
        a = counts / (counts + k) if np.isfinite(k) else np.zeros_like(counts)
        # m = μ + Σ_v a_v (ȳ_v − μ) 1_v is the linear smoother H = 11ᵀ/n + G(I − 11ᵀ/n) with
        # G = Σ_v (a_v/c_v) 1_v 1_vᵀ, applied matrix-free; trace H = 1 + Σ_t G_tt − 1ᵀG1/n
        fitted = mu + one_hot @ ((a / counts)[:, None] * (one_hot.T @ (y - mu)))
        g_diag = (one_hot * (a / counts)[None, :]).sum(1)  # G_tt
        g_sum = ((one_hot.T @ np.ones(n)) ** 2 * (a / counts)).sum()  # 1ᵀG1
        trace = 1 + g_diag.sum() - g_sum / n
        gcv = ((y - fitted) ** 2).mean(0) / (1 - trace / n) ** 2
        better = gcv < best
        best[better], choice[better] = gcv[better], k
    out = np.tile(mu, (len(test_ids), 1))
    for f in np.nonzero(choice < np.inf)[0]:
        if choice[f] == 0:
            coef = np.array([y[ids == v, f].mean() - mu[f] for v in vocab])
        else:
            ridge = Ridge(alpha=choice[f], fit_intercept=False).fit(one_hot, y[:, f] - mu[f])
            coef = ridge.coef_
        out[:, f] += test_hot @ coef
    return out


def test_token_baseline_equals_numpy(pipeline_store):
    store = Store(pipeline_store)
    report(_report_cfg(name="tb", n_shown=0), store)
    got = store.array("report/tb/token_r2")[:]
    info = store.info("tokens/c")
    ids = store.array("tokens/c/ids")[:].reshape(-1)
    mask = store.array("tokens/c/mask")[:].reshape(-1)
    held = np.repeat(
        held_out_split(store, info["n_seq"], 0.25, 0, split_by="sequence"), info["ctx"]
    )
    train, test = mask & ~held, mask & held
    y = _dense_features(store)
    pred = shrunk_token_means(ids[train], y[train], ids[test])
    sst = ((y[test] - y[test].mean(0)) ** 2).sum(0)
    sse = ((y[test] - pred) ** 2).sum(0)
    defined = sst > 0
    assert defined.sum() >= 20 and (~defined).any()  # both cases occur
    np.testing.assert_allclose(got[defined], 1 - sse[defined] / sst[defined], rtol=1e-9, atol=1e-9)
    assert np.isnan(got[~defined]).all()
    # bootstrap replicates: the fits' Poisson weights per held-out sequence, R² weighted by them
    from pipeline.maths.evaluate import bootstrap_weights

    boot = store.array("report/tb/token_r2_boot")[:]
    n_boot = boot.shape[1]
    assert n_boot == 200
    per_chunk = [
        bootstrap_weights(
            0, i, min(info["chunk_seqs"], info["n_seq"] - i * info["chunk_seqs"]), n_boot
        )
        for i in range(info["n_chunks"])
    ]
    weights = np.repeat(np.concatenate(per_chunk), info["ctx"], axis=0)[test].astype(np.float64)
    for rep in (0, 7, 199):
        w = weights[:, rep : rep + 1]
        mean = (w * y[test]).sum(0) / w.sum()
        sst_w = (w * (y[test] - mean) ** 2).sum(0)
        sse_w = (w * (y[test] - pred) ** 2).sum(0)
        ok = sst_w > 1e-12
        np.testing.assert_allclose(boot[ok, rep], 1 - sse_w[ok] / sst_w[ok], rtol=1e-8, atol=1e-9)
        assert np.isnan(boot[~ok, rep]).all()


def test_token_baseline_sparse_merges_and_unseen_tokens(monkeypatch):
    """Many small chunks with forced merges, token ids absent from training, against numpy."""
    monkeypatch.setattr(presence_module, "_MERGE_AT", 8)
    rng = np.random.default_rng(0)
    n_tok, n_feat, vocab = 600, 7, 30
    ids = rng.integers(0, vocab, n_tok)
    y = np.where(
        rng.random((n_tok, n_feat)) < 0.3, rng.random((n_tok, n_feat)) + ids[:, None] / vocab, 0
    )
    held = rng.random(n_tok) < 0.3
    held[ids >= vocab - 3] = True  # these token ids never occur in training
    acc = TokenBaseline(n_feat)
    for start in range(0, n_tok, 50):
        for split, keep in (("train", ~held), ("held_out", held)):
            part = np.zeros(n_tok, bool)
            part[start : start + 50] = keep[start : start + 50]
            rows, cols = np.nonzero(y[part])
            acc.update(split, ids[part], rows, cols, y[part][rows, cols])
    means = {v: y[~held & (ids == v)].mean(0) for v in set(ids[~held])}
    pred = np.stack([means.get(v, y[~held].mean(0)) for v in ids[held]])
    sst = ((y[held] - y[held].mean(0)) ** 2).sum(0)
    expect = 1 - ((y[held] - pred) ** 2).sum(0) / sst
    np.testing.assert_allclose(acc.r2_held_out(shrink=False), expect, rtol=1e-10)
    # shrunk toward the global mean: against ridge on a one-hot code (sklearn), unseen ids too
    pred = shrunk_token_means(ids[~held], y[~held], ids[held])
    expect = 1 - ((y[held] - pred) ** 2).sum(0) / sst
    np.testing.assert_allclose(acc.r2_held_out(), expect, rtol=1e-8)
    assert len(set(acc.predictor().k)) >= 2  # the per-feature choice is exercised


def test_top_activations_keeps_largest_per_feature():
    rng = np.random.default_rng(1)
    top = TopActivations(n_feat=5, n_top=3)
    cols, vals = rng.integers(0, 4, 200), rng.random(200)  # feature 4 never fires
    for start in range(0, 200, 37):
        part = slice(start, start + 37)
        top.update(np.arange(200)[part], cols[part], vals[part])
    for f in range(4):
        order = np.argsort(-vals[cols == f])[:3]
        np.testing.assert_array_equal(top.value[f], vals[cols == f][order])
        np.testing.assert_array_equal(top.token[f], np.nonzero(cols == f)[0][order])
    assert (top.token[4] == -1).all() and np.isneginf(top.value[4]).all()


def test_presence_edge_cases():
    #            ok   ok    ok    ok    ok   dead  rare  const  ok
    ceiling_status = np.array(
        [STATUS_OK] * 5 + [STATUS_DEAD, STATUS_RARE, STATUS_CONSTANT_HELD_OUT, STATUS_OK]
    )
    ceiling_r2 = np.array([0.8, 0.8, 0.30, 0.6, 0.5, 0.0, 0.0, 0.0, -0.2])
    token_r2 = np.array([0.2, 0.2, 0.28, -0.5, np.nan, 0.0, 0.0, np.nan, -0.3])
    r2_b = np.array([0.5, -0.4, 0.3, 0.9, 0.25, 0.0, 0.0, 0.0, 0.1])
    fit_status = np.array([STATUS_OK] * 9)
    status = feature_status(ceiling_status, ceiling_r2, token_r2, min_headroom=0.05)
    assert list(status) == [
        "scored",
        "scored",
        "no headroom",
        "scored",
        "scored",
        "dead",
        "too rare",
        "constant",
        "no headroom",  # negative ceiling R²: nothing to score against
    ]
    raw, score = presence(r2_b, fit_status, ceiling_r2, token_r2, status)
    assert raw[0] == pytest.approx(0.5)  # (0.5 - 0.2) / (0.8 - 0.2)
    assert raw[1] == pytest.approx(-1.0) and score[1] == 0.0  # negative R² of B: absent, not NaN
    assert (
        raw[3] == pytest.approx(1.5) and score[3] == 1.0
    )  # negative token R² counts as 0; clipped
    assert raw[4] == pytest.approx(0.5)  # no token baseline (NaN): reference 0
    assert np.isnan(score[[2, 5, 6, 7, 8]]).all()
    assert list(classify(score, 0.7, 0.3)) == [
        "partial",
        "absent",
        "unscored",
        "present",
        "partial",
        "unscored",
        "unscored",
        "unscored",
        "unscored",
    ]
    # B's own fit failing where the ceiling's did not: unscored for B, never a number
    own = fit_status.copy()
    own[0] = STATUS_RARE
    assert np.isnan(presence(r2_b, own, ceiling_r2, token_r2, status)[1][0])


def test_intervals_and_undetermined_class():
    # percentile intervals; rows with too many undefined replicates are uninformative
    replicates = np.array(
        [
            np.linspace(0, 1, 101),
            np.full(101, 0.5),
            np.full(101, np.nan),
            np.r_[[np.nan] * 5, [0.9] * 96],
        ]
    )
    low, high = percentile_interval(replicates, 0.95)
    np.testing.assert_allclose(low[:2], [0.025, 0.5])
    np.testing.assert_allclose(high[:2], [0.975, 0.5])
    assert np.isnan(low[2]) and np.isnan(high[2])
    assert low[3] == -np.inf and high[3] == np.inf  # 5% undefined > 2.5%: cannot tell
    score = np.array([0.8, 0.8, 0.5, 0.1, 0.1, np.nan, 0.8])
    low = np.array([0.75, 0.6, 0.35, 0.0, 0.2, np.nan, np.nan])
    high = np.array([0.9, 0.9, 0.6, 0.25, 0.4, np.nan, np.nan])
    np.testing.assert_array_equal(
        classify_interval(score, low, high, 0.7, 0.3),
        ["present", "undetermined", "partial", "absent", "undetermined", "unscored", "present"],
    )
    # presence per replicate: per-replicate token reference, no headroom -> NaN, clipped
    r2 = np.array([[0.5, 0.9, 0.1]])
    ceiling = np.array([[0.6, 0.6, 0.2]])
    token = np.array([[0.1, -0.3, 0.3]])
    got = presence_replicates(r2, ceiling, token, np.array([True]))
    np.testing.assert_allclose(got, [[0.8, 1.0, np.nan]])
    assert np.isnan(presence_replicates(r2, ceiling, token, np.array([False]))).all()


def test_report_cached_pass_cli_and_refusals(pipeline_store, tmp_path):
    store = Store(pipeline_store)
    report(_report_cfg(name="cli"), store)
    table = pd.read_parquet(pipeline_store / "report/cli/table.parquet")
    config = tmp_path / "xprobe.toml"
    config.write_text(
        f'store = "{pipeline_store}"\n\n[report]\nname = "cli"\ncorpus = "c"\nfeatures = "sae"\n'
        f'fits = ["B"]\nfloor = "random"\npresent_at = 0.9\nprogress = false\n'
        f'html = "{tmp_path / "r.html"}"\n'
    )
    result = CliRunner().invoke(cli, ["run", str(config), "--only", "report"])
    assert result.exit_code == 0, result.output
    assert "from the cache" in result.output and "present: ≥ 0.9" in result.output
    cosines = store.array("report/cli/cosines")  # the SAE is loaded once, then cached
    cached = cosines[:][cosines.attrs["xprobe"]["columns"].index("encoder_cosine")]
    np.testing.assert_array_equal(
        np.where(table["ceiling_fit_status"] == "ok", cached, np.nan), table["encoder_cosine"]
    )
    assert (tmp_path / "r.html").exists()
    again = pd.read_parquet(pipeline_store / "report/cli/table.parquet")
    np.testing.assert_array_equal(again["B_presence"], table["B_presence"])  # same scores ...
    new_cut = classify_interval(
        again["B_presence"].to_numpy(),
        again["B_presence_lo"].to_numpy(),
        again["B_presence_hi"].to_numpy(),
        0.9,
        0.3,
    )
    informative = again["B_presence_informative"].to_numpy()
    assert (again["B_class"] == new_cut)[informative].all()  # new cut, same intervals
    # no interval (no ceiling margin, or undefined): the cut does not change the class
    assert (again["B_class"] == table["B_class"])[~informative].all()
    # refusals name what to do
    with pytest.raises(XprobeError, match="ceiling"):
        report(_report_cfg(name="x", ceiling="B"), store)
    fit(_fit("other_split", "B", (HOOK,), split_seed=1), store)
    with pytest.raises(XprobeError, match="another held-out split"):
        report(_report_cfg(name="x", fits=("other_split",)), store)
    with pytest.raises(XprobeError, match="partial_at <= present_at"):
        report(_report_cfg(name="x", present_at=0.2), store)


def test_report_from_read_only_zip(pipeline_store, tmp_path):
    """A shared (packed, read-only) store: nothing is cached in it, the files go to out_dir."""
    local = report(_report_cfg(name="zip", n_shown=1), Store(pipeline_store))
    packed = Store(pipeline_store).pack(tmp_path / "store.zip")
    with pytest.raises(XprobeError, match="set out_dir"):
        report(_report_cfg(name="zip", n_shown=1), Store(packed, mode="r"))
    remote = report(
        _report_cfg(name="zip2", n_shown=1, out_dir=str(tmp_path / "out")), Store(packed, mode="r")
    )
    assert remote["chunks_written"] > 0  # the pass ran: there was no cache to read
    a, b = pd.read_parquet(local["table"]), pd.read_parquet(remote["table"])
    pd.testing.assert_frame_equal(a, b)
    assert (tmp_path / "out" / "report.html").exists()


@pytest.fixture(scope="module")
def matched_store(pipeline_store) -> tuple[Path, np.ndarray, np.ndarray]:
    """The pipeline plus B's own SAE and the match of A's SAE against it. B's SAE is A's with its
    features permuted and 10% noise on the encoder, except a quarter of them whose encoder rows are
    redrawn: those A features are still in B (the probes find them) but no longer in B's SAE.
    Returns (store path, permutation, redrawn A features)."""
    from stages.match import MatchConfig
    from stages.match import run as match

    root = pipeline_store.parent
    sae = SAE.load_from_disk(str(root / "sae"), device="cpu")
    n_feat = sae.W_enc.shape[1]
    rng = np.random.default_rng(5)
    perm = rng.permutation(n_feat)
    redrawn = rng.choice(n_feat - 2, n_feat // 4, replace=False)  # not the two dead features
    g = torch.Generator().manual_seed(6)
    with torch.no_grad():
        w_enc = sae.W_enc + 0.1 * sae.W_enc.std() * torch.randn(sae.W_enc.shape, generator=g)
        w_enc[:, redrawn] = sae.W_enc.std() * torch.randn((len(redrawn), w_enc.shape[0])).T
        sae.W_enc[:, perm] = w_enc
        sae.b_enc[perm] = sae.b_enc.clone()
        sae.W_dec[perm] = sae.W_dec.clone()
    sae.save_model(str(root / "sae_b"))
    store = Store(pipeline_store)
    features(
        FeaturesConfig(
            corpus="c",
            model="B",
            sae_path=str(root / "sae_b"),
            name="sae_b",
            device="cpu",
            progress=False,
        ),
        store,
    )
    for name, a, b in (("a-vs-b", "sae", "sae_b"), ("b-vs-a", "sae_b", "sae")):
        match(
            MatchConfig(
                name=name, corpus="c", features_a=a, features_b=b, device="cpu", progress=False
            ),
            store,
        )
    return pipeline_store, perm, redrawn


def test_report_with_sae_match(matched_store):
    from pipeline.report.matches import match_table

    path, perm, redrawn = matched_store
    store = Store(path)
    report(_report_cfg(name="m", n_shown=2), store)
    out = report(_report_cfg(name="m", n_shown=2, matches=("a-vs-b",)), store)
    assert out["chunks_written"] == 0  # naming a match does not redo the cached pass
    df = pd.read_parquet(out["table"])
    expect = match_table(store, "a-vs-b")
    for col in ("best_match", "best_corr", "mutual"):
        np.testing.assert_array_equal(df[f"a-vs-b_{col}"], expect[col])
    # the match itself found B's SAE: the kept features' permuted twins, not the redrawn ones
    kept = np.setdiff1d(np.nonzero(df["count"] >= 20)[0], redrawn)
    assert len(kept) > 20
    assert (df["a-vs-b_best_match"][kept] == perm[kept]).mean() > 0.9
    # agreement counts in the terminal summary, recomputed from the table
    present = (df["B_class"] == "present").to_numpy()
    absent = (df["B_class"] == "absent").to_numpy()
    matched = df["a-vs-b_best_corr"].to_numpy() >= 0.5
    lines = out["message"].splitlines()
    line = lines[lines.index(next(s for s in lines if s.startswith("SAE match a-vs-b vs B "))) + 1]
    counts = {
        "present & matched": present & matched,
        "present & unmatched": present & ~matched,
        "absent & matched": absent & matched,
        "absent & unmatched": absent & ~matched,
    }
    for name, sel in counts.items():
        assert f"{name} {int(sel.sum())}," in line + ",", (name, line)
    # B has the redrawn features (the probes say present) but its SAE does not: disagreements
    assert (present & ~matched)[redrawn].sum() >= 5
    page = Path(out["html"]).read_text()
    assert "<h2>Probes vs SAE matching</h2>" in page
    assert "present by the probe, unmatched" in page and "SAE match a-vs-b: B feature" in page
    assert page.count("data:image/png;base64,") >= 6  # + best-corr histogram and scatter
    assert "compared with fit &#x27;B&#x27; (its SAE was run on B" in page
    # naming the fit explicitly gives the same table; the floor or another SAE's match is refused
    named = report(_report_cfg(name="m", n_shown=0, matches=("a-vs-b:B",)), store)
    pd.testing.assert_frame_equal(pd.read_parquet(named["table"]), df)
    with pytest.raises(XprobeError, match="not one of the report's fits of a model B"):
        report(_report_cfg(name="m", matches=("a-vs-b:random",)), store)


def test_report_refuses_match_of_another_sae(matched_store):
    store = Store(matched_store[0])
    with pytest.raises(XprobeError, match="features_a must be the report's features"):
        report(_report_cfg(name="m2", matches=("b-vs-a",)), store)
    with pytest.raises(
        XprobeError, match='no fit in fits probes it; say which fit .* "a-vs-b:FIT"'
    ):
        report(_report_cfg(name="m2", fits=("random",), floor=None, matches=("a-vs-b",)), store)
    with pytest.raises(XprobeError, match="matches/nope is not in the store"):
        report(_report_cfg(name="m2", matches=("nope",)), store)
    with pytest.raises(XprobeError, match="match_at"):
        report(_report_cfg(name="m2", matches=("a-vs-b",), match_at=0.0), store)


def test_most_present_ranks_by_score_then_headroom():
    """A feature whose unclipped score is 1.11 only because its headroom is 0.06 does not come
    before one at 1.0 with headroom 0.5; among absent ones, the most headroom comes first."""
    from pipeline.report.html import _ranked, _ranked_least

    df = pd.DataFrame(
        {
            "feature": [0, 1, 2, 3, 4],
            "token_r2": [0.30, 0.10, 0.0, 0.2, 0.0],
            "ceiling_r2": [0.362, 0.60, 0.5, 0.3, 0.4],
            "B_presence": [1.0, 1.0, 0.8, 0.0, 0.0],
            "B_presence_raw": [1.11, 1.0, 0.8, -0.2, 0.0],
        }
    )
    assert list(_ranked(df, "B", True)["feature"]) == [1, 0, 2, 4, 3]
    assert list(_ranked_least(df, "B", True)["feature"]) == [4, 3, 2, 1, 0]


def test_most_present_cards_open_with_determined_features():
    """A point score of 1 with the interval [0, 1] (undetermined) ranks after a feature whose
    whole interval is present; the least present likewise go by the interval's upper end."""
    from pipeline.report.html import _ranked, _ranked_least

    df = pd.DataFrame(
        {
            "feature": [0, 1, 2],
            "token_r2": [0.0, 0.0, 0.0],
            "ceiling_r2": [0.5, 0.5, 0.5],
            "B_presence": [1.0, 0.9, 0.0],
            "B_presence_lo": [0.0, 0.8, 0.0],
            "B_presence_hi": [1.0, 1.0, 0.9],
        }
    )
    assert list(_ranked(df, "B", True)["feature"]) == [1, 0, 2]
    assert list(_ranked_least(df, "B", True)["feature"])[:1] == [2]
    df.loc[2, "B_presence_hi"], df.loc[0, "B_presence"] = 1.0, 0.0
    assert list(_ranked_least(df, "B", True)["feature"]) == [0, 2, 1]


def test_contexts_keep_sentencepiece_spaces():
    """A Metaspace (SentencePiece-style) tokenizer drops a token's leading space when the token is
    decoded alone; contexts decode the window's prefixes, so the spaces survive."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from pipeline.report.cards import Contexts

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer, tok.decoder = pre_tokenizers.Metaspace(), decoders.Metaspace()
    text = ["Classifier: Programming Language :: Python"] * 50 + ["naïve café"] * 20
    tok.train_from_iterator(text, trainers.BpeTrainer(vocab_size=120, special_tokens=["<s>"]))
    ids = tok.encode("Classifier: Programming Language naïve").ids
    assert "".join(tok.decode([i]) for i in ids) == "Classifier:ProgrammingLanguagenaïve"
    contexts = Contexts.__new__(Contexts)
    contexts.tok = tok
    pieces = contexts.pieces(ids)
    assert "".join(pieces) == "Classifier: Programming Language naïve"
    assert len(pieces) == len(ids) and " Programming" in pieces


def test_load_table_from_python(pipeline_store, tmp_path):
    import pipeline

    report(_report_cfg(name="api"), Store(pipeline_store))
    report(_report_cfg(name="api_out", out_dir=str(tmp_path)), Store(pipeline_store))
    elsewhere = pipeline.load_table(pipeline_store, "api_out", out_dir=tmp_path)
    pd.testing.assert_frame_equal(elsewhere, pd.read_parquet(tmp_path / "table.parquet"))
    table = pipeline.load_table(pipeline.open_store(pipeline_store), "api")
    expected = pd.read_parquet(pipeline_store / "report/api/table.parquet")
    pd.testing.assert_frame_equal(table, expected)
    with pytest.raises(XprobeError, match="no table for report .nope."):
        pipeline.load_table(pipeline_store, "nope")


def test_token_only_model_has_no_presence():
    """A model B whose residual is a function of the current token alone has presence ≈ 0 on every
    scored feature once the token baseline's per-id means are shrunk (empirical Bayes); with raw
    per-id means, noisy for rare ids, the same B scores above 0 on some features."""
    from pipeline.maths.lstsq import SufficientStats, solve_ridge

    def stats_of(x: np.ndarray, y: np.ndarray) -> SufficientStats:
        stats = SufficientStats(x.shape[1], y.shape[1], torch.device("cpu"), torch.float64)
        rows, cols = np.nonzero(y)
        stats.update(*(torch.from_numpy(a) for a in (x, rows, cols, y[rows, cols])))
        return stats

    rng = np.random.default_rng(0)
    vocab, n_seq, ctx, n_feat = 1500, 300, 32, 60
    p = 1 / (np.arange(vocab) + 5.0)
    ids = rng.choice(vocab, size=n_seq * ctx, p=p / p.sum())  # Zipf-like: many rare ids
    held = np.repeat(rng.random(n_seq) < 0.3, ctx)
    x_b = np.tanh(rng.normal(size=(vocab, 16)) @ rng.normal(size=(16, 64)) / 2)[ids]
    context = rng.normal(size=(len(ids), 8))  # what A has beyond the token
    token_effect = rng.normal(size=(vocab, n_feat)) * rng.uniform(0.3, 1.5, n_feat)
    noise = 0.3 * rng.normal(size=(len(ids), n_feat))
    pre = token_effect[ids] + context @ rng.normal(size=(8, n_feat)) + noise
    y = np.maximum(pre - rng.uniform(1, 3, n_feat), 0)
    x_a = np.hstack([x_b, context])
    fits = {
        name: solve_ridge(stats_of(x[~held], y[~held]), stats_of(x[held], y[held]), [0, 1, 10, 100])
        for name, x in (("B", x_b), ("A", x_a))
    }
    baseline = TokenBaseline(n_feat)
    for split, keep in (("train", ~held), ("held_out", held)):
        rows, cols = np.nonzero(y[keep])
        baseline.update(split, ids[keep], rows, cols, y[keep][rows, cols])
    best = {}
    for shrink in (True, False):
        token_r2 = baseline.r2_held_out(shrink=shrink)
        ceiling_r2 = fits["A"]["r2_held_out"]
        status = feature_status(fits["A"]["status"], ceiling_r2, token_r2, 0.05)
        assert (status == "scored").sum() >= 55
        b = fits["B"]
        best[shrink] = np.nanmax(
            presence(b["r2_held_out"], b["status"], ceiling_r2, token_r2, status)[1]
        )
    assert best[True] < 0.03  # measured 0.004 (at most 0.017 over 6 seeds)
    assert best[False] > 0.05  # measured 0.096


def test_affine_map_baseline(pipeline_store):
    """fit with ``affine_map``: the ridge map B → A at each hook against numpy lstsq on the stored
    training rows, A's SAE read through it on held-out rows against ``sae.encode`` of the mapped
    rows, the linear pre-activation below the least-squares probe on train, A's activations in
    the lineage, and the report's map column at the fit's best hook."""
    from stages.fit import Fit, FitStage

    store = Store(pipeline_store)
    cfg = _fit("Bmap", "B", HOOKS_B, lambdas=(0.0,), affine_map=True)
    assert "affine_map" not in FitStage(_fit("x", "B", HOOKS_B)).identity()  # old fingerprints
    fit(cfg, store)
    lineage = store.info("probes/Bmap")["lineage"]
    assert any(f"acts/c/A/{HOOK}" in str(v) for v in lineage.values())
    assert Fit(cfg, store).dense_units() == [
        *(f"acts/c/B/{h}" for h in HOOKS_B),
        f"acts/c/A/{HOOK}",
    ]
    info = store.info("tokens/c")
    mask = store.array("tokens/c/mask")[:].reshape(-1)
    held = np.repeat(
        held_out_split(store, info["n_seq"], 0.25, 0, split_by="sequence"), info["ctx"]
    )
    train, test = mask & ~held, mask & held
    a = store.array(f"acts/c/A/{HOOK}/x")[:].astype(np.float64)
    y = _dense_features(store)
    sae = SAE.load_from_disk(store.info("feats/c/sae")["config"]["sae_path"], device="cpu")
    for hook in HOOKS_B:
        x = store.array(f"acts/c/B/{hook}/x")[:].astype(np.float64)
        design = np.c_[x[train], np.ones(train.sum())]
        expect = np.linalg.lstsq(design, a[train], rcond=None)[0].T  # [d_A, d_B + 1]
        m = store.array(f"probes/Bmap/{hook}/map_weight")[:]
        c = store.array(f"probes/Bmap/{hook}/map_bias")[:]
        np.testing.assert_allclose(m, expect[:, :-1], rtol=1e-4, atol=1e-4 * np.abs(m).max())
        np.testing.assert_allclose(c, expect[:, -1], rtol=1e-6, atol=1e-6 * np.abs(c).max())
        # held-out: sae.encode of the mapped rows against A's stored features on the same tokens
        with torch.no_grad():
            pred = sae.encode(torch.from_numpy(x[test] @ expect[:, :-1].T + expect[:, -1]).float())
        pred = pred.double().numpy()
        truth = y[test]
        sst = ((truth - truth.mean(0)) ** 2).sum(0)
        got = store.array(f"probes/Bmap/{hook}/map_r2_held_out")[:]
        status = store.array(f"probes/Bmap/{hook}/status")[:]
        ok = (status == STATUS_OK) & (sst > 0)
        assert ok.sum() >= 20 and np.isnan(got[status != STATUS_OK]).all()
        r2 = 1 - ((truth - pred) ** 2).sum(0) / np.where(sst > 0, sst, 1)
        np.testing.assert_allclose(got[ok], r2[ok], rtol=1e-4, atol=1e-4)
        # the least-squares probe is the best linear predictor on train: ≥ the map's linear one
        linear = store.array(f"probes/Bmap/{hook}/map_r2_linear_train")[:]
        probe = store.array(f"probes/Bmap/{hook}/linear_r2_train")[:]
        assert (probe[ok] >= linear[ok] - 1e-9).all()
        # ... against numpy: the StandardSAE's pre-activation (ŷ − b_dec)·W_enc + b_enc
        w_enc, b_enc = sae.W_enc.detach().double().numpy(), sae.b_enc.detach().double().numpy()
        mapped = x[train] @ expect[:, :-1].T + expect[:, -1]
        pre = (mapped - sae.b_dec.detach().double().numpy()) @ w_enc + b_enc
        y_train = y[train]
        sst_train = ((y_train - y_train.mean(0)) ** 2).sum(0)
        r2_pre = 1 - ((y_train - pre) ** 2).sum(0) / np.where(sst_train > 0, sst_train, 1)
        np.testing.assert_allclose(linear[ok], r2_pre[ok], rtol=1e-3)
        assert (probe[ok] - linear[ok]).mean() > 0.01
    # the map's statistics are in the checkpoint: a fit stopped partway resumes to the same bits
    from pipeline.probes import accumulate

    calls = {"n": 0}
    add_chunk = accumulate.add_chunk

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 5:
            raise RuntimeError("stopped")
        return add_chunk(*args, **kwargs)

    resumed = _fit(
        "Bmap2", "B", (HOOK,), lambdas=(0.0,), affine_map=True, checkpoint_every=1, n_bootstrap=0
    )
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(accumulate, "add_chunk", failing)
        with pytest.raises(RuntimeError, match="stopped"):
            fit(resumed, store)
    assert len(load_checkpoint(store, "probes/Bmap2")["consumed"]) == 5
    fit(resumed, store)
    for key in ("map_weight", "map_bias", "map_r2_linear_train", "direction"):  # statistics
        assert np.array_equal(
            store.array(f"probes/Bmap2/{HOOK}/{key}")[:],
            store.array(f"probes/Bmap/{HOOK}/{key}")[:],
            equal_nan=True,
        ), key
    np.testing.assert_allclose(  # scored without replicates here: the same up to summation order
        store.array(f"probes/Bmap2/{HOOK}/map_r2_held_out")[:],
        store.array(f"probes/Bmap/{HOOK}/map_r2_held_out")[:],
        rtol=1e-12,
    )
    shown = _report_cfg(name="map", fits=("Bmap",), n_shown=1, floor=None, encoder_cosine=False)
    out = report(shown, store)
    df = pd.read_parquet(out["table"])
    best = store.array("probes/Bmap/best_hook")[:]
    by_hook = np.stack([store.array(f"probes/Bmap/{h}/map_r2_held_out")[:] for h in HOOKS_B])
    expect = by_hook[best, np.arange(len(best))]
    np.testing.assert_array_equal(df["Bmap_map_r2"].to_numpy(), expect)
    page = Path(out["html"]).read_text()
    assert "R² through the affine map" in page  # on the feature cards
    # the per-layer plot's bars: percentile interval of the per-replicate median over features
    from types import SimpleNamespace

    from pipeline.report.plots import _median_interval

    scored = (df["status"] == "scored").to_numpy()
    fake = SimpleNamespace(n_boot=200, store=store, cfg=SimpleNamespace(confidence=0.9))
    for hook in HOOKS_B:
        values = df[f"Bmap_r2@{hook}"].to_numpy()[scored]
        boot = store.array(f"probes/Bmap/{hook}/r2_held_out_boot")[:][scored].astype(np.float64)
        ok = store.array(f"probes/Bmap/{hook}/status")[:][scored] == STATUS_OK
        boot[~ok] = 0.0
        medians = np.nanmedian(boot, axis=0)
        low, high = _median_interval(fake, "Bmap", hook, scored, values)
        assert (low, high) == tuple(np.percentile(medians, [5, 95]))
        assert low < np.median(values) < high


def test_layout_declares_every_array_of_a_finished_store(pipeline_store):
    """pipeline/store/layout.py's table against what the stages wrote (tokens, activations,
    features, fits with and without the affine map, the report)."""
    import zarr

    from pipeline.store.layout import undeclared

    store = Store(pipeline_store)
    fit(_fit("Blayout", "B", HOOKS_B, lambdas=(0.0,), affine_map=True), store)
    group = zarr.open_group(str(pipeline_store), mode="r")
    paths: list[str] = []
    stack = [("", group)]
    while stack:
        prefix, g = stack.pop()
        for name, member in g.members():
            path = f"{prefix}{name}"
            if isinstance(member, zarr.Array):
                paths.append(path)
            else:
                stack.append((f"{path}/", member))
    assert any(p.startswith("probes/Blayout/") for p in paths)
    assert any(p.endswith("/map_weight") for p in paths)
    assert undeclared(paths) == []


def test_no_ceiling_margin_is_its_own_class_not_an_interval():
    """A B that is exactly A (R²_B = R²_ceiling in every resample: presence 1) where the ceiling
    beats the token baseline in only 90% of the resamples: no interval (lo, hi NaN, informative
    false) and the class "no ceiling margin", never [0, 1] and "undetermined"; where the margin
    holds in every resample: "present" with the interval [1, 1]; B's R² undefined in too many
    resamples (rare firing): no interval either, but "undetermined"."""
    from pipeline.maths.presence import NO_MARGIN, presence_interval

    rng = np.random.default_rng(0)
    n_boot = 200
    ceiling = 0.5 + 0.02 * rng.normal(size=(3, n_boot))
    token = np.full((3, n_boot), 0.1)
    token[0, : n_boot // 10] = 0.9  # 10% of resamples: the ceiling does not beat the token
    r2 = ceiling.copy()
    r2[2, :20] = np.nan  # undefined in 10% of resamples
    scored = np.ones(3, bool)
    low, high, informative, no_margin = presence_interval(r2, ceiling, token, scored, 0.95)
    assert np.isnan(low[[0, 2]]).all() and np.isnan(high[[0, 2]]).all()
    assert low[1] == high[1] == 1.0
    assert informative.tolist() == [False, True, False]
    assert no_margin.tolist() == [True, False, False]
    score = np.ones(3)
    got = classify_interval(score, low, high, 0.7, 0.3, informative, no_margin)
    assert got.tolist() == [NO_MARGIN, "present", "undetermined"]
    # not scored: neither flagged
    _, _, _, none = presence_interval(r2, ceiling, token, np.zeros(3, bool), 0.95)
    assert not none.any()

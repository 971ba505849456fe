"""``xprobe export``: the exported folder loads in sae-lens and encodes as the clipped probes; the
figures it reports match direct computation on the same held-out tokens."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.errors import XprobeError
from pipeline.export.measure import measure
from pipeline.export.run import DIRECT, EXPORTED, export_fit
from pipeline.export.sae import FitSource, read_metadata
from pipeline.store import Store
from stages.activations import ActivationsConfig
from stages.activations import run as activations
from stages.features import FeaturesConfig
from stages.features import run as features
from stages.fit import FitConfig
from stages.fit import run as fit
from tests.helpers import held_out_split, save_standard_sae, save_topk_sae, tokenize_small

HOOK = "blocks.0.hook_resid_post"
NOISE = 0.2  # the noisy copy of A: its weights plus this share of their spread


@pytest.fixture(scope="module")
def store_path(tmp_path_factory, corpus_jsonl, tokenizer_dir, gpt2_dir, llama_dir) -> Path:
    """A (GPT-2) and B (Llama) at layer 0, a ReLU and a TopK SAE on A, fits of B and of A."""
    root = tmp_path_factory.mktemp("export")
    store = Store(root / "store")
    tokenize_small(store, corpus_jsonl, tokenizer_dir, 8000)
    for name, model in (("A", gpt2_dir), ("B", llama_dir)):
        activations(
            ActivationsConfig(
                corpus="c", model=str(model), name=name, hooks=(HOOK,), device="cpu", progress=False
            ),
            store,
        )
    saes = {"relu": save_standard_sae(root / "relu"), "topk": save_topk_sae(root / "topk", k=8)}
    for name, folder in saes.items():
        features(
            FeaturesConfig(
                corpus="c", model="A", sae_path=str(folder), name=name, device="cpu", progress=False
            ),
            store,
        )
    for name, (feats, model) in {
        "b": ("relu", "B"),
        "b_topk": ("topk", "B"),
        "ceiling": ("relu", "A"),
    }.items():
        fit(_fit_config(name, feats, model), store)
    return root / "store"


def _fit_config(name: str, features: str, model: str, **kw) -> FitConfig:
    """A fit at ``HOOK`` with a quarter of the sequences held out (the splits tests check)."""
    base = dict(corpus="c", hooks=(HOOK,), held_out_fraction=0.25, device="cpu", progress=False)
    return FitConfig(name=name, features=features, model=model, **{**base, **kw})


def _probe(store: Store, fit_name: str, key: str) -> np.ndarray:
    return store.array(f"probes/{fit_name}/{HOOK}/{key}")[:]


def _x(store: Store, model: str) -> torch.Tensor:
    return torch.from_numpy(store.array(f"acts/c/{model}/{HOOK}/x")[:].astype(np.float32))


def test_exported_sae_loads_and_encodes_as_clipped_probes(store_path, tmp_path):
    from sae_lens import SAE, StandardSAE
    from safetensors.torch import load_file

    store = Store(store_path, mode="r")
    out = tmp_path / "sae_b"
    summary = export_fit(store, "b", out, min_r2=0.0, decoder="write", eval_tokens=None)
    ok = _probe(store, "b", "status") == 0
    r2 = _probe(store, "b", "r2_held_out")
    ids = np.flatnonzero(ok & (r2 >= 0.0))
    assert summary["n_kept"] == len(ids) > 10

    sae = SAE.load_from_disk(str(out))
    assert isinstance(sae, StandardSAE) and sae.cfg.d_sae == len(ids)
    assert sae.cfg.metadata.hook_name == HOOK
    meta = read_metadata(out)
    assert meta["feature_ids"] == ids.tolist() and meta["fit"] == "b"
    assert meta["sae_a"]["sae_path"].endswith("relu") and meta["model_b_store_name"] == "B"

    x = _x(store, "B")
    direction, intercept = (
        _probe(store, "b", "direction")[ids],
        _probe(store, "b", "intercept")[ids],
    )
    expected = np.maximum(x.numpy() @ direction.T + intercept, 0)
    with torch.no_grad():
        got = sae.encode(x).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())
    write = _probe(store, "b", "write_direction")[ids]
    np.testing.assert_array_equal(sae.W_dec.detach().numpy(), write)

    steering = load_file(str(out / "steering.safetensors"))
    assert steering["feature_ids"].tolist() == ids.tolist()
    np.testing.assert_array_equal(steering["write_direction"].numpy(), write)

    with pytest.raises(XprobeError, match="not empty"):
        export_fit(store, "b", out, min_r2=0.0, eval_tokens=None)
    with pytest.raises(XprobeError, match="cannot tell which report"):
        export_fit(store, "b", tmp_path / "other", eval_tokens=None)


def test_lstsq_decoder_is_joint_least_squares_on_training_tokens(store_path, tmp_path):
    from sae_lens import SAE
    from safetensors.torch import load_file

    store = Store(store_path, mode="r")
    export_fit(store, "b", tmp_path / "sae", min_r2=0.0, decoder="lstsq", eval_tokens=None)
    sae = SAE.load_from_disk(str(tmp_path / "sae"))
    assert read_metadata(tmp_path / "sae")["decoder"] == "lstsq"
    info = store.info("tokens/c")
    held = np.repeat(held_out_split(store, info["n_seq"], 0.25, 0), info["ctx"])
    train = store.array("tokens/c/mask")[:].reshape(-1) & ~held
    x = _x(store, "B")[torch.from_numpy(train)]
    with torch.no_grad():
        a = sae.encode(x).double().numpy()
    design = np.hstack([a, np.ones((len(a), 1))])
    coef, *_ = np.linalg.lstsq(design, x.double().numpy(), rcond=None)
    recon = design @ coef
    got = a @ sae.W_dec.detach().double().numpy() + sae.b_dec.detach().double().numpy()
    np.testing.assert_allclose(got, recon, atol=1e-4 * np.abs(recon).max())
    # the steering vectors stay the per-feature write directions
    ids = np.array(read_metadata(tmp_path / "sae")["feature_ids"])
    steering = load_file(str(tmp_path / "sae" / "steering.safetensors"))
    np.testing.assert_array_equal(
        steering["write_direction"].numpy(), _probe(store, "b", "write_direction")[ids]
    )


def test_topk_sae_exports_as_topk_with_its_k(store_path, tmp_path):
    from sae_lens import SAE, TopKSAE

    store = Store(store_path, mode="r")
    export_fit(store, "b_topk", tmp_path / "sae", min_r2=0.0, eval_tokens=None)
    sae = SAE.load_from_disk(str(tmp_path / "sae"))
    assert isinstance(sae, TopKSAE) and sae.cfg.k == 8
    ids = np.array(read_metadata(tmp_path / "sae")["feature_ids"])
    x = _x(store, "B")[:500]
    pred = x.numpy() @ _probe(store, "b_topk", "direction")[ids].T
    pred += _probe(store, "b_topk", "intercept")[ids]
    top = np.argsort(-pred, axis=1)[:, :8]
    expected = np.zeros_like(pred)
    np.put_along_axis(expected, top, np.maximum(np.take_along_axis(pred, top, 1), 0), 1)
    with torch.no_grad():
        got = sae.encode(x).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.abs(expected).max())


def test_topk_export_keeps_every_feature_as_a_competitor(store_path, tmp_path):
    """The single-layer model of a TopK SAE predicts each feature through A's TopK over all F
    pre-activations: the export keeps every encoder row (the unselected ones as competitors with
    zero decoder rows), so ``encode`` equals the fit's held-out predictions for the selected
    features, and their held-out R² is the fit's, however few are selected."""
    from sae_lens import SAE

    from pipeline.probes.encoder import SaeActivation
    from pipeline.probes.sae_map import SaeThroughMap

    store = Store(store_path, mode="r")
    r2_fit = _probe(store, "b_topk", "r2_held_out")
    ok = _probe(store, "b_topk", "status") == 0
    threshold = float(np.quantile(r2_fit[ok], 0.75))
    export_fit(store, "b_topk", tmp_path / "sae", min_r2=threshold, eval_tokens=None)
    sae = SAE.load_from_disk(str(tmp_path / "sae"))
    meta = read_metadata(tmp_path / "sae")
    selected = np.array(meta["selected"])
    n_feat = len(r2_fit)
    assert meta["feature_ids"] == list(range(n_feat)) and sae.cfg.d_sae == n_feat
    assert 0 < len(selected) < ok.sum() / 2
    others = np.setdiff1d(np.arange(n_feat), selected)
    assert float(sae.W_dec[torch.from_numpy(others)].abs().max()) == 0.0
    ids, mask, rows = _held_out(store)
    x = _x(store, "B")[torch.from_numpy(rows[mask.reshape(-1)])]
    source = FitSource.resolve(store, "b_topk")
    predict = SaeActivation(SaeThroughMap(source.sae_a(), centered=False)).predictor(
        _probe(store, "b_topk", "direction"), _probe(store, "b_topk", "intercept"),
        torch.device("cpu"), torch.float32,
    )
    with torch.no_grad():
        got = sae.encode(x).double().numpy()
        want = predict(x).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())
    y = _dense_held_out_features(store, "topk", rows[mask.reshape(-1)])
    r2 = 1 - ((y - got) ** 2).sum(0) / ((y - y.mean(0)) ** 2).sum(0)
    np.testing.assert_allclose(r2[selected], r2_fit[selected], atol=1e-4)


def _dense_held_out_features(store: Store, features: str, rows: np.ndarray) -> np.ndarray:
    """A's feature activations ``[len(rows), F]`` (dense, float64) at token ``rows``."""
    unit = f"feats/c/{features}"
    idx, val = store.array(f"{unit}/idx")[:][rows], store.array(f"{unit}/val")[:][rows]
    y = np.zeros((len(rows), int(store.info(unit)["n_feat"])))
    r, c = np.nonzero(idx >= 0)
    y[r, idx[r, c]] = val[r, c]
    return y


def _held_out(store: Store) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ids [s, ctx], mask [s, ctx] and rows [s*ctx] of the held-out sequences (fit's split)."""
    info = store.info("tokens/c")
    held = held_out_split(store, info["n_seq"], 0.25, 0)
    ids = store.array("tokens/c/ids")[:][held].astype(np.int64)
    mask = store.array("tokens/c/mask")[:][held].astype(bool)
    rows = (np.flatnonzero(held)[:, None] * info["ctx"] + np.arange(info["ctx"])).reshape(-1)
    return ids, mask, rows


def test_measure_matches_direct_computation(store_path, llama_dir):
    """An SAE that is the identity leaves B unchanged (KL 0, CE clean); CE clean is HF's own
    cross-entropy on the same positions; explained variance and L0 of the export are numpy's."""
    from sae_lens import StandardSAE, StandardSAEConfig
    from transformers import AutoModelForCausalLM

    store = Store(store_path, mode="r")
    source = FitSource.resolve(store, "b")
    d = 64
    identity = StandardSAE(StandardSAEConfig(d_in=d, d_sae=d, apply_b_dec_to_input=False))
    with torch.no_grad():  # relu(x + 4) - 4 = x for |x| < 4 (the test residuals are ~0.25)
        identity.W_enc.copy_(torch.eye(d))
        identity.W_dec.copy_(torch.eye(d))
        identity.b_enc.fill_(4.0)
        identity.b_dec.fill_(-4.0)
    ids_b = np.flatnonzero(_probe(store, "b", "status") == 0)
    exported = StandardSAE(StandardSAEConfig(d_in=d, d_sae=len(ids_b), apply_b_dec_to_input=False))
    with torch.no_grad():
        exported.W_enc.copy_(torch.from_numpy(_probe(store, "b", "direction")[ids_b].T))
        exported.b_enc.copy_(torch.from_numpy(_probe(store, "b", "intercept")[ids_b]).float())
        exported.W_dec.copy_(torch.from_numpy(_probe(store, "b", "write_direction")[ids_b]))
    got = measure(source, {"identity": identity, "exported": exported}, max_tokens=10**9)

    ids, mask, rows = _held_out(store)
    assert got.n_tok == mask.sum()
    assert got.saes["identity"].kl < 1e-9
    assert abs(got.saes["identity"].ce - got.ce_clean) < 1e-6
    assert got.saes["identity"].explained_variance > 1 - 1e-9
    model = AutoModelForCausalLM.from_pretrained(llama_dir, dtype=torch.float32).eval()
    with torch.no_grad():
        logits = model(input_ids=torch.from_numpy(ids)).logits[:, :-1].double()
    scored = torch.from_numpy(mask[:, :-1] & mask[:, 1:])
    ce = torch.nn.functional.cross_entropy(
        logits[scored], torch.from_numpy(ids[:, 1:])[scored], reduction="mean"
    )
    assert got.n_next == int(scored.sum())
    assert abs(got.ce_clean - float(ce)) < 1e-6
    assert got.ce_mean_ablated > got.ce_clean

    x = _x(store, "B").numpy()[rows][mask.reshape(-1)].astype(np.float64)
    with torch.no_grad():
        feats = exported.encode(torch.from_numpy(x).float())
        recon = exported.decode(feats).double().numpy()
    ev = 1 - ((x - recon) ** 2).sum() / ((x - x.mean(0)) ** 2).sum()
    assert abs(got.saes["exported"].explained_variance - ev) < 1e-6
    assert abs(got.saes["exported"].l0 - float((feats != 0).sum()) / len(x)) < 1e-9


def test_ceiling_export_sits_beside_a_s_own_sae(store_path, tmp_path):
    """A → A: the export and A's own SAE are both measured on A (direct transfer = A's SAE)."""
    store = Store(store_path, mode="r")
    summary = export_fit(
        store, "ceiling", tmp_path / "ceiling", min_r2=0.0, decoder="write", eval_tokens=2000
    )
    metrics = summary["metrics"]["saes"]
    assert set(metrics) == {EXPORTED, DIRECT}
    assert "A's own SAE (B is A)" in "\n".join(summary["lines"])
    assert (tmp_path / "ceiling" / "metrics.json").exists()
    # A's own SAE reconstructs A better than the write directions (each a slope alone) do
    assert metrics[DIRECT]["explained_variance"] > metrics[EXPORTED]["explained_variance"]
    # the default decoder, least squares on the encoding, reconstructs better than both here
    # (the test's SAE has a random decoder)
    joint = export_fit(store, "ceiling", tmp_path / "joint", min_r2=0.0, eval_tokens=2000)
    joint_ev = joint["metrics"]["saes"][EXPORTED]["explained_variance"]
    assert joint_ev > max(m["explained_variance"] for m in metrics.values())


def test_causal_agreement_is_one_for_a_s_own_direction_and_contexts_fire(store_path):
    """Ceiling fit (B = A at the SAE's hook): steering B along A's own decoder direction is
    steering A, so the cosine is 1; a random direction of the same norm is not."""
    from pipeline.export.causal import causal_agreement, firing_contexts

    store = Store(store_path, mode="r")
    source = FitSource.resolve(store, "ceiling")
    ok = np.flatnonzero(_probe(store, "ceiling", "status") == 0)
    features = ok[:: max(1, len(ok) // 6)][:6]
    contexts = firing_contexts(source, features, n_contexts=3)
    val = store.array("feats/c/relu/val")[:]
    idx = store.array("feats/c/relu/idx")[:]
    info = store.info("tokens/c")
    held = held_out_split(store, info["n_seq"], 0.25, 0)
    mask = store.array("tokens/c/mask")[:]
    for f, s, p, v in zip(
        contexts.feature, contexts.seq, contexts.pos, contexts.value, strict=True
    ):
        t = s * info["ctx"] + p
        assert held[s] and mask[s, p] and p < info["ctx"] - 1
        assert v == val[t][idx[t] == f][0] > 0

    sae = source.sae_a()
    with torch.no_grad():
        decoder = (sae.W_dec[torch.from_numpy(features)]).numpy()  # StandardSAE: decode is linear
    table = causal_agreement(source, features, n_contexts=3, steer_b=decoder)
    assert len(table) == len(set(contexts.feature.tolist()))
    np.testing.assert_allclose(table["cos_steer"], 1.0, atol=1e-9)
    assert (table["cos_null"] < 0.99).all()
    assert np.isfinite(table[["dloss_probe", "dloss_write", "dloss_random"]].to_numpy()).all()


def test_cli_export_measures_beside_direct_transfer(store_path, tmp_path):
    """``xprobe export`` from the command line: the folder, the table, metrics.json."""
    import json

    from click.testing import CliRunner

    from pipeline.cli import cli

    out = tmp_path / "cli"
    args = [str(store_path), "--fit", "b", "--out", str(out), "--min-r2", "0", "--eval-tokens"]
    causal = ["--causal", "2", "--causal-contexts", "2"]
    result = CliRunner().invoke(cli, ["export", *args, "500", *causal], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "TopK" not in result.output and "ReLU, lstsq decoder" in result.output  # the default
    assert "exported (probes + lstsq decoder)" in result.output
    assert "A's SAE on B (direct transfer)" in result.output  # same d_model and hook
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["saes"]) == {EXPORTED, DIRECT} and metrics["n_tok"] >= 500
    import pandas as pd

    table = pd.read_csv(out / "causal.csv")  # the 2 best probes by held-out R², 2 others
    r2 = _probe(Store(store_path, mode="r"), "b", "r2_held_out")
    top = table.loc[table["group"] == "top", "feature"].to_numpy()
    assert len(table) == 4 and sorted(r2[top]) == sorted(np.sort(r2)[-2:])
    assert "causal agreement" in result.output and (out / "causal.png").stat().st_size > 0


def test_causal_table_recorded_in_the_store_and_shown_by_the_report(store_path, tmp_path):
    """``xprobe export --causal`` on a local store records its table under causal/<fit>; the
    report shows a causal section iff a fit has one, with the numbers of the export's causal.csv,
    and a table recorded before the fit was recomputed only as a stale note."""
    import re
    import shutil

    import pandas as pd
    from click.testing import CliRunner

    from pipeline.cli import cli
    from pipeline.lineage import staleness
    from pipeline.report.causal import causal_unit, group_medians, recorded_causal
    from pipeline.store.verify import verify_store
    from stages.report import ReportConfig
    from stages.report import run as report

    root = tmp_path / "store"
    shutil.copytree(store_path, root)
    shutil.rmtree(root / "causal", ignore_errors=True)  # recorded by the CLI test, if it ran
    cfg = ReportConfig(
        corpus="c", features="relu", fits=("b",), ceiling="ceiling", n_shown=0, progress=False
    )

    def page() -> str:
        return Path(report(cfg, Store(root))["html"]).read_text()

    assert "Causal agreement" not in page()  # no fit has causal results yet

    out = tmp_path / "export"
    args = [str(root), "--fit", "b", "--out", str(out), "--min-r2", "0", "--eval-tokens", "0"]
    result = CliRunner().invoke(
        cli, ["export", *args, "--causal", "2", "--causal-contexts", "2"], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    assert f"recorded in the store as causal/b/{HOOK}" in result.output
    csv = pd.read_csv(out / "causal.csv")
    store = Store(root, mode="r")
    (rec,) = recorded_causal(store, "b")
    assert rec.stale is None and rec.hook == HOOK and rec.settings["n_contexts"] == 2
    pd.testing.assert_frame_equal(rec.table, csv[rec.table.columns.tolist()], check_dtype=False)
    assert staleness(store, causal_unit("b", HOOK)) is None and verify_store(store) == []
    assert recorded_causal(store, "ceiling") == []

    text = page()
    assert text.count("Causal agreement") == 1 and text.count('table class="counts causal"') == 1
    section = text[text.index("<h2>Causal agreement</h2>") :]
    shown = re.findall(r"<tr>((?:<td>[^<]*</td>)+)</tr>", section.split("</table>")[0])
    expected = []
    for label, n, med in group_medians(csv):
        expected.append(
            [label, str(n), f"{med['score']:.2f}", f"{med['cos_steer']:.3f}"]
            + [f"{med['cos_null']:.3f}", f"{med['abs_cos_null']:.3f}", f"{med['z_steer']:.2f}"]
            + [f"{med[k]:.4f}" for k in ("dloss_probe", "dloss_write", "dloss_random")]
        )
    assert [re.findall(r"<td>([^<]*)</td>", row) for row in shown] == expected
    assert len(expected) == 2 and expected[0][0] == "top by score"

    # the fit recomputed to other bytes: the recorded table is stale, shown as a note only
    fit(_fit_config("b", "relu", "B", lambdas=(1e-2, 1.0)), Store(root), force=True)
    store = Store(root, mode="r")
    (rec,) = recorded_causal(store, "b")
    assert rec.stale is not None and "recomputed" in rec.stale
    assert staleness(store, causal_unit("b", HOOK)) is not None
    text = page()
    assert "is stale and not shown" in text and 'table class="counts causal"' not in text

    # the export refuses the stale table before any work; --force measures it again
    again = [*args[:4], str(tmp_path / "again"), *args[5:], "--causal", "2", "--causal-contexts"]
    result = CliRunner().invoke(cli, ["export", *again, "2"])
    assert result.exit_code != 0 and not (tmp_path / "again").exists()
    assert f"causal/b/{HOOK} is stale: probes/b changed" in str(result.exception)
    result = CliRunner().invoke(cli, ["export", *again, "2", "--force"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    (rec,) = recorded_causal(Store(root, mode="r"), "b")
    assert rec.stale is None and 'table class="counts causal"' in page()


def _copy_store(store_path: Path, root: Path) -> Path:
    """A writable copy of the module's store, without the causal tables other tests recorded."""
    import shutil

    shutil.copytree(store_path, root)
    shutil.rmtree(root / "causal", ignore_errors=True)
    return root


def _files(folder: Path) -> dict[str, tuple[int, bytes]]:
    return {
        str(p.relative_to(folder)): (p.stat().st_mtime_ns, p.read_bytes())
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_causal_unit_goes_through_the_lifecycle(store_path, tmp_path, monkeypatch):
    """The causal unit is written by the lifecycle: a run killed while writing it leaves a unit
    that is not complete (the report does not show it) and a rerun recomputes it, to the table
    of an uninterrupted computation; a rerun with the same settings is already complete and
    rewrites nothing; other settings are refused before any work, and --force starts it over."""
    from pipeline import lifecycle
    from pipeline.export.causal_unit import CausalConfig, CausalStage, measure_table
    from pipeline.report.causal import causal_unit, read_table, recorded_causal
    from pipeline.store.layout import undeclared, unit_of
    from pipeline.store.verify import verify_store

    root = _copy_store(store_path, tmp_path / "store")
    unit = causal_unit("b", HOOK)
    args = dict(min_r2=0.0, eval_tokens=None, causal=2, causal_contexts=2)

    real = Store.create_array
    written = []

    def killed(self, path, *a, **k):  # the process dies after three of the unit's arrays
        if path.startswith("causal/"):
            if len(written) == 3:
                raise KeyboardInterrupt
            written.append(path)
        return real(self, path, *a, **k)

    monkeypatch.setattr(Store, "create_array", killed)
    with pytest.raises(KeyboardInterrupt):
        export_fit(Store(root), "b", tmp_path / "killed", **args)
    monkeypatch.setattr(Store, "create_array", real)
    store = Store(root, mode="r")
    assert store.has(f"{unit}/feature") and not store.info(unit).get("complete")
    assert recorded_causal(store, "b") == [] and not (tmp_path / "killed").exists()
    assert not (root / f"{unit}.lock").exists()

    first = export_fit(Store(root), "b", tmp_path / "first", **args)
    assert f"  recorded in the store as {unit} (the report shows it)" in first["lines"]
    store = Store(root, mode="r")
    info = store.info(unit)
    assert info["complete"] and info["stage"] == "export" and verify_store(store) == []
    assert info["config"]["n"] == 2 and info["config"]["score"] == "r2_held_out"
    assert info["lineage"]["fit"]["fingerprint"] == store.info("probes/b")["content_fingerprint"]
    cfg = CausalConfig("b", HOOK, 2, 2, "r2_held_out")
    uninterrupted = measure_table(FitSource.resolve(store, "b"), cfg)
    import pandas as pd

    pd.testing.assert_frame_equal(read_table(store, unit), uninterrupted)
    pd.testing.assert_frame_equal(pd.read_csv(tmp_path / "first" / "causal.csv"), uninterrupted)

    before = _files(root / "causal")
    again = export_fit(Store(root), "b", tmp_path / "again", **args)
    assert any("already recorded (these settings, this fit)" in line for line in again["lines"])
    assert _files(root / "causal") == before
    assert (tmp_path / "again" / "causal.csv").read_bytes() == (
        tmp_path / "first" / "causal.csv"
    ).read_bytes()
    (state,) = lifecycle.plan(CausalStage(cfg), store)
    assert state.state == "complete"

    other = {**args, "causal": 3}
    with pytest.raises(XprobeError, match=r"another config:\n  n: stored 2 != requested 3"):
        export_fit(Store(root), "b", tmp_path / "other", **other)
    assert not (tmp_path / "other").exists() and _files(root / "causal") == before
    forced = export_fit(Store(root), "b", tmp_path / "other", force=True, **other)
    assert f"  recorded in the store as {unit} (the report shows it)" in forced["lines"]
    store = Store(root, mode="r")
    assert store.info(unit)["config"]["n"] == 3 and store.info(unit)["complete"]
    assert len(read_table(store, unit)) > len(uninterrupted)
    assert verify_store(store) == []
    # the layout table declares what the unit holds, and its arrays belong to it
    arrays = [f"{unit}/{name}" for name, _ in store.group(unit).arrays()]
    assert len(arrays) == 12 and undeclared(arrays) == []
    assert {unit_of(a) for a in arrays} == {unit} and [
        u for u, _ in store.units() if "causal" in u
    ] == [unit]


def test_default_export_keeps_what_the_report_counts_present(
    store_path, tmp_path, gpt2_dir, tokenizer_dir
):
    """By default the export keeps the features the report classes present (the whole bootstrap
    interval of presence at or above its present_at), not those with a point score >= 0.7: on a
    store where some features straddle the threshold (B = A with noisy weights), those are left
    out, and the count is the report's; --present-at X keeps the point-score selection, and both
    say which was used."""
    import json

    import pandas as pd
    from click.testing import CliRunner
    from transformers import AutoTokenizer, GPT2LMHeadModel

    from pipeline.cli import cli
    from stages.report import ReportConfig
    from stages.report import run as report

    root = _copy_store(store_path, tmp_path / "store")
    torch.manual_seed(3)
    noisy = GPT2LMHeadModel.from_pretrained(gpt2_dir)
    with torch.no_grad():
        for p in noisy.parameters():
            p.add_(NOISE * p.std() * torch.randn_like(p))
    noisy.eval().save_pretrained(tmp_path / "noisy")
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(tmp_path / "noisy")
    store = Store(root)
    activations(
        ActivationsConfig(
            corpus="c",
            model=str(tmp_path / "noisy"),
            name="N",
            hooks=(HOOK,),
            device="cpu",
            progress=False,
        ),
        store,
    )
    fit(_fit_config("n", "relu", "N"), store)
    cfg = ReportConfig(
        corpus="c", features="relu", fits=("n",), ceiling="ceiling", n_shown=0, progress=False
    )
    summary = report(cfg, store)
    table = pd.read_parquet(summary["table"])
    store = Store(root, mode="r")
    ok = _probe(store, "n", "status") == 0
    point = table["n_presence"].to_numpy()
    low = table["n_presence_lo"].to_numpy()
    with np.errstate(invalid="ignore"):
        whole_interval = ok & (low >= cfg.present_at)  # NaN (no interval) is not present
        straddling = ok & (point >= 0.7) & ~(low >= 0.7)
    assert straddling.sum() > 0 and whole_interval.sum() > 0  # the store shows the difference
    assert (table.loc[straddling, "n_class"] != "present").all()

    (row,) = [line for line in summary["message"].splitlines() if line.split()[:1] == ["n"]]
    reported_present = int(row.split()[1])  # the summary's first class column is "present"
    assert reported_present == whole_interval.sum()

    out = tmp_path / "by_class"
    args = [str(root), "--fit", "n", "--out", str(out), "--eval-tokens", "0"]
    result = CliRunner().invoke(cli, ["export", *args], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    meta = read_metadata(out)
    assert meta["selection"] == {"by": "class", "report": "main", "class": "present"}
    assert meta["feature_ids"] == np.flatnonzero(whole_interval).tolist()
    assert f"export: {reported_present} of " in result.output
    assert "(class 'present' in report 'main')" in result.output

    by_point = export_fit(store, "n", tmp_path / "by_point", present_at=0.7, eval_tokens=500)
    kept = np.flatnonzero(ok & (point >= 0.7))
    assert read_metadata(tmp_path / "by_point")["feature_ids"] == kept.tolist()
    assert by_point["selection"] == {"by": "presence", "report": "main", "present_at": 0.7}
    metrics = json.loads((tmp_path / "by_point" / "metrics.json").read_text())
    assert metrics["selection"] == by_point["selection"]
    assert set(np.flatnonzero(straddling)) <= set(kept)

    for bad, message in (
        (["--present-at", "0.7", "--min-r2", "0"], "give at most one"),
        (["--present-at", "1.5"], "in [0, 1], got 1.5"),
    ):
        result = CliRunner().invoke(cli, ["export", *args[:-2], *bad])
        assert result.exit_code != 0 and message in str(result.exception), result.output

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
        fit(
            FitConfig(
                name=name,
                corpus="c",
                features=feats,
                model=model,
                hooks=(HOOK,),
                held_out_fraction=0.25,
                device="cpu",
                progress=False,
            ),
            store,
        )
    return root / "store"


def _probe(store: Store, fit_name: str, key: str) -> np.ndarray:
    return store.array(f"probes/{fit_name}/{HOOK}/{key}")[:]


def _x(store: Store, model: str) -> torch.Tensor:
    return torch.from_numpy(store.array(f"acts/c/{model}/{HOOK}/x")[:].astype(np.float32))


def test_exported_sae_loads_and_encodes_as_clipped_probes(store_path, tmp_path):
    from sae_lens import SAE, StandardSAE
    from safetensors.torch import load_file

    store = Store(store_path, mode="r")
    out = tmp_path / "sae_b"
    summary = export_fit(store, "b", out, min_r2=0.0, eval_tokens=None)
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
    summary = export_fit(store, "ceiling", tmp_path / "ceiling", min_r2=0.0, eval_tokens=2000)
    metrics = summary["metrics"]["saes"]
    assert set(metrics) == {EXPORTED, DIRECT}
    assert "A's own SAE (B is A)" in "\n".join(summary["lines"])
    assert (tmp_path / "ceiling" / "metrics.json").exists()
    # A's own SAE reconstructs A better than the linear read of its features does
    assert metrics[DIRECT]["explained_variance"] > metrics[EXPORTED]["explained_variance"]


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
    assert "TopK" not in result.output and "ReLU, write decoder" in result.output
    assert "exported (probes + write dirs)" in result.output
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
    assert staleness(store, causal_unit("b")) is None and verify_store(store) == []
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
    fit(
        FitConfig(
            name="b",
            corpus="c",
            features="relu",
            model="B",
            hooks=(HOOK,),
            held_out_fraction=0.25,
            lambdas=(1e-2, 1.0),
            device="cpu",
            progress=False,
        ),
        Store(root),
        force=True,
    )
    store = Store(root, mode="r")
    (rec,) = recorded_causal(store, "b")
    assert rec.stale is not None and "recomputed" in rec.stale
    assert staleness(store, causal_unit("b")) is not None
    text = page()
    assert "is stale and not shown" in text and 'table class="counts causal"' not in text

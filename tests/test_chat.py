"""Chat-formatted corpora: conversations rendered with a named tokenizer's chat template, ids equal
to ``apply_chat_template``, and a token class per position (template, system, user, assistant)."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
from transformers import AutoTokenizer

from pipeline.errors import XprobeError
from pipeline.inputs.vocab import tokenizer_facts
from pipeline.store import Store
from stages.tokenize import TokenizeConfig, run
from tests.helpers import WORDS, save_instruct_variant

HAND_CHECKED = [
    {"role": "system", "content": "You are a probe."},
    {"role": "user", "content": "the model layer"},
    {"role": "assistant", "content": "sparse feature!"},
]


def _conversations(n: int, seed: int = 0) -> list[list[dict[str, str]]]:
    rng = random.Random(seed)
    out = [HAND_CHECKED]
    for _ in range(n - 1):
        turns = [{"role": "system", "content": "Be brief."}] if rng.random() < 0.3 else []
        for _turn in range(rng.randint(1, 3)):
            for role in ("user", "assistant"):
                words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 9)))
                turns.append({"role": role, "content": words.capitalize() + "."})
        out.append(turns)
    return out


@pytest.fixture(scope="module")
def chat_dirs(tmp_path_factory, tokenizer_dir, llama_dir):
    """(base tokenizer that has the template's tokens but no template, B_instruct, conversations)"""
    root = tmp_path_factory.mktemp("chat")
    base = AutoTokenizer.from_pretrained(tokenizer_dir)
    base.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    base.save_pretrained(root / "base_tok")
    b_dir = save_instruct_variant(llama_dir, root / "b_instruct")
    convs = _conversations(30)
    path = root / "chats.jsonl"
    path.write_text(
        "".join(json.dumps({"messages": c, "id": i}) + "\n" for i, c in enumerate(convs))
    )
    return root / "base_tok", b_dir, path, convs


def _tokenize(store, source, tokenizer, template, **kw):
    cfg = dict(
        corpus="chat",
        source=(str(source),),
        tokenizer=str(tokenizer),
        chat_template_from=str(template),
        ctx=64,
        chunk_seqs=4,
        progress=False,
    )
    cfg.update(kw)
    run(TokenizeConfig(**cfg), store)


def test_rendered_ids_equal_apply_chat_template_and_classes_hand_checked(tmp_path, chat_dirs):
    base_tok, b_dir, path, convs = chat_dirs
    store = Store(tmp_path / "s")
    _tokenize(store, path, base_tok, b_dir, packing="document", bos=False)
    ids = store.array("tokens/chat/ids")[:].reshape(-1)
    doc = store.array("tokens/chat/doc")[:].reshape(-1)
    cls = store.array("tokens/chat/token_class")[:].reshape(-1)
    b = AutoTokenizer.from_pretrained(b_dir)
    for k, conv in enumerate(convs):
        expected = b.apply_chat_template(conv, tokenize=True)["input_ids"]
        assert ids[doc == k].tolist() == list(expected)
    assert np.all(cls[doc == -1] == -1)
    info = store.info("tokens/chat")
    assert info["token_classes"] == ["template", "system", "user", "assistant", "other"]
    assert info["lineage"]["chat_template"]["fingerprint"] == tokenizer_facts(b)["chat_template"]
    assert tokenizer_facts(b)["chat_template"] is not None

    # the hand-checked conversation, token by token: what each class holds, in order
    first = ids[doc == 0]
    tokens = b.convert_ids_to_tokens(first.tolist())
    text_of = {c: b.decode([int(i) for i in first[cls[doc == 0] == c]]) for c in range(4)}
    assert text_of[1] == "You are a probe."
    assert text_of[2] == "the model layer"
    assert text_of[3] == "sparse feature!"
    assert text_of[0] == (
        "<|im_start|>system\n<|im_end|>\n<|im_start|>user\n<|im_end|>\n"
        "<|im_start|>assistant\n<|im_end|>\n"
    )
    runs = [int(c) for i, c in enumerate(cls[doc == 0]) if i == 0 or c != cls[doc == 0][i - 1]]
    assert runs == [0, 1, 0, 2, 0, 3, 0]
    assert tokens[0] == "<|im_start|>" and cls[doc == 0][0] == 0


def test_packed_chat_corpus_and_parquet_input(tmp_path, chat_dirs):
    import pyarrow as pa
    import pyarrow.parquet as pq

    base_tok, b_dir, path, convs = chat_dirs
    pq.write_table(pa.table({"messages": convs}), tmp_path / "chats.parquet")
    a, b = Store(tmp_path / "a"), Store(tmp_path / "b")
    _tokenize(a, path, base_tok, b_dir)
    _tokenize(b, tmp_path / "chats.parquet", base_tok, b_dir)
    for name in ("ids", "mask", "token_class"):
        assert np.array_equal(a.array(f"tokens/chat/{name}")[:], b.array(f"tokens/chat/{name}")[:])
    ids, mask = a.array("tokens/chat/ids")[:], a.array("tokens/chat/mask")[:]
    cls = a.array("tokens/chat/token_class")[:]
    assert np.all(cls[:, 0] == 0) and not mask[:, 0].any()  # the prepended BOS: template
    eos = AutoTokenizer.from_pretrained(base_tok).eos_token_id
    assert np.all(cls[(ids == eos) & mask] == 0)  # separators between conversations
    assert np.all(cls[a.array("tokens/chat/doc")[:] == -1] == -1)  # padding
    assert set(np.unique(cls)) == {-1, 0, 1, 2, 3}


def test_template_tokens_missing_from_the_corpus_tokenizer_refused(
    tmp_path, chat_dirs, tokenizer_dir
):
    _, b_dir, path, _ = chat_dirs
    with pytest.raises(XprobeError, match=r"at token 0: \['<\|im_start\|>'\] there"):
        _tokenize(Store(tmp_path / "s"), path, tokenizer_dir, b_dir)
    with pytest.raises(XprobeError, match="has no chat template; set chat_template_from"):
        _tokenize(Store(tmp_path / "t"), path, tokenizer_dir, tokenizer_dir)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"messages": [{"role": "user", "text": "hi"}]}) + "\n")
    with pytest.raises(XprobeError, match=r"bad.jsonl line 1: message 0 is not \{role: text"):
        _tokenize(Store(tmp_path / "u"), bad, tokenizer_dir, b_dir)


def test_fit_scores_each_token_class_like_a_direct_computation(tmp_path, chat_dirs):
    """Per-class held-out R² of the stored probes equals 1 − SSE/SST computed from the stored
    activations, features, held-out split and token classes directly."""
    from stages.activations import ActivationsConfig
    from stages.activations import run as activations
    from stages.features import FeaturesConfig
    from stages.features import run as features
    from stages.fit import FitConfig
    from stages.fit import run as fit
    from tests.helpers import held_out_split, save_standard_sae

    base_tok, b_dir, path, _ = chat_dirs
    store = Store(tmp_path / "s")
    _tokenize(store, path, base_tok, b_dir, ctx=32)
    hook = "blocks.0.hook_resid_post"
    activations(
        ActivationsConfig(
            corpus="chat", model=str(b_dir), name="b", hooks=(hook,), device="cpu", progress=False
        ),
        store,
    )
    sae = save_standard_sae(tmp_path / "sae", bias=-0.5)
    features(
        FeaturesConfig(
            corpus="chat", model="b", sae_path=str(sae), name="f", device="cpu", progress=False
        ),
        store,
    )
    classes = ("assistant", "template", "system")
    cfg = FitConfig(
        name="p",
        corpus="chat",
        features="f",
        model="b",
        hooks=(hook,),
        held_out_fraction=0.4,
        lambdas=(1e-3,),
        min_active=1,
        classes=classes,
        compute_dtype="float64",  # reference-exact statistics (float32 products differ by ~1e-8)
        device="cpu",
        progress=False,
        predictor="linear",  # the per-class R² of the linear probe, from the class statistics
        split_by="sequence",
    )
    fit(cfg, store)

    x = store.array(f"acts/chat/b/{hook}/x")[:].astype(np.float64)
    idx, val = store.array("feats/chat/f/idx")[:], store.array("feats/chat/f/val")[:]
    y = np.zeros((len(x), 256))
    rows = np.repeat(np.arange(len(x)), idx.shape[1])
    keep = idx.reshape(-1) >= 0
    y[rows[keep], idx.reshape(-1)[keep]] = val.reshape(-1)[keep]
    w = store.array(f"probes/p/{hook}/direction")[:].astype(np.float64)
    b = store.array(f"probes/p/{hook}/intercept")[:]
    status = store.array(f"probes/p/{hook}/status")[:]
    info = store.info("tokens/chat")
    held = np.repeat(
        held_out_split(store, info["n_seq"], 0.4, 0, corpus="chat", split_by="sequence"),
        info["ctx"],
    )
    mask = store.array("tokens/chat/mask")[:].reshape(-1)
    cls = store.array("tokens/chat/token_class")[:].reshape(-1)
    summary = store.info("probes/p")["summary"][hook]
    n_checked = 0
    for c in classes:
        sel = held & mask & (cls == ["template", "system", "user", "assistant"].index(c))
        assert sel.sum() > 20 and summary[f"n_tok_held_out_{c}"] == sel.sum()
        pred = x[sel] @ w.T + b
        sst = ((y[sel] - y[sel].mean(0)) ** 2).sum(0)
        with np.errstate(invalid="ignore", divide="ignore"):
            ref = 1 - ((y[sel] - pred) ** 2).sum(0) / sst
        got = store.array(f"probes/p/{hook}/r2_held_out_{c}")[:]
        ok = (status == 0) & (sst > 1e-12)
        n_checked += int(ok.sum())
        np.testing.assert_allclose(got[ok], ref[ok], rtol=1e-6, atol=1e-9)
        assert np.all(np.isnan(got[(status == 0) & (sst == 0)]))
        assert np.all(got[status != 0] == 0)
    assert n_checked > 100
    # the classes differ: the scores are not one number copied three times
    r2 = {c: store.array(f"probes/p/{hook}/r2_held_out_{c}")[:] for c in classes}
    both = (status == 0) & np.isfinite(r2["assistant"]) & np.isfinite(r2["template"])
    assert not np.allclose(r2["assistant"][both], r2["template"][both])

    with pytest.raises(XprobeError, match=r"classes \['bot'\] unknown"):
        fit(FitConfig(**{**cfg.__dict__, "name": "q", "classes": ("bot",)}), store)

    # the report: presence per class = clip(R²_B / R²_ceiling) on that class, in table and summary
    import pandas as pd

    from stages.report import ReportConfig
    from stages.report import run as report

    fit(FitConfig(**{**cfg.__dict__, "name": "p2", "lambdas": (1.0,)}), store)
    out = report(
        ReportConfig(
            corpus="chat",
            features="f",
            fits=("p2",),
            ceiling="p",
            encoder_cosine=False,
            n_shown=1,
            progress=False,
        ),
        store,
    )
    df = pd.read_parquet(out["table"])
    for c in classes:
        ceiling_c = store.array(f"probes/p/{hook}/r2_held_out_{c}")[:]
        b_c = store.array(f"probes/p2/{hook}/r2_held_out_{c}")[:]
        scored = (status == 0) & (ceiling_c >= 0.05) & np.isfinite(b_c)
        expected = np.where(scored, np.clip(b_c / np.where(scored, ceiling_c, 1), 0, 1), np.nan)
        np.testing.assert_allclose(df[f"p2_presence_{c}"].to_numpy(), expected, rtol=1e-12)
        assert np.array_equal(df[f"p2_r2_{c}"].to_numpy(), b_c, equal_nan=True)
        counts = [int((expected >= 0.7).sum()), int(((expected < 0.7) & (expected >= 0.3)).sum())]
        row = next(r for r in out["message"].splitlines() if r.split()[:3] == ["p2", "on", c])
        assert [int(v) for v in row.split()[3:5]] == counts
    lines = out["message"].splitlines()
    at = lines.index("per token class (presence = R²_B / R²_ceiling on its held-out tokens):")
    header = ["present", "partial", "absent", "undetermined", "no", "ceiling", "margin", "unscored"]
    assert lines[at + 1].split() == header
    assert "on raw" not in out["message"]
    assert (df["p2_presence_assistant"] < 1).any()  # λ = 1 loses something: not all present

"""Compatibility by token ids: a chat finetune's tokenizer (other eos, pad, chat template, added
tokens, resized embedding) reads the corpus; a vocabulary that differs on used ids is refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from transformers import AutoModelForCausalLM

from pipeline.cli import cli
from pipeline.errors import XprobeError
from pipeline.inputs.vocab import compare
from pipeline.report.html import _tokenizer_rows
from pipeline.report.model import Role
from pipeline.store import Store
from stages.activations import ActivationsConfig, run
from tests.helpers import save_instruct_variant, swap_vocab_ids, tokenize_small


def _acts(store: Store, model_dir, name: str) -> None:
    run(
        ActivationsConfig(
            corpus="c",
            model=str(model_dir),
            name=name,
            hooks=("blocks.0.hook_resid_post", "blocks.1.hook_resid_pre"),
            dtype="float32",
            device="cpu",
            batch_seqs=4,
            progress=False,
        ),
        store,
    )


def _hidden_states(model_dir, ids: np.ndarray) -> torch.Tensor:
    """hidden_states[1] (= resid_post of block 0) per chunk of 4 sequences, as the stage batches."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    with torch.inference_mode():
        return torch.cat(
            [
                model(b, output_hidden_states=True).hidden_states[1].reshape(-1, 64)
                for b in torch.from_numpy(ids.astype(np.int64)).split(4)
            ]
        )


def test_ids_used_is_the_set_of_stored_ids(tmp_path, corpus_jsonl, tokenizer_dir):
    store = Store(tmp_path / "s")
    tokenize_small(store, corpus_jsonl, tokenizer_dir, max_tokens=300)
    used = store.array("tokens/c/ids_used")[:]
    ids = store.array("tokens/c/ids")[:]
    assert np.array_equal(np.flatnonzero(used), np.unique(ids))
    assert store.info("tokens/c")["n_ids_used"] == len(np.unique(ids)) < len(used) == 600


def test_chat_finetune_tokenizer_accepted_with_differences_recorded(
    tmp_path, corpus_jsonl, tokenizer_dir, llama_dir
):
    b_dir = save_instruct_variant(llama_dir, tmp_path / "b_instruct")
    store = Store(tmp_path / "s")
    tokenize_small(store, corpus_jsonl, tokenizer_dir, max_tokens=300)
    _acts(store, llama_dir, "a")
    _acts(store, b_dir, "b")
    ids = store.array("tokens/c/ids")[:]
    b_ref = _hidden_states(b_dir, ids)
    got = store.array("acts/c/b/blocks.0.hook_resid_post/x")[:]
    assert np.array_equal(got, b_ref.numpy())
    assert np.array_equal(store.array("acts/c/b/blocks.1.hook_resid_pre/x")[:], b_ref.numpy())
    # same weights on every row the corpus uses: B's activations are A's
    assert np.array_equal(got, store.array("acts/c/a/blocks.0.hook_resid_post/x")[:])

    assert store.info("acts/c/a/blocks.0.hook_resid_post")["tokenizer_differences"] == []
    diffs = store.info("acts/c/b/blocks.0.hook_resid_post")["tokenizer_differences"]
    text = "\n".join(diffs)
    assert (
        "eos token: '<|endoftext|>' (id 0) in the corpus tokenizer, '<|im_end|>' (id 601)" in text
    )
    assert "pad token: none in the corpus tokenizer, '<|endoftext|>' (id 0)" in text
    assert "chat template: none in the corpus tokenizer, sha256 " in text
    assert (
        "tokenizer has 2 token(s) the corpus tokenizer lacks: 600 '<|im_start|>', 601 '<|im_end|>'"
        in text
    )
    assert "embedding has 602 rows; the corpus tokenizer has 600 tokens" in text
    assert len(diffs) == 5

    out = CliRunner().invoke(cli, ["info", str(tmp_path / "s")])
    assert out.exit_code == 0, out.output
    assert "  tokenizer differs: eos token: '<|endoftext|>' (id 0)" in out.output
    info = json.loads(CliRunner().invoke(cli, ["info", str(tmp_path / "s"), "--json"]).output)
    assert info["acts/c/b/blocks.0.hook_resid_post"]["tokenizer_differences"] == diffs
    # the report's header row for a fit of B (and none for A, whose tokenizer is the corpus's)
    hooks = ["blocks.0.hook_resid_post"]
    assert _tokenizer_rows(store, "c", Role("b", "fit_b", "b", hooks)) == [
        ("b's tokenizer", "; ".join(diffs))
    ]
    assert _tokenizer_rows(store, "c", Role("ceiling", "fit_a", "a", hooks)) == []


def test_vocabulary_differing_on_used_ids_refused_naming_them(
    tmp_path, corpus_jsonl, tokenizer_dir, llama_dir
):
    store = Store(tmp_path / "s")
    tokenize_small(store, corpus_jsonl, tokenizer_dir, max_tokens=300)
    used = np.flatnonzero(store.array("tokens/c/ids_used")[:])
    unused = np.setdiff1d(np.arange(600), used)
    a, b = int(used[3]), int(used[7])
    with open(tokenizer_dir / "tokenizer.json") as f:
        strings = {i: t for t, i in json.load(f)["model"]["vocab"].items()}

    swapped = swap_vocab_ids(llama_dir, tmp_path / "swapped", a, b)
    with pytest.raises(XprobeError) as e:
        _acts(store, swapped, "bad")
    msg = str(e.value)
    assert (
        f"cannot read tokens/c: 2 of the {len(used)} ids the corpus uses mean other tokens" in msg
    )
    assert (
        f"id {a} is {strings[a]!r} in the corpus tokenizer but {strings[b]!r} in the model's; "
        f"id {b} is {strings[b]!r} in the corpus tokenizer but {strings[a]!r}"
    ) in msg
    assert not store.has("acts")

    # the same swap on two ids the corpus never uses changes nothing B reads: accepted, recorded
    harmless = swap_vocab_ids(llama_dir, tmp_path / "harmless", int(unused[0]), int(unused[1]))
    _acts(store, harmless, "ok")
    diffs = store.info("acts/c/ok/blocks.0.hook_resid_post")["tokenizer_differences"]
    assert diffs == [
        f"2 id(s) the corpus never uses mean other tokens (first: id {unused[0]} "
        f"{strings[int(unused[0])]!r} vs {strings[int(unused[1])]!r})"
    ]

    # a store tokenized before ids_used was recorded: counted from the stored ids, same verdict
    store.delete("tokens/c/ids_used")
    with pytest.raises(XprobeError, match=f"2 of the {len(used)} ids the corpus uses"):
        _acts(store, swapped, "bad")


def test_ids_beyond_the_embedding_refused():
    vocab = {i: f"t{i}" for i in range(10)}
    used = np.zeros(10, bool)
    used[[1, 8, 9]] = True
    facts = {"bos": None, "eos": None, "pad": None, "unk": None, "chat_template": None}
    verdict = compare(vocab, facts, used, vocab, facts, n_embed=8)
    assert verdict.problems == [
        "2 id(s) the corpus uses are beyond the model's embedding of 8 rows (first: 8 't8', 9 't9')"
    ]
    assert compare(vocab, facts, used, vocab, facts, n_embed=10).ok

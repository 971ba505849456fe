"""Conversations rendered with a chat template, and the class of every token they become.

A conversation is a list of messages ``{"role": ..., "content": ...}``. It is rendered to text by
the chat template of a named tokenizer (``chat_template_from``, typically B's: a base A often has
none) and tokenized by the corpus tokenizer; the ids must equal what the template's own tokenizer
gives (``apply_chat_template(..., tokenize=True)``), or A and B would not read the conversation
the same way, so any difference is refused naming the position and both tokens.

Token classes ``[n_tok] int8`` (``TOKEN_CLASSES``): 0 template (role headers, turn markers and
every other token the template adds), then the content of each role: 1 system, 2 user,
3 assistant, 4 any other role (tool, ...). A token is content of a message if it covers at least
one character of that message's content (a token straddling a boundary counts as content), and
template otherwise. Each message's content is located in the rendered text in order, as is or
stripped (templates that ``trim`` it); a template that rewrites content otherwise is refused.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from pipeline.errors import XprobeError

TOKEN_CLASSES = ("template", "system", "user", "assistant", "other")
"""Token class names by value; -1 in the stored array is padding."""

_ROLE_CLASS = {"system": 1, "developer": 1, "user": 2, "assistant": 3}


def class_of_role(role: str) -> int:
    return _ROLE_CLASS.get(role, 4)


def check_messages(value: Any, where: str) -> list[dict[str, str]]:
    """``value`` as a list of ``{role, content}`` messages with text content, or an error naming
    ``where`` (file and line or row)."""
    if not isinstance(value, list | tuple) or not value:
        raise XprobeError(
            f"{where}: a conversation must be a non-empty list of {{role, content}} messages, "
            f"got {type(value).__name__}; set field = the column holding the messages"
        )
    out = []
    for k, m in enumerate(value):
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            raise XprobeError(
                f"{where}: message {k} is not {{role: text, content: text}} ({m!r:.80})"
            )
        out.append({"role": m["role"], "content": m["content"]})
    return out


def template_tokenizer(tok: Any, name: str) -> Any:
    """``tok`` if it has a chat template, else an error saying which tokenizer to name."""
    if not getattr(tok, "chat_template", None):
        raise XprobeError(
            f"tokenizer {name!r} has no chat template; set chat_template_from to a tokenizer that "
            "has one (usually the chat model B's)"
        )
    return tok


def _content_spans(text: str, messages: list[dict[str, str]], where: str) -> list[tuple]:
    """``(start, end, class)`` of each message's content in the rendered ``text``, in order."""
    spans, cursor = [], 0
    for k, m in enumerate(messages):
        content = m["content"]
        for candidate in (content, content.strip()):
            start = text.find(candidate, cursor) if candidate else -1
            if start >= 0:
                break
        if not content.strip():
            continue  # an empty message has no content tokens
        if start < 0:
            raise XprobeError(
                f"{where}: the chat template does not render message {k}'s content as is "
                f"({content[:60]!r}...); xprobe cannot tell its tokens from the template's"
            )
        spans.append((start, start + len(candidate), class_of_role(m["role"])))
        cursor = start + len(candidate)
    return spans


def render_batch(
    conversations: list[list[dict[str, str]]],
    corpus_tok: Any,
    template_tok: Any,
    wheres: list[str],
) -> tuple[list[list[int]], list[np.ndarray]]:
    """Token ids (by the corpus tokenizer) and classes ``[len] int8`` of each conversation
    rendered with ``template_tok``'s chat template; refused where the ids differ from
    ``template_tok.apply_chat_template(conversation, tokenize=True)``."""
    texts = template_tok.apply_chat_template(conversations, tokenize=False)
    reference = template_tok.apply_chat_template(conversations, tokenize=True)["input_ids"]
    enc = corpus_tok(texts, add_special_tokens=False, return_offsets_mapping=True)
    classes = []
    for text, ids, ref, offsets, msgs, where in zip(
        texts,
        enc["input_ids"],
        reference,
        enc["offset_mapping"],
        conversations,
        wheres,
        strict=True,
    ):
        if list(ids) != list(ref):
            pos = next(
                (i for i, (a, b) in enumerate(zip(ids, ref, strict=False)) if a != b),
                min(len(ids), len(ref)),
            )
            mine = corpus_tok.convert_ids_to_tokens(list(ids[pos : pos + 3]))
            theirs = template_tok.convert_ids_to_tokens(list(ref[pos : pos + 1]))
            raise XprobeError(
                f"{where}: the corpus tokenizer reads the rendered conversation differently from "
                f"the chat template's tokenizer at token {pos}: {theirs} there, {mine} here (a "
                "template token the corpus tokenizer lacks?). Tokenize with a tokenizer that has "
                "the template's special tokens (often the base model's already does)"
            )
        cls = np.zeros(len(ids), np.int8)
        starts = np.array([s for s, _ in offsets], np.int64)
        ends = np.array([e for _, e in offsets], np.int64)
        for start, end, c in _content_spans(text, msgs, where):
            cls[(starts < end) & (ends > start) & (ends > starts)] = c
        classes.append(cls)
    return [list(i) for i in enc["input_ids"]], classes

"""Rows -> token ids for a model: chat templates, prompt/response boundaries, loss masks.

Score mode renders a row into ``tokens`` [L] and ``loss_mask`` [L] (True where the student is
trained: the response of a prompt/response pair, the assistant turns of a chat, every position of
plain text). Generate mode renders the prompt only.

* pair: ``tokenizer(prompt)`` (the tokenizer's own special tokens, e.g. BOS) + ``tokenizer(response,
  no specials)`` + EOS. Tokenising the two parts separately makes the prompt/response boundary exact.
* messages: the teacher's chat template renders the whole chat; assistant positions are found by
  rendering each prefix (``messages[:i]`` + generation prompt) and mapping character spans to tokens
  with the fast tokenizer's offsets. A template that is not prefix-consistent is refused.
* text: ``tokenizer(text)``.
"""

from __future__ import annotations

import numpy as np

from kdship.data import Row


class RenderError(ValueError):
    pass


def load_tokenizer(teacher: str):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(teacher)


def render_score(row: Row, tok) -> tuple[np.ndarray, np.ndarray]:
    """tokens int32 [L], loss_mask bool [L] for teacher-forced scoring."""
    if row.kind == "text":
        ids = tok(row.text)["input_ids"]
        return np.asarray(ids, np.int32), np.ones(len(ids), bool)
    if row.kind == "pair":
        p = tok(row.prompt)["input_ids"]
        r = tok(row.response, add_special_tokens=False)["input_ids"]
        if tok.eos_token_id is not None:
            r = r + [tok.eos_token_id]
        ids = p + r
        mask = np.zeros(len(ids), bool)
        mask[len(p) :] = True
        return np.asarray(ids, np.int32), mask
    if row.kind == "messages":
        return _render_chat(row, tok)
    raise RenderError("score mode needs 'response', 'text' or 'messages' (a prompt alone has nothing to score)")


def _apply_template(tok, messages, add_generation_prompt: bool) -> str:
    if not getattr(tok, "chat_template", None):
        raise RenderError("the teacher's tokenizer has no chat template; 'messages' rows cannot be rendered")
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)


def _render_chat(row: Row, tok) -> tuple[np.ndarray, np.ndarray]:
    msgs = row.messages
    full = _apply_template(tok, msgs, False)
    spans = []
    for i, m in enumerate(msgs):
        if m["role"] != "assistant":
            continue
        before = _apply_template(tok, msgs[:i], True) if i else ""
        upto = _apply_template(tok, msgs[: i + 1], False)
        if not full.startswith(upto) or not upto.startswith(before):
            raise RenderError("the chat template is not prefix-consistent; cannot locate assistant turns")
        spans.append((len(before), len(upto)))
    if not spans:
        raise RenderError("score mode needs at least one assistant message to score")
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    ids, offs = enc["input_ids"], enc["offset_mapping"]
    mask = np.zeros(len(ids), bool)
    for j, (a, b) in enumerate(offs):
        mask[j] = any(s <= a < e for s, e in spans)  # a token belongs to the turn it starts in
    return np.asarray(ids, np.int32), mask


def render_prompt(row: Row, tok) -> list[int]:
    """Prompt token ids for generate mode."""
    if row.kind in ("prompt", "pair"):
        return list(tok(row.prompt)["input_ids"])
    if row.kind == "text":
        return list(tok(row.text)["input_ids"])
    if row.kind == "messages":
        msgs = row.messages
        if msgs[-1]["role"] == "assistant":  # the reference answer; the teacher writes its own
            msgs = msgs[:-1]
        if not msgs:
            raise RenderError("messages hold no prompt before the assistant turn")
        return list(tok(_apply_template(tok, msgs, True), add_special_tokens=False)["input_ids"])
    raise RenderError(f"cannot render a {row.kind!r} row as a prompt")


def reference_answer(row: Row) -> str | None:
    """The row's reference answer, for answer-match filters: 'answer' field, response, last assistant turn."""
    if "answer" in row.extra and row.extra["answer"] is not None:
        return str(row.extra["answer"])
    if row.kind == "pair":
        return row.response
    if row.kind == "messages" and row.messages[-1]["role"] == "assistant":
        return row.messages[-1]["content"]
    return None

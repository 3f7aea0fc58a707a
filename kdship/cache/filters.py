"""Filters for ``kdship cache --mode generate`` (black-box / chain-of-thought distillation data).

How the cache calls it (once per input row, after the teacher sampled its N generations)::

    from kdship.cache.filters import filter_generations, FilterError
    result = filter_generations(
        row, generations, texts,            # row: kdship.data.Row or a dict (the JSON row)
        row_index=i,                        # the input row number, copied into every reject
        answer_match=True,                  # --filter answer-match
        min_new_tokens=1, max_new_tokens=None,  # length bounds (generated tokens, inclusive)
        dedupe=True,                        # drop exact duplicates (same token ids) after the first
        require_finished=False,             # reject generations cut off by max_new_tokens
    )
    result.kept          # the kept Generation objects (same order as given)
    result.kept_indices  # their sample numbers j (0..N-1)
    result.rejects       # [{"row": i, "sample": j, "reason": ..., "detail": ..., "text": ...}]
    result.counts        # {"kept": n, "answer_mismatch": n, "too_short": n, ...}

``generations`` are ``kdship.cache.backends.Generation`` objects (or plain token-id lists); ``texts``
their decoded text (needed for answer-match; for the length and duplicate filters it may be None).
The reference answer of a row comes from its ``answer`` / ``final_answer`` / ``reference`` /
``response`` field (or the last assistant message), through ``kdship.answers.extract_answer``
-- the same extractor ``kdship eval`` scores exact match with. A row with no reference answer under
answer-match raises ``FilterError`` naming the row: it is a data problem, not a teacher failure.

Reject reasons: ``answer_mismatch``, ``no_answer`` (the generation has no extractable answer),
``too_short``, ``too_long``, ``unfinished``, ``duplicate``. Checks run in that order, and a
generation gets the first reason that applies.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from kdship.answers import extract_answer

REFERENCE_FIELDS = ("final_answer", "answer", "reference", "response")


class FilterError(ValueError):
    """A row the requested filter cannot be applied to; the message names the row."""


@dataclass
class FilterResult:
    kept: list[Any] = field(default_factory=list)
    kept_indices: list[int] = field(default_factory=list)
    rejects: list[dict[str, Any]] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)


def _fields(row: Any) -> dict[str, Any]:
    if isinstance(row, dict):
        return row
    if hasattr(row, "extra") and hasattr(row, "kind"):  # kdship.data.Row
        f = dict(row.extra or {})
        for name in ("prompt", "response", "text", "messages"):
            if getattr(row, name, None) is not None:
                f[name] = getattr(row, name)
        return f
    for attr in ("raw", "fields", "data"):
        v = getattr(row, attr, None)
        if isinstance(v, dict):
            return v
    if hasattr(row, "__dict__"):
        return dict(vars(row))
    raise FilterError(f"cannot read fields of row object {type(row).__name__}")


def reference_answer(row: Any) -> str | None:
    """The row's reference final answer (normalised), or None when it has none."""
    f = _fields(row)
    for name in REFERENCE_FIELDS:
        v = f.get(name)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            return extract_answer(str(v))
        if isinstance(v, str) and v.strip():
            ans = extract_answer(v)
            if ans is not None:
                return ans
    msgs = f.get("messages")
    if isinstance(msgs, list):
        for m in reversed(msgs):
            if isinstance(m, dict) and m.get("role") == "assistant" and isinstance(m.get("content"), str):
                return extract_answer(m["content"])
    return None


def _token_ids(g: Any) -> list[int]:
    ids = getattr(g, "token_ids", g)
    return [int(t) for t in ids]


def filter_generations(
    row: Any,
    generations: Sequence[Any],
    texts: Sequence[str] | None = None,
    *,
    row_index: int = -1,
    answer_match: bool = False,
    min_new_tokens: int | None = None,
    max_new_tokens: int | None = None,
    dedupe: bool = True,
    require_finished: bool = False,
    text_in_reject: int = 200,
) -> FilterResult:
    """Keep or reject each generation of one row; every reject carries its reason (nothing silent)."""
    if texts is not None and len(texts) != len(generations):
        raise ValueError(f"row {row_index}: {len(generations)} generations but {len(texts)} texts")
    ref = None
    if answer_match:
        if texts is None:
            raise ValueError("answer-match needs the generations' decoded texts")
        ref = reference_answer(row)
        if ref is None:
            raise FilterError(
                f"row {row_index}: --filter answer-match needs a reference answer, but the row has none "
                f"(looked in {', '.join(REFERENCE_FIELDS)} and the last assistant message)"
            )
    res = FilterResult(counts={"kept": 0})
    seen: set[tuple[int, ...]] = set()
    for j, g in enumerate(generations):
        ids = _token_ids(g)
        text = texts[j] if texts is not None else None
        reason, detail = None, None
        if answer_match:
            got = extract_answer(text)
            if got is None:
                reason, detail = "no_answer", f"reference {ref!r}"
            elif got != ref:
                reason, detail = "answer_mismatch", f"got {got!r}, reference {ref!r}"
        if reason is None and min_new_tokens is not None and len(ids) < min_new_tokens:
            reason, detail = "too_short", f"{len(ids)} < {min_new_tokens} tokens"
        if reason is None and max_new_tokens is not None and len(ids) > max_new_tokens:
            reason, detail = "too_long", f"{len(ids)} > {max_new_tokens} tokens"
        if reason is None and require_finished and getattr(g, "finish_reason", "stop") == "length":
            reason, detail = "unfinished", "stopped at max_new_tokens"
        if reason is None and dedupe:
            key = tuple(ids)
            if key in seen:
                reason, detail = "duplicate", "same tokens as an earlier sample of this row"
            seen.add(key)
        if reason is None:
            res.kept.append(g)
            res.kept_indices.append(j)
            res.counts["kept"] += 1
            continue
        res.counts[reason] = res.counts.get(reason, 0) + 1
        rej = {"row": int(row_index), "sample": j, "reason": reason, "detail": detail}
        if text is not None:
            rej["text"] = text[:text_in_reject]
        res.rejects.append(rej)
    return res

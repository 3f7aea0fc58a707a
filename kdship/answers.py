"""Final answers of solution texts (GSM8K style), shared by ``kdship cache --filter answer-match`` and
``kdship eval``'s exact match::

    extract_answer("... so she has 5 + 3 = 8 apples.\\n#### 8")  -> "8"
    answers_equal("8.0", "8")                                   -> True
"""

from __future__ import annotations

import re


_NUMBER = r"-?\$?\s?\d[\d,]*(?:\.\d+)?"
_HASH_RE = re.compile(r"####\s*(.+)")
_ANSWER_IS_RE = re.compile(r"(?:the\s+)?(?:final\s+)?answer\s+is\s*[:=]?\s*(.+)", re.IGNORECASE)
_BOXED_RE = re.compile(r"\\boxed\{([^{}]*)\}")
_NUMBER_RE = re.compile(_NUMBER)


def extract_answer(text: str | None) -> str | None:
    """The final answer of a solution text, or None when there is none.

    Tried in order: ``#### X`` (GSM8K), ``\\boxed{X}``, ``The answer is X``, else the last number in
    the text. For the first three, a number inside the matched tail is preferred over the tail text
    (``#### 42 apples`` -> ``42``); the result is normalised with ``normalize_answer``.
    """
    if not text:
        return None
    for rx in (_HASH_RE, _BOXED_RE):
        m = list(rx.finditer(text))
        if m:
            return _tail_answer(m[-1].group(1))
    m = list(_ANSWER_IS_RE.finditer(text))
    if m:
        return _tail_answer(m[-1].group(1))
    nums = _NUMBER_RE.findall(text)
    if nums:
        return normalize_answer(nums[-1])
    return None


def _tail_answer(tail: str) -> str | None:
    tail = tail.strip().splitlines()[0] if tail.strip() else ""
    num = _NUMBER_RE.search(tail)
    if num:
        return normalize_answer(num.group(0))
    tail = tail.strip().rstrip(".").strip()
    return normalize_answer(tail) if tail else None


def normalize_answer(ans: str | None) -> str | None:
    """Canonical form: numbers without ``$``, thousands commas, ``+`` or trailing ``.0``; text lower-cased."""
    if ans is None:
        return None
    s = ans.strip().strip(".").strip()
    t = s.replace("$", "").replace(",", "").replace(" ", "")
    if re.fullmatch(r"[-+]?\d+(?:\.\d+)?", t):
        if "." in t:
            t = t.rstrip("0").rstrip(".")
        t = t.lstrip("+")
        if t in ("-0", ""):
            t = "0"
        return t
    return " ".join(s.lower().split())


def answers_equal(a: str | None, b: str | None) -> bool:
    na, nb = normalize_answer(a), normalize_answer(b)
    return na is not None and nb is not None and na == nb

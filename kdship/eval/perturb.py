"""Seeded adversarial copies of evaluation inputs: ``typo``, ``swap``, ``distractor``.

Every edit is drawn from ``random.Random(f"{seed}:{kind}:{item}")`` (string seeds hash the same in
every process), so item 17's typo copy is the same whatever the other items are and on every run.

- ``typo``: character edits in ~``rate`` of the words (at least one): swap two adjacent letters,
  delete one, insert one, or replace one by a keyboard neighbour. Words holding a digit are never
  edited (a changed number changes the question's answer, which is not an attack but a new item).
- ``swap``: ~``rate`` of the adjacent word pairs (at least one) exchanged; pairs with a digit kept.
- ``distractor``: one irrelevant sentence (no numbers) inserted at a random sentence boundary.

Only the input side is perturbed (prompt / question / text); answers, options and references stay.
"""

from __future__ import annotations

import random
import re

PERTURBATIONS = ("typo", "swap", "distractor")

DISTRACTORS = (
    "The weather had been mild for most of the week.",
    "A small bird was singing somewhere outside the window.",
    "Nobody remembered who had painted the old fence green.",
    "The library closes early on public holidays.",
    "Her cousin prefers tea to coffee in the morning.",
    "The train station was being repainted that month.",
    "Some people think the river looks nicer in autumn.",
    "The neighbour's dog likes to sleep in the sun.",
)

_KEYBOARD = {
    c: n
    for row in ("qwertyuiop", "asdfghjkl", "zxcvbnm")
    for i, c in enumerate(row)
    for n in [row[max(0, i - 1)] + row[min(len(row) - 1, i + 1)]]
}


def _rng(seed: int, kind: str, item: int) -> random.Random:
    return random.Random(f"{seed}:{kind}:{item}")


def _editable(word: str) -> bool:
    return sum(ch.isalpha() for ch in word) >= 2 and not any(ch.isdigit() for ch in word)


def typo(text: str, rng: random.Random, rate: float = 0.1) -> str:
    """Character-level edits in about ``rate`` of the editable words (at least one if any)."""
    parts = re.split(r"(\s+)", text)
    idx = [i for i, w in enumerate(parts) if w and not w.isspace() and _editable(w)]
    if not idx:
        return text
    n = max(1, round(rate * len(idx)))
    for i in sorted(rng.sample(idx, min(n, len(idx)))):
        parts[i] = _typo_word(parts[i], rng)
    return "".join(parts)


def _typo_word(word: str, rng: random.Random) -> str:
    letters = [j for j, ch in enumerate(word) if ch.isalpha()]
    op = rng.choice(("swap", "delete", "insert", "replace"))
    j = rng.choice(letters)
    if op == "swap":
        pairs = [k for k in letters if k + 1 < len(word) and word[k + 1].isalpha() and word[k] != word[k + 1]]
        if pairs:
            k = rng.choice(pairs)
            return word[:k] + word[k + 1] + word[k] + word[k + 2 :]
        op = "replace"
    if op == "delete":
        return word[:j] + word[j + 1 :]
    if op == "insert":
        return word[:j] + rng.choice("abcdefghijklmnopqrstuvwxyz") + word[j:]
    ch = word[j]
    neigh = _KEYBOARD.get(ch.lower(), "e").replace(ch.lower(), "") or "e"
    new = rng.choice(neigh)
    return word[:j] + (new.upper() if ch.isupper() else new) + word[j + 1 :]


def swap(text: str, rng: random.Random, rate: float = 0.1) -> str:
    """Exchange about ``rate`` of the adjacent word pairs (at least one); digits stay in place."""
    words = text.split(" ")
    pairs = [i for i in range(len(words) - 1) if _editable(words[i]) and _editable(words[i + 1]) and words[i] != words[i + 1]]
    if not pairs:
        return text
    n = max(1, round(rate * len(pairs)))
    used: set[int] = set()
    for i in rng.sample(pairs, len(pairs)):
        if n == 0:
            break
        if i in used or i + 1 in used:
            continue
        words[i], words[i + 1] = words[i + 1], words[i]
        used.update((i, i + 1))
        n -= 1
    return " ".join(words)


def distractor(text: str, rng: random.Random) -> str:
    """Insert one irrelevant sentence at a sentence boundary (before the last sentence if possible)."""
    sentence = rng.choice(DISTRACTORS)
    bounds = [m.end() for m in re.finditer(r"[.!?](\s+)", text)]
    if not bounds:
        return f"{sentence} {text}"
    pos = rng.choice(bounds)
    return text[:pos] + sentence + " " + text[pos:]


def perturb_text(text: str, kind: str, seed: int, item: int, rate: float = 0.1) -> str:
    """The seeded ``kind`` copy of item ``item``'s input text."""
    rng = _rng(seed, kind, item)
    if kind == "typo":
        return typo(text, rng, rate)
    if kind == "swap":
        return swap(text, rng, rate)
    if kind == "distractor":
        return distractor(text, rng)
    raise ValueError(f"unknown perturbation {kind!r}; known: {', '.join(PERTURBATIONS)}")


def parse_perturbations(spec: str | list[str] | tuple[str, ...] | None) -> list[str]:
    """``"typo,swap"`` or a list -> validated names (error names the unknown one)."""
    if not spec:
        return []
    items = spec.split(",") if isinstance(spec, str) else [p for s in spec for p in str(s).split(",")]
    out = []
    for p in (x.strip() for x in items):
        if not p:
            continue
        if p not in PERTURBATIONS:
            raise ValueError(f"--perturb: unknown perturbation {p!r}; known: {', '.join(PERTURBATIONS)}")
        if p not in out:
            out.append(p)
    return out

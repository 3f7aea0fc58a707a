"""Metrics for ``kdship eval``: pure functions on numbers and strings (no torch at import).

Final answers come from ``kdship.answers`` (shared with ``kdship cache --filter answer-match``).

Formulas (N = number of scored tokens, log p natural log):
- perplexity = exp(NLL / N), NLL = -sum_t log p(x_t | x_<t) over the scored (response/text) tokens.
- exact match = 1 if normalise(extract_answer(generation)) == normalise(extract_answer(reference)).
- ROUGE-L (Lin 2004): P = LCS / |candidate|, R = LCS / |reference|, F1 = 2PR / (P + R) on
  lower-cased word tokens; LCS by dynamic programming, O(|c| |r|).
- choice accuracy: argmax over options of sum log p(option tokens | prompt) equals the label.
- retention: ratio = student / teacher for every metric; ``retention`` is oriented so that higher is
  better and 1.0 = the teacher's level: ratio for higher-is-better metrics, teacher / student for
  lower-is-better ones (perplexity, NLL, attack success).
- attack success rate = #(right before and wrong after) / #items (the issue's definition); also
  #(right before and wrong after) / #(right before) (TextAttack's convention, "of_correct").
- top-k KL (teacher from a store): KL between the teacher and the student distributions coarsened to
  k+1 bins (the teacher's top-k ids plus one "rest" bin). It equals the full KL(teacher || student)
  when the top-k holds all the mass and is never larger than it (data-processing inequality).
"""

from __future__ import annotations

import math
import re
from typing import Sequence

import numpy as np

from kdship.answers import extract_answer
from kdship.divergence import topk_rest_kl


def exact_match(generation: str, reference: str) -> float:
    """1.0 when the generation's extracted final answer equals the reference's, else 0.0."""
    ref = extract_answer(reference)
    pred = extract_answer(generation)
    return 1.0 if (ref is not None and pred is not None and ref == pred) else 0.0


# --------------------------------------------------------------------------------------------------
# ROUGE-L

_WORD_RE = re.compile(r"[a-z0-9]+")


def rouge_tokens(text: str) -> list[str]:
    return _WORD_RE.findall(text.lower())


def lcs_length(a: Sequence, b: Sequence) -> int:
    """Length of the longest common subsequence (dynamic programming, two rows)."""
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0] * (len(b) + 1)
        for j, y in enumerate(b, 1):
            cur[j] = prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1])
        prev = cur
    return prev[-1]


def repeated_ngram_share(text: str, n: int = 4) -> float:
    """Share of the word n-grams of ``text`` that already occurred earlier in it: 0 without repetition,
    near 1 for a loop of one phrase. A degenerate loop is easy for a teacher to predict from its own
    context, so the teacher's NLL of a generation needs this beside it."""
    words = text.split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    if not grams:
        return 0.0
    seen: set = set()
    repeated = 0
    for g in grams:
        repeated += g in seen
        seen.add(g)
    return repeated / len(grams)


def rouge_l(candidate: str, reference: str) -> dict[str, float]:
    """ROUGE-L precision, recall and F1 of one candidate against one reference (word level)."""
    c, r = rouge_tokens(candidate), rouge_tokens(reference)
    lcs = lcs_length(c, r)
    p = lcs / len(c) if c else 0.0
    rec = lcs / len(r) if r else 0.0
    f = 2 * p * rec / (p + rec) if p + rec > 0 else 0.0
    return {"precision": p, "recall": rec, "f1": f}


def rouge_l_multi(candidate: str, references: Sequence[str]) -> dict[str, float]:
    """Best F1 over several references (the usual multi-reference convention)."""
    scores = [rouge_l(candidate, r) for r in references]
    return max(scores, key=lambda s: s["f1"]) if scores else {"precision": 0.0, "recall": 0.0, "f1": 0.0}


# --------------------------------------------------------------------------------------------------
# Language modelling


def perplexity(nll_sum: float, n_tokens: int) -> float:
    """exp(NLL / N); inf for N = 0 is refused (a split with no scored token is an input error)."""
    if n_tokens <= 0:
        raise ValueError("perplexity over zero tokens")
    return float(math.exp(nll_sum / n_tokens))


def token_logprobs(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """log softmax(logits)[t, targets[t]] for logits [T, V] (float64 for exactness)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    logz = np.log(np.exp(z).sum(axis=-1))
    return z[np.arange(len(targets)), targets] - logz


def topk_kl(teacher_ids: np.ndarray, teacher_logprobs: np.ndarray, student_logprobs: np.ndarray) -> np.ndarray:
    """Per-row KL(teacher || student) on the teacher's top-k plus one "rest" bin.

    teacher_ids [T, K] int (-1 = padding), teacher_logprobs [T, K] (-inf padding), student_logprobs
    [T, V] full log-softmax. Returns [T] float64:
    sum_i p_i (log p_i - log q_i) + p_rest (log p_rest - log q_rest), p_rest = 1 - sum_i p_i.
    """
    ids = np.asarray(teacher_ids)
    lq = np.take_along_axis(np.asarray(student_logprobs, dtype=np.float64), np.where(ids >= 0, ids, 0), axis=-1)
    return topk_rest_kl(ids, teacher_logprobs, lq)


def full_kl(teacher_logprobs: np.ndarray, student_logprobs: np.ndarray) -> np.ndarray:
    """Per-row KL(teacher || student) = sum_v p_v (log p_v - log q_v) for [T, V] log-softmaxes."""
    lp = np.asarray(teacher_logprobs, dtype=np.float64)
    lq = np.asarray(student_logprobs, dtype=np.float64)
    return (np.exp(lp) * (lp - lq)).sum(-1)


# --------------------------------------------------------------------------------------------------
# Choices


def choice_prediction(option_logprobs: Sequence[float], option_lengths: Sequence[int] | None = None) -> int:
    """Index of the best option by total log-likelihood, or per unit of length when lengths given."""
    scores = np.asarray(option_logprobs, dtype=np.float64)
    if option_lengths is not None:
        scores = scores / np.maximum(np.asarray(option_lengths, dtype=np.float64), 1.0)
    return int(np.argmax(scores))


def accuracy(predictions: Sequence[int], labels: Sequence[int]) -> float:
    if len(predictions) != len(labels) or not labels:
        raise ValueError("accuracy needs equally many predictions and labels, at least one")
    return float(np.mean([int(p == y) for p, y in zip(predictions, labels)]))


# --------------------------------------------------------------------------------------------------
# Retention and robustness

# Direction of every metric name kdship eval writes (True = higher is better).
HIGHER_IS_BETTER: dict[str, bool] = {
    "perplexity": False,
    "nll": False,
    "kl_to_teacher": False,
    "exact_match": True,
    "accuracy": True,
    "accuracy_norm": True,
    "rouge_l_f1": True,
    "rouge_l_precision": True,
    "rouge_l_recall": True,
    "attack_success_rate": False,
    "attack_success_rate_of_correct": False,
    "answer_found": True,
    "teacher_nll": False,  # the teacher's NLL per token of the model's own greedy generations
    "rouge_l_f1_vs_teacher": True,
    "repeated_4gram_share": False,
}


def retention(student: float | None, teacher: float | None, higher_is_better: bool) -> dict[str, float | None]:
    """{"ratio": student / teacher, "retention": oriented ratio (higher = better, 1 = teacher's level)}.

    ``None`` where undefined (a zero or missing teacher value): a ratio to 0 means nothing.
    """
    if student is None or teacher is None or not math.isfinite(student) or not math.isfinite(teacher):
        return {"ratio": None, "retention": None}
    ratio = student / teacher if teacher != 0 else None
    if higher_is_better:
        ret = ratio
    else:
        ret = teacher / student if student != 0 else None
    return {"ratio": ratio, "retention": ret}


def attack_success(correct_before: Sequence[bool], correct_after: Sequence[bool]) -> dict[str, float | int | None]:
    """Share of items right before the perturbation and wrong after it.

    Returns ``attack_success_rate`` = flipped / items, ``attack_success_rate_of_correct`` = flipped /
    right-before (None when nothing was right), the counts, and ``fixed`` (wrong before, right after).
    """
    if len(correct_before) != len(correct_after):
        raise ValueError(f"attack_success: {len(correct_before)} items before, {len(correct_after)} after")
    n = len(correct_before)
    flipped = sum(1 for b, a in zip(correct_before, correct_after) if b and not a)
    fixed = sum(1 for b, a in zip(correct_before, correct_after) if (not b) and a)
    right = sum(1 for b in correct_before if b)
    return {
        "items": n,
        "right_before": right,
        "flipped": flipped,
        "fixed": fixed,
        "attack_success_rate": flipped / n if n else None,
        "attack_success_rate_of_correct": flipped / right if right else None,
    }

"""The held-out "top-k + rest" KL, one definition for train's logs, export's verification and eval.

With the teacher's stored ids i (id -1 = padding) and one "rest" category for everything else::

    KL_k(p || q) = sum_i p_i (log p_i - log q_i) + p_rest (log p_rest - log q_rest),
    p_rest = 1 - sum_i p_i,  q_rest = 1 - sum_i q_i

It is the KL between p and q coarsened to the stored ids + rest: equal to the full KL(p || q) when
the ids hold all the mass and never larger (data-processing inequality). A teacher rest mass below
``REST_EPS`` is rounding in the stored logprobs, not a category; the student's rest is floored at
``Q_REST_FLOOR`` (a student that puts everything on the stored ids still gets a finite value).
"""

from __future__ import annotations

import numpy as np

REST_EPS = 1e-6
Q_REST_FLOOR = 1e-12


def topk_rest_kl(teacher_ids: np.ndarray, teacher_logprobs: np.ndarray, student_logprobs_at_ids: np.ndarray) -> np.ndarray:
    """Per-row KL_k [N] (float64). teacher_ids [N, K] int (-1 = padding), teacher_logprobs [N, K], and
    the student's log-probs at the same ids [N, K] (normalised over its full vocabulary)."""
    valid = np.asarray(teacher_ids) >= 0
    t = np.where(valid, np.asarray(teacher_logprobs, dtype=np.float64), -np.inf)
    s = np.where(valid, np.asarray(student_logprobs_at_ids, dtype=np.float64), -np.inf)
    p = np.exp(t)
    head = np.where(valid & (p > 0), p * (np.where(valid, t, 0.0) - np.where(valid, s, 0.0)), 0.0).sum(-1)
    p_rest = np.clip(1.0 - p.sum(-1), 0.0, 1.0)
    q_rest = np.clip(1.0 - np.exp(s).sum(-1), Q_REST_FLOOR, 1.0)
    rest = np.where(p_rest > REST_EPS, p_rest * (np.log(np.maximum(p_rest, 1e-300)) - np.log(q_rest)), 0.0)
    return head + rest

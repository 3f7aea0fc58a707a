"""Sparse targets drawn from a teacher's distribution at cache time (``--targets headtail | sampled``).

Both take, per row, the teacher's candidate distribution -- ids and raw logprobs sorted descending, the
whole vocabulary with ``--backend hf``, the top-K' with vLLM (``--sampled-candidates``) -- and an
``np.random.Generator`` seeded per (input row, sample), so a redone shard is bit-identical.

headtail (the default; cache/FORMAT.md)::

    E   = top-h ids  U  {data token}          exact entries (their logprobs are stored)
    R   = 1 - sum_{v in E} p_v                the rest mass, from the exact logprobs (float64)
    r_v = p_v / R  for v outside E            the residual distribution
    x_1..x_N ~ r  (systematic sampling)       stored as distinct ids + counts

    sum_v p_v f(v) = sum_{v in E} p_v f(v) + R * E_r[f]  ~=  sum_{E} p_v f(v) + R/N * sum_n f(x_n)

exact over E, unbiased over the tail for any f (every divergence's per-token term, its gradient too).
The N draws are *systematic* (one uniform u, points (u + n) / N on the residual's cdf): each token's
expected count is still N r_v (unbiased), but a token with r_v >= 1/N is drawn floor(N r_v) or
ceil(N r_v) times, never 0, so the estimate's variance is far below i.i.d. draws' at the same bytes.
``certain_exact``: a residual token the draws would hit whatever u (n r_v >= 1 for the n draws left)
joins E instead, one draw fewer, largest first while that holds, >= 1 draw kept: E is fixed before u
is drawn, so the estimate stays unbiased, and the largest residual tokens lose their count rounding.
With vLLM the draws come from the candidates beyond E: the residual mass B outside the top-K' can
never be drawn. It is stored per row (``beyond_logmass``) and the draws stand for R - B only; the
trainer gives B to one "beyond" bucket (the student's mass outside the row's stored ids), so the
student is not taught that the far tail is empty (``kdship cache`` reports B's mean).

``draw_logprobs=False`` (``--no-draw-logprobs``): only the exact entries' logprobs are kept, packed
left in row order. fkl's gradient needs none of the draws' (its estimate is (R/N) sum_n -grad log q(x_n)),
so a store for fkl (and CE) spends those bytes on more draws; every other divergence needs p at the
draws and refuses such a store.

sampled (v1, arXiv:2503.16870): N draws from the whole (candidate) distribution, weights count/N.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kdship.store import exact_entries_width


@dataclass(frozen=True)
class TargetSpec:
    """What each row of a store holds: the kind, k (headtail: the exact head h; topk: k; sampled: the
    draws) and headtail's draw options (``kdship cache --draws / --certain-exact / --draw-logprobs /
    --draw-power``)."""

    kind: str
    top_k: int
    draws: int = 8
    certain_exact: bool = False
    draw_logprobs: bool = True
    draw_power: float = 1.0
    far_oversample: int = 1  # > 1: the last share of the residual gets ``far_draws`` of the draws (stratified)
    far_draws: int = 2


def far_share(n_draws: int, far_draws: int, oversample: int) -> float:
    """The share phi of the residual mass (its cdf's last phi) whose ``far_draws`` draws each count 1 when
    the other n - f count ``oversample``: phi = f / (f + k (n - f)), so every hit's weight count / sum(counts)
    is its stratum's mass over its draws, and the far stratum is drawn k times as densely."""
    return far_draws / (far_draws + oversample * (n_draws - far_draws))


def _draw_stratified(cdf: np.ndarray, n: int, far_draws: int, oversample: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Systematic draws in two strata of the cdf: n - f points on its first 1 - phi, f on its last phi
    (``far_share``), each with its own uniform offset. Returns (columns, counts): a near hit counts
    ``oversample``, a far hit 1, so count / sum(counts) is the hit's stratum mass / its draws (unbiased)."""
    phi = far_share(n, far_draws, oversample)
    total = cdf[-1]
    near = (rng.random() + np.arange(n - far_draws)) / (n - far_draws) * (1.0 - phi)
    far = (1.0 - phi) + (rng.random() + np.arange(far_draws)) / far_draws * phi
    cols = np.minimum(np.searchsorted(cdf, np.concatenate([near, far]) * total, side="right"), len(cdf) - 1)
    w = np.concatenate([np.full(n - far_draws, oversample), np.ones(far_draws, np.int64)])
    u = np.unique(cols)
    return u, np.bincount(np.searchsorted(u, cols), weights=w, minlength=len(u)).astype(np.int64)


def _draw_systematic(cdf: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """n column indices by systematic sampling: points (u + i) / n, u ~ U[0, 1), on the normalised cdf.
    Column c is hit floor or ceil of n * p_c times (expectation exactly n * p_c)."""
    u = (rng.random() + np.arange(n)) / n * cdf[-1]
    return np.minimum(np.searchsorted(cdf, u, side="right"), len(cdf) - 1)


def draw_headtail_targets(
    ids: np.ndarray,
    lps: np.ndarray,
    tokens: np.ndarray,
    token_lp: np.ndarray,
    head: int,
    n_draws: int,
    rng: np.random.Generator,
    certain_exact: bool = False,
    draw_logprobs: bool = True,
    draw_power: float = 1.0,
    far_oversample: int = 1,
    far_draws: int = 2,
) -> dict[str, np.ndarray]:
    """Headtail targets for the rows of one sequence.

    ids, lps: [L, Kc] candidates, sorted descending (id -1 / -inf padding), Kc >= head.
    tokens: [L] the data token of each row (the token the row predicts, tokens[j]); token_lp: [L] its
    raw teacher logprob (NaN where the backend had none: then it must be among the candidates).
    Returns the store's headtail arrays for these rows (``target_ids`` [L, head + n_draws] ascending
    with -1 padding, ``target_logprobs``, ``target_counts`` uint8, ``token_logprob`` [L],
    ``rest_logmass`` [L], ``beyond_logmass`` [L]: log of the residual mass outside the candidates,
    never drawn, -inf when there is none; ``token_logprob`` is 0 where the token is in the head) and
    ``missing_mass`` [L]: that mass itself (float64, for the run's summary).
    Rows without candidates (row 0, unscored prompt rows) are all padding.
    ``certain_exact``: residual tokens the systematic draws would hit whatever u (n * r_v >= 1 for the n
    draws left) are stored exact instead, one draw fewer each, largest first, keeping >= 1 draw for
    the rest (module doc).
    ``draw_logprobs=False``: ``target_logprobs`` is [L, head] (+ n_draws - 1 with ``certain_exact``) and
    holds the exact entries' logprobs only, in their row order, 0 padding.
    ``draw_power`` a != 1: the draws come from g_v proportional to r_v ** a instead of r (a < 1: flatter,
    more of them in the far tail); the reader weighs a draw by count * p ** (1 - a), normalised to the
    row's R - B (self-normalised importance sampling: consistent, biased by O(1/N); experimental).
    ``far_oversample`` k > 1 (experimental): stratified draws, ``far_draws`` of them on the residual cdf's
    last share phi (``far_share``), the rest on the first 1 - phi; a near hit counts k, a far hit 1, so the
    reader's weights (R - B) * count / sum(counts) stay unbiased with no change (``_draw_stratified``).
    """
    if not 1 <= n_draws <= 255:
        raise ValueError(f"draws {n_draws}: must be in 1..255 (counts are uint8)")
    if far_oversample > 1 and not (1 <= far_draws < n_draws and far_oversample * (n_draws - far_draws) + far_draws <= 255 and not certain_exact):
        raise ValueError(f"far draws {far_draws} x oversample {far_oversample} of {n_draws}: need 1 <= far draws < draws, "
                         "counts summing to <= 255, and no certain_exact")
    L, kc = ids.shape
    width = head + n_draws
    out_i = np.full((L, width), -1, np.int32)
    out_l = np.zeros((L, width), np.float32)
    out_c = np.zeros((L, width), np.uint8)
    out_tok = np.zeros(L, np.float32)
    out_rest = np.full(L, -np.inf, np.float32)
    out_beyond = np.full(L, -np.inf, np.float32)
    missing = np.zeros(L, np.float64)
    h = min(head, kc)
    for r in np.flatnonzero(ids[:, 0] >= 0):
        row_ids, row_lp = ids[r], lps[r].astype(np.float64)
        ok = row_ids >= 0
        tok = int(tokens[r])
        tok_lp = float(token_lp[r]) if np.isfinite(token_lp[r]) else np.nan
        where_tok = np.flatnonzero(row_ids == tok)
        if np.isnan(tok_lp):
            if not len(where_tok):
                raise ValueError(f"row {r}: the data token {tok}'s teacher logprob is unknown and it is not among the {kc} candidates")
            tok_lp = float(row_lp[where_tok[0]])
        head_cols = np.flatnonzero(ok[:h])
        tok_in_head = bool(len(where_tok)) and where_tok[0] < h
        p_exact = np.exp(row_lp[head_cols]).sum() + (0.0 if tok_in_head else np.exp(tok_lp))
        rest = max(0.0, 1.0 - p_exact)
        resid = ok.copy()
        resid[:h] = False
        if len(where_tok):
            resid[where_tok[0]] = False
        cols = np.flatnonzero(resid)  # still sorted descending
        p_res = np.exp(row_lp[cols])
        covered = float(p_res.sum())
        missing[r] = max(0.0, rest - covered)
        g_res = p_res if draw_power == 1.0 else np.exp(draw_power * row_lp[cols])  # the proposal, unnormalised
        n_left, n_sure = n_draws, 0
        if certain_exact and rest > 0:
            left = float(g_res.sum())
            while n_sure < len(cols) - 1 and n_left > 1 and n_left * g_res[n_sure] >= left:
                left -= g_res[n_sure]
                n_left -= 1
                n_sure += 1
        exact_cols = np.concatenate([head_cols, cols[:n_sure]])
        if n_sure:  # the rest mass is now what lies outside the head, the data token and these
            p_exact += float(p_res[:n_sure].sum())
            rest = max(0.0, 1.0 - p_exact)
            cols, p_res, g_res = cols[n_sure:], p_res[n_sure:], g_res[n_sure:]
            covered = float(p_res.sum())
        sel_ids = [row_ids[exact_cols]]
        sel_lp = [row_lp[exact_cols]]
        sel_c = [np.zeros(len(exact_cols), np.int64)]
        if rest > 0 and covered > 0:
            if far_oversample > 1:
                u, c = _draw_stratified(np.cumsum(g_res), n_left, far_draws, far_oversample, rng)
            else:
                u, c = np.unique(_draw_systematic(np.cumsum(g_res), n_left, rng), return_counts=True)
            sel_ids.append(row_ids[cols[u]])
            sel_lp.append(row_lp[cols[u]])
            sel_c.append(c)
        all_ids = np.concatenate(sel_ids)
        order = np.argsort(all_ids, kind="stable")
        m = len(order)
        out_i[r, :m] = all_ids[order]
        out_l[r, :m] = np.concatenate(sel_lp)[order]
        out_c[r, :m] = np.concatenate(sel_c)[order]
        if not draw_logprobs:  # the exact entries' logprobs, in their (ascending id) order
            kept = out_l[r, :m][out_c[r, :m] == 0].copy()
            out_l[r] = 0.0
            out_l[r, : len(kept)] = kept
        out_tok[r] = 0.0 if tok_in_head else tok_lp  # in the head: its logprob is stored there
        out_rest[r] = np.log(rest) if rest > 0 else -np.inf
        out_beyond[r] = np.log(missing[r]) if missing[r] > 0 else -np.inf
    if not draw_logprobs:
        out_l = np.ascontiguousarray(out_l[:, : exact_entries_width(head, n_draws, certain_exact)])
    return {"target_ids": out_i, "target_logprobs": out_l, "target_counts": out_c, "token_logprob": out_tok, "rest_logmass": out_rest,
            "beyond_logmass": out_beyond, "missing_mass": missing}


def draw_sampled_targets(ids: np.ndarray, lps: np.ndarray, n_draws: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Random-sampling KD targets for rows of candidate distributions.

    ids, lps: [L, Kc] candidates (id -1 / -inf padding), the teacher's raw log-probs.
    Draws ``n_draws`` tokens per row from softmax over the candidates (renormalised; exact when the
    candidates are the whole vocabulary). Returns ([L, N] distinct ids sorted by count then logprob,
    [L, N] their teacher logprobs, [L, N] float32 weights count/N); rows without candidates stay -1.
    """
    L = ids.shape[0]
    out_i = np.full((L, n_draws), -1, np.int32)
    out_l = np.full((L, n_draws), -np.inf, np.float32)
    out_w = np.zeros((L, n_draws), np.float32)
    valid = ids[:, 0] >= 0
    if not valid.any():
        return out_i, out_l, out_w
    lp = lps[valid].astype(np.float64)
    p = np.exp(lp - lp.max(axis=1, keepdims=True))
    p[~np.isfinite(lp)] = 0.0
    cdf = np.cumsum(p, axis=1)
    cdf /= cdf[:, -1:]
    u = rng.random((lp.shape[0], n_draws))
    picks = np.empty((lp.shape[0], n_draws), np.int64)
    for r in range(lp.shape[0]):
        picks[r] = np.minimum(np.searchsorted(cdf[r], u[r], side="right"), lp.shape[1] - 1)
    rows = np.flatnonzero(valid)
    for r, row in enumerate(rows):
        cols, counts = np.unique(picks[r], return_counts=True)
        order = np.lexsort((-lps[row, cols], -counts))
        cols, counts = cols[order], counts[order]
        m = len(cols)
        out_i[row, :m] = ids[row, cols]
        out_l[row, :m] = lps[row, cols]
        out_w[row, :m] = counts / n_draws
    return out_i, out_l, out_w

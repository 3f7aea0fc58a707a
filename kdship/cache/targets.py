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

import math
import threading
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
    Computed over blocks of rows at once (``_headtail_vectorised``), bit-identical to the per-row definition
    (``_headtail_rows``, which ``certain_exact`` keeps), random numbers included.
    """
    if not 1 <= n_draws <= 255:
        raise ValueError(f"draws {n_draws}: must be in 1..255 (counts are uint8)")
    if far_oversample > 1 and not (1 <= far_draws < n_draws and far_oversample * (n_draws - far_draws) + far_draws <= 255 and not certain_exact):
        raise ValueError(f"far draws {far_draws} x oversample {far_oversample} of {n_draws}: need 1 <= far draws < draws, "
                         "counts summing to <= 255, and no certain_exact")
    if certain_exact:  # its while loop depends on each row's data: one row at a time
        return _headtail_rows(ids, lps, tokens, token_lp, head, n_draws, rng, certain_exact, draw_logprobs, draw_power, far_oversample, far_draws)
    return _headtail_vectorised(ids, lps, tokens, token_lp, head, n_draws, rng, draw_logprobs, draw_power, far_oversample, far_draws)


def _headtail_rows(ids, lps, tokens, token_lp, head, n_draws, rng, certain_exact, draw_logprobs, draw_power, far_oversample, far_draws):
    """``draw_headtail_targets`` one row at a time: the definition, and the path for ``certain_exact``,
    whose while loop depends on each row's data."""
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


# The vectorised draws (every option but certain_exact). A numpy call costs ~1 us however small: the per-row
# loop (~40 calls a row) spends most of its ~70 us a position (K' = 4096) on them. Here each step runs once
# over a block of rows.
_BLOCK_ENTRIES = 1 << 19  # candidate entries per block (128 rows at K' = 4096): work arrays of a few MB
_NO_ID = np.int64(np.iinfo(np.int64).max)  # an empty entry slot: sorts after every id
_scratch_space = threading.local()


def _scratch(name: str, shape: tuple[int, ...], dtype) -> np.ndarray:
    """This thread's work array ``name``, reused by every block and call: a fresh multi-MB array pays a page
    fault per 4 KB on first touch (~2 us each on a small VM), as much as the arithmetic it serves."""
    bufs = _scratch_space.__dict__.setdefault("bufs", {})
    size = math.prod(shape)
    a = bufs.get(name)
    if a is None or a.size < size or a.dtype != dtype:
        a = bufs[name] = np.empty(size, dtype)
    return a[:size].reshape(shape)


def _headtail_vectorised(ids, lps, tokens, token_lp, head, n_draws, rng, draw_logprobs, draw_power, far_oversample, far_draws):
    """``_headtail_rows`` without ``certain_exact``, bit-identical (rng stream included), over blocks of rows.

    How each per-row step maps to the block, and why the float64 values are the same:

    * head / data token / residual: the token's first matching column (``argmax`` of ids == token), the head
      is columns < h, the residual every other valid column. Rows with a negative id (padding, or any hole)
      get their head and residual columns from the row's mask, as per row; other rows need no mask.
    * sums: numpy's ``sum`` is pairwise with a split that depends on the length, so p(head) and the
      residual's mass are summed per row along the last axis over exactly the per-row elements (same
      pairwise loop, any stride); a row whose data token sits inside the residual is first copied without it.
    * cdf: ``cumsum`` is sequential. The residual's cumsum with the head and the data token's column set to
      0 holds the per-row cdf's values at the residual columns (adding 0.0 is exact), so searchsorted over it,
      capped at the last residual column, gives the per-row hit (a zeroed column never passes a point: its cdf
      equals its left neighbour's). Two rows share one complex cumsum (real part one row, imaginary part the
      next): each part is the plain float64 running sum, and the two chains run at once, twice as fast.
    * draws: the eligible rows (rest > 0, covered > 0) of a block take ``rng.random(n)`` / ``rng.random((n, 2))``,
      which are the per-row ``rng.random()`` calls in row order (near before far); the points are the
      per-row formulas on [n, draws] arrays. Points rise along a row, so hits do: equal neighbours are one
      entry, whose count is the number (stratified: weight) of its points.
    * entries: head then drawn entries in one padded row, one stable argsort by id (empty slots last),
      as the per-row concatenation and stable argsort.
    """
    L, kc = ids.shape
    width = head + n_draws
    out = {"target_ids": np.full((L, width), -1, np.int32),
           "target_logprobs": np.zeros((L, width if draw_logprobs else exact_entries_width(head, n_draws, False)), np.float32),
           "target_counts": np.zeros((L, width), np.uint8), "token_logprob": np.zeros(L, np.float32),
           "rest_logmass": np.full(L, -np.inf, np.float32), "beyond_logmass": np.full(L, -np.inf, np.float32),
           "missing_mass": np.zeros(L, np.float64)}
    tokens, token_lp = np.asarray(tokens), np.asarray(token_lp)
    rows = np.flatnonzero(ids[:, 0] >= 0)
    step = max(1, _BLOCK_ENTRIES // kc)
    for s in range(0, len(rows), step):
        r = rows[s:s + step]
        sel = slice(r[0], r[-1] + 1) if r[-1] - r[0] + 1 == len(r) else r  # consecutive rows (the usual): views
        blk = _headtail_block(ids[sel], lps[sel], tokens[sel], token_lp[sel], r, min(head, kc), width, n_draws, rng, draw_logprobs,
                              draw_power, far_oversample, far_draws)
        for name, v in blk.items():
            if v.ndim == 2:
                out[name][sel, :v.shape[1]] = v
            else:
                out[name][sel] = v
    return out


def _pair_sums(pf: np.ndarray, a: int, b: int, m: int) -> np.ndarray:
    """sum(p[r, a:b]) for the m rows held in pairs (``pf[r // 2, :, r % 2]``), each the pairwise sum of that
    1-D slice: the reduction runs along the row's own axis, stride 16."""
    s = np.empty((pf.shape[0], 2))
    s[:, 0] = pf[:, a:b, 0].sum(axis=1)
    s[:, 1] = pf[:, a:b, 1].sum(axis=1)
    return s.ravel()[:m]


def _headtail_block(I, LP, tok, given, rows, h, width, n_draws, rng, draw_logprobs, draw_power, k_far, f_far):
    """One block of rows with candidates (``_headtail_vectorised``): its output arrays, [m, ...]."""
    m, kc = I.shape
    ar = np.arange(m)
    # The data token's first column among the candidates (the per-row where_tok[0]).
    t = tok.astype(I.dtype)
    eq = np.equal(I, (t if np.array_equal(t, tok) else tok)[:, None], out=_scratch("eq", (m, kc), bool))
    tcol = eq.argmax(axis=1)
    padded = np.flatnonzero(I.min(axis=1) < 0)  # rows with any negative id (while I is in cache)
    has = eq[ar, tcol]
    in_head = has & (tcol < h)
    in_res = has & (tcol >= h) & (tok >= 0)  # a matching negative token would be padding, not a residual column
    known = np.isfinite(given)
    tok_lp = np.where(known, given.astype(np.float64), LP[ar, tcol].astype(np.float64))
    bad = ~known & ~has

    # p = exp(logprobs) in float64, rows in pairs: pf[r // 2, :, r % 2] is row r (the complex cumsum's layout).
    half = (m + 1) // 2
    pf = _scratch("pf", (half, kc, 2), np.float64)
    pf[:, :, 0] = LP[0::2]  # float64 logprobs, as per row (exact)
    pf[:m // 2, :, 1] = LP[1::2]
    if m % 2:
        pf[-1, :, 1] = 0.0  # an unused lane
    if draw_power == 1.0:
        gf = pf  # the proposal g is p itself
    else:
        gf = np.multiply(pf, draw_power, out=_scratch("gf", pf.shape, np.float64))
        np.exp(gf, out=gf)
    np.exp(pf, out=pf)
    head_sum = _pair_sums(pf, 0, h, m)
    covered = _pair_sums(pf, h, kc, m)
    tr = np.flatnonzero(in_res)
    q = _scratch("q", (max(kc - h - 1, 0),), np.float64)
    for k, c in zip(tr.tolist(), tcol[tr].tolist()):  # the residual without the data token, contiguous as per row
        row = pf[k >> 1, :, k & 1]
        q[:c - h] = row[h:c]
        q[c - h:] = row[c + 1:]
        covered[k] = q.sum()
    last = (kc - 1 - h) - (in_res & (tcol == kc - 1))  # the last residual column, from h
    head_ok = np.ones((m, h), bool)
    for k in padded:  # padded rows (and any hole): the per-row masks
        ok = I[k] >= 0
        resid = ok.copy()
        resid[:h] = False
        if has[k]:
            resid[tcol[k]] = False
        cols = np.flatnonzero(resid)
        row = pf[k >> 1, :, k & 1]
        head_ok[k] = ok[:h]
        head_sum[k] = row[np.flatnonzero(ok[:h])].sum()
        covered[k] = row[cols].sum()
        last[k] = cols[-1] - h if len(cols) else -1
        gf[k >> 1, ~resid, k & 1] = 0.0
    gf[tr >> 1, tcol[tr], tr & 1] = 0.0  # the data token is exact, never drawn
    # The cdfs, two rows per complex cumsum: complex addition adds real and imaginary parts apart, so each part
    # is exactly its row's float64 running sum, and numpy's cumsum, bound by the latency of one chain of adds
    # (~3 ns an element), runs the two chains in the time of one.
    z = gf.view(np.complex128)[..., 0]
    np.cumsum(z[:, h:], axis=1, out=z[:, h:])  # gf[r // 2, h + j, r % 2]: row r's cdf at column h + j

    p_exact = head_sum + np.where(in_head, 0.0, np.exp(tok_lp))
    d = 1.0 - p_exact
    rest = np.where(d > 0, d, 0.0)  # max(0.0, d), NaN -> 0.0 as per row
    d = rest - covered
    missing = np.where(d > 0, d, 0.0)
    elig = (rest > 0) & (covered > 0)
    if bad.any():  # the rows before it drew, as per row, before the error
        kb = int(np.argmax(bad))
        rng.random(np.count_nonzero(elig[:kb]) * (2 if k_far > 1 else 1))
        raise ValueError(f"row {rows[kb]}: the data token {int(tok[kb])}'s teacher logprob is unknown and it is not among the {kc} candidates")

    # Entries: the head in slots [0, h), the distinct hits after; empty slots hold _NO_ID.
    key = np.full((m, width), _NO_ID)
    key[:, :h] = np.where(head_ok, I[:, :h], _NO_ID)
    ent_lp = np.zeros((m, width), LP.dtype)
    ent_lp[:, :h] = LP[:, :h]
    ent_c = np.zeros((m, width), np.int64)
    e = np.flatnonzero(elig)
    if len(e):
        total = gf[e >> 1, -1, e & 1]
        if k_far > 1:
            u = rng.random((len(e), 2))
            nn = n_draws - f_far
            phi = far_share(n_draws, f_far, k_far)
            near = (u[:, :1] + np.arange(nn)) / nn * (1.0 - phi)
            far = (1.0 - phi) + (u[:, 1:] + np.arange(f_far)) / f_far * phi
            x = np.concatenate([near, far], axis=1) * total[:, None]
            w = np.concatenate([np.full(nn, k_far), np.ones(f_far, np.int64)])
        else:
            x = (rng.random(len(e))[:, None] + np.arange(n_draws)) / n_draws * total[:, None]
            w = np.ones(n_draws, np.int64)
        hit = np.empty(x.shape, np.intp)
        for j, r in enumerate(e.tolist()):  # one searchsorted a row (~1 us); one flat search would need the cdfs copied with row keys
            hit[j] = gf[r >> 1, h:, r & 1].searchsorted(x[j], side="right")
        col = np.minimum(hit, last[e][:, None])
        ne, nd = col.shape
        new = np.ones((ne, nd), bool)
        new[:, 1:] = col[:, 1:] != col[:, :-1]
        slot = np.cumsum(new, axis=1) - 1  # the hit's distinct entry in its row
        cnt = np.bincount((np.arange(ne)[:, None] * nd + slot).ravel(), weights=np.tile(w, ne), minlength=ne * nd)
        cnt = cnt.astype(np.int64).reshape(ne, nd)
        hc = np.zeros((ne, nd), np.intp)
        hc[new.nonzero()[0], slot[new]] = col[new] + h
        key[e, h:h + nd] = np.where(cnt > 0, I[e[:, None], hc], _NO_ID)
        ent_lp[e, h:h + nd] = LP[e[:, None], hc]
        ent_c[e, h:h + nd] = cnt
    order = np.argsort(key, axis=1, kind="stable")
    key = np.take_along_axis(key, order, axis=1)
    real = key != _NO_ID
    out = {"target_ids": np.where(real, key, -1), "target_counts": np.take_along_axis(ent_c, order, axis=1)}
    if draw_logprobs:
        out["target_logprobs"] = np.where(real, np.take_along_axis(ent_lp, order, axis=1), 0.0)
    else:  # the exact entries are the head: its logprobs in ascending id order, packed left
        hk = np.where(head_ok, I[:, :h], _NO_ID)
        ho = np.argsort(hk, axis=1, kind="stable")
        out["target_logprobs"] = np.where(np.take_along_axis(hk, ho, axis=1) != _NO_ID, np.take_along_axis(LP[:, :h], ho, axis=1), 0.0)
    out["token_logprob"] = np.where(in_head, 0.0, tok_lp)
    with np.errstate(divide="ignore"):
        out["rest_logmass"] = np.where(rest > 0, np.log(rest), -np.inf)
        out["beyond_logmass"] = np.where(missing > 0, np.log(missing), -np.inf)
    out["missing_mass"] = missing
    return out


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

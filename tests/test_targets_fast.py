"""``draw_headtail_targets`` (vectorised over rows) is bit-identical to the per-row definition kdship ran
before: every output array (values, dtype, shape), the error for an unknown data token, and the random stream
it leaves behind, over a grid of options and the edge cases (padded rows, rows without candidates, the data
token in the head / among the residual candidates / outside them, rest 0, empty residuals, exact ties)."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from kdship.cache import targets


def reference_draw_headtail_targets(ids, lps, tokens, token_lp, head, n_draws, rng, certain_exact=False, draw_logprobs=True,
                                    draw_power=1.0, far_oversample=1, far_draws=2):
    """The per-row definition, ``targets._headtail_rows`` (the code kdship ran before the vectorised one,
    kept in the module for --certain-exact), behind the public function's argument checks."""
    if not 1 <= n_draws <= 255:
        raise ValueError(f"draws {n_draws}: must be in 1..255 (counts are uint8)")
    if far_oversample > 1 and not (1 <= far_draws < n_draws and far_oversample * (n_draws - far_draws) + far_draws <= 255 and not certain_exact):
        raise ValueError(f"far draws {far_draws} x oversample {far_oversample} of {n_draws}: need 1 <= far draws < draws, "
                         "counts summing to <= 255, and no certain_exact")
    return targets._headtail_rows(ids, lps, tokens, token_lp, head, n_draws, rng, certain_exact, draw_logprobs, draw_power, far_oversample, far_draws)


def _both(ids, lps, tokens, token_lp, head, draws, seed=0, **opts):
    """Runs the reference and kdship's function on the same seed; asserts identical outputs and random streams."""
    g_ref, g_new = np.random.default_rng(seed), np.random.default_rng(seed)
    want = reference_draw_headtail_targets(ids, lps, tokens, token_lp, head, draws, g_ref, **opts)
    got = targets.draw_headtail_targets(ids, lps, tokens, token_lp, head, draws, g_new, **opts)
    assert sorted(got) == sorted(want)
    for k in want:
        assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape, (k, got[k].dtype, want[k].dtype, got[k].shape, want[k].shape)
        np.testing.assert_array_equal(got[k], want[k], err_msg=f"{k} with {opts}")
    assert g_new.bit_generator.state == g_ref.bit_generator.state  # the same random numbers consumed
    return want


def _sequence(rng, V, kc, L, head, *, pad=0.15, empty=0.05, peaked=0.05, dead_tail=0.05, hole=0.0):
    """One sequence's candidate rows as the backends hand them over: ids / raw logprobs of the top-kc of a
    random log-softmax over V, sorted descending; -1 / -inf padding. Row 0 has no candidates; some rows
    none at all (prompt rows), some fewer than kc (padded), some a head holding all the mass (rest 0), some
    a residual whose mass underflows to 0; the data token in the head, among the residual candidates (with
    or without its logprob) or outside the candidates (logprob given)."""
    ids = np.full((L, kc), -1, np.int32)
    lps = np.full((L, kc), -np.inf, np.float32)
    tokens = rng.integers(0, V, L)
    token_lp = np.full(L, np.nan, np.float32)
    for r in range(1, L):
        if rng.random() < empty:
            continue
        scale = 300.0 if rng.random() < peaked else rng.choice([0.3, 1.0, 3.0, 8.0])
        z = rng.standard_normal(V) * scale
        lsm = z - z.max()
        lsm -= np.log(np.exp(lsm).sum())
        top = np.argsort(-lsm, kind="stable")[:kc]
        n = kc if rng.random() >= pad else int(rng.integers(1, kc + 1))
        ids[r, :n] = top[:n]
        lps[r, :n] = lsm[top[:n]]
        if rng.random() < dead_tail and n > head:  # residual candidates whose probability underflows to 0
            lps[r, head:n] = np.float32(-1e4)
        if hole and rng.random() < hole and n > 2:  # a hole inside a row (no backend writes one)
            c = int(rng.integers(1, n - 1))
            ids[r, c], lps[r, c] = -1, -np.inf
        kind = rng.integers(4)
        valid = np.flatnonzero(ids[r] >= 0)
        if kind == 0:  # in the head
            c = valid[int(rng.integers(min(head, len(valid))))]
            tokens[r] = ids[r, c]
        elif kind == 1 and len(valid) > head:  # among the residual candidates
            c = valid[int(rng.integers(head, len(valid)))]
            tokens[r] = ids[r, c]
        elif kind == 2 and n < V:  # outside the candidates: its logprob comes with it
            outside = np.setdiff1d(np.arange(V), ids[r, valid])
            tokens[r] = rng.choice(outside)
            token_lp[r] = lsm[tokens[r]]
            continue
        else:
            tokens[r] = ids[r, valid[-1]]
        if tokens[r] in ids[r] and rng.random() < 0.6:  # the backend's logprob (vLLM); NaN: read from the candidates
            token_lp[r] = lsm[tokens[r]] if rng.random() < 0.8 else rng.choice([np.inf, -np.inf])
    return ids, lps, tokens, token_lp


_OPTIONS = [dict(), dict(draw_logprobs=False), dict(draw_power=0.5), dict(draw_power=0.5, draw_logprobs=False),
            dict(far_oversample=3, far_draws=2), dict(far_oversample=3, far_draws=4, draw_logprobs=False),
            dict(far_oversample=3, far_draws=1, draw_power=0.5), dict(certain_exact=True), dict(certain_exact=True, draw_logprobs=False)]


@pytest.mark.parametrize("opts", _OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()) or "defaults")
def test_random_sequences_are_bit_identical(opts):
    rng = np.random.default_rng(len(str(opts)))
    n_cases = 0
    for draws, head in itertools.product([1, 2, 3, 8, 16], [1, 2, 4, 6]):
        far = opts.get("far_oversample", 1) > 1
        if far and not (opts["far_draws"] < draws and opts["far_oversample"] * (draws - opts["far_draws"]) + opts["far_draws"] <= 255):
            continue
        for _ in range(4):
            V = int(rng.choice([head + 1, 40, 300, 2000]))
            kc = int(rng.integers(min(V, head + 1), min(V, 400) + 1)) if rng.random() < 0.8 else head
            L = int(rng.integers(1, 40))
            ids, lps, tokens, token_lp = _sequence(rng, V, max(kc, 1), L, head, hole=0.05)
            _both(ids, lps, tokens, token_lp, head, draws, seed=int(rng.integers(1 << 30)), **opts)
            n_cases += 1
    assert n_cases >= 32


@pytest.mark.parametrize("opts", [dict(draws=16, far_oversample=3, far_draws=4, draw_logprobs=False), dict(draws=8)],
                         ids=["16 draws far k=3 f=4 no draw logprobs", "8 draws"])
def test_the_two_stores_at_full_size(opts):
    """vLLM's K' = 4096 of a 49,152-token vocabulary (the default store and the 8-draw store), and the whole
    vocabulary as candidates (--backend hf): rows longer than numpy's 8192-element buffer."""
    opts = dict(opts)
    draws = opts.pop("draws")
    rng = np.random.default_rng(7)
    for V, kc, L in [(49152, 4096, 48), (12000, 12000, 24)]:
        ids, lps, tokens, token_lp = _sequence(rng, V, kc, L, 4, pad=0.1, empty=0.05, peaked=0.03, dead_tail=0.03)
        _both(ids, lps, tokens, token_lp, 4, draws, seed=11, **opts)


@pytest.mark.parametrize("block_entries", [1, 50, 300])
def test_blocks_of_any_size_and_rows_in_any_order(block_entries, monkeypatch):
    """Blocks of 1 row, of an odd number of rows, and rows with candidates that are not consecutive."""
    monkeypatch.setattr(targets, "_BLOCK_ENTRIES", block_entries)
    rng = np.random.default_rng(3)
    for opts in _OPTIONS[:7]:
        ids, lps, tokens, token_lp = _sequence(rng, 200, 25, 31, 4, empty=0.3)
        _both(ids, lps, tokens, token_lp, 4, 8, seed=5, **opts)


class _Scripted:
    """A generator whose uniforms are chosen (cycling through ``values``): ``random()`` and ``random(size)``
    hand out the same sequence."""

    def __init__(self, values):
        self.values, self.used = list(values), 0

    def random(self, size=None):
        n = 1 if size is None else int(np.prod(size))
        v = np.array([self.values[(self.used + i) % len(self.values)] for i in range(n)])
        self.used += n
        return float(v[0]) if size is None else v.reshape(size)


@pytest.mark.parametrize("opts", [dict(), dict(draw_logprobs=False), dict(draw_power=0.5)])
def test_points_exactly_on_the_cdf_and_past_its_end(opts):
    """With one systematic draw the point is u * total, so u can put it exactly on a cdf value, which
    searchsorted(side="right") passes: anywhere, and on the value just before the data token's column (which
    the vectorised cdf repeats there). u = 1 - 2^-53 with 16 draws puts the last point on the total: the cap
    on the last residual column, here a candidate of probability 0."""
    rng = np.random.default_rng(8)
    ids, lps, tokens, token_lp = _sequence(rng, 300, 40, 24, 4, pad=0.0, empty=0.0, peaked=0.0, dead_tail=0.0)
    lps[:, -3:] = -np.inf  # candidates of probability 0 at the end (valid ids)
    power = opts.get("draw_power", 1.0)

    def residual_cdf(r, c):
        cols = np.array([j for j in range(4, 40) if j != c])
        return cols, np.cumsum(np.exp(power * lps[r, cols].astype(np.float64)))

    def u_onto(cdf, j):  # a float u with u * total == cdf[j] exactly, if one is next to cdf[j] / total
        u = cdf[j] / cdf[-1]
        for _ in range(8):
            if u * cdf[-1] == cdf[j]:
                return float(u)
            u = np.nextafter(u, np.inf if u * cdf[-1] < cdf[j] else -np.inf)
        return None

    us = []
    for r in range(1, len(ids)):
        token_lp[r] = np.nan  # the data token among the residual candidates, its logprob read there
        for c in rng.permutation(np.arange(5, 36)):
            cols, cdf = residual_cdf(r, c)
            if r % 4 == 0:  # the last point on the total
                u = 1.0 - 2.0 ** -53
            elif r % 4 == 1:  # on the cdf value just before the token's column
                u = u_onto(cdf, int(np.searchsorted(cols, c)) - 1)
            else:
                u = u_onto(cdf, int(rng.integers(0, len(cols) - 3)))
            if u is not None:
                break
        assert u is not None and 0 <= u < 1
        tokens[r] = ids[r, c]
        us.append(u)
    for draws, far in [(1, {}), (16, {}), (16, dict(far_oversample=3, far_draws=4))]:
        outs = []
        for impl in (reference_draw_headtail_targets, targets.draw_headtail_targets):
            g = _Scripted(us)
            outs.append((impl(ids, lps, tokens, token_lp, 4, draws, g, **opts, **far), g.used))
        (want, used_ref), (got, used) = outs
        assert used == used_ref == (2 if far else 1) * (len(ids) - 1)
        for k in want:
            assert got[k].dtype == want[k].dtype and got[k].shape == want[k].shape
            np.testing.assert_array_equal(got[k], want[k], err_msg=f"{k}, {draws} draws {far}")


@pytest.mark.parametrize("opts", [dict(), dict(far_oversample=3, far_draws=4)])
def test_unknown_data_token_not_among_the_candidates_is_refused_as_before(opts, monkeypatch):
    """Same message, and the rows before it drew first (the generator's state after the error is the same)."""
    monkeypatch.setattr(targets, "_BLOCK_ENTRIES", 5 * 30)  # the bad row in the third block of 5 rows
    rng = np.random.default_rng(1)
    ids, lps, tokens, token_lp = _sequence(rng, 300, 30, 20, 4, empty=0.0)
    ok = ~np.isin(np.arange(300), ids[13])
    tokens[13], token_lp[13] = np.flatnonzero(ok)[0], np.nan
    states = []
    for impl in (reference_draw_headtail_targets, targets.draw_headtail_targets):
        g = np.random.default_rng(9)
        with pytest.raises(ValueError, match=rf"^row 13: the data token {tokens[13]}'s teacher logprob is unknown and it is not among the 30 candidates$"):
            impl(ids, lps, tokens, token_lp, 4, 16, g, **opts)
        states.append(g.bit_generator.state)
    assert states[0] == states[1]


@pytest.mark.parametrize("draws, opts", [(0, {}), (256, {}), (8, dict(far_oversample=3, far_draws=8)), (8, dict(far_oversample=3, far_draws=0)),
                                         (16, dict(far_oversample=17, far_draws=1)), (8, dict(far_oversample=3, certain_exact=True))])
def test_invalid_draw_options_are_refused_as_before(draws, opts):
    ids, lps, tokens, token_lp = _sequence(np.random.default_rng(0), 50, 10, 4, 4)
    with pytest.raises(ValueError) as want:
        reference_draw_headtail_targets(ids, lps, tokens, token_lp, 4, draws, np.random.default_rng(0), **opts)
    with pytest.raises(ValueError) as got:
        targets.draw_headtail_targets(ids, lps, tokens, token_lp, 4, draws, np.random.default_rng(0), **opts)
    assert str(got.value) == str(want.value)


@pytest.mark.parametrize("draws, k, f", [(16, 16, 1), (2, 254, 1), (16, 3, 4)])
def test_counts_up_to_the_uint8_limit(draws, k, f):
    """Stratified counts sum to k (N - f) + f (here 241, 255, 40); a residual of one dominant token collects
    almost all of them in one entry."""
    V = 60
    rng = np.random.default_rng(2)
    ids, lps, tokens, token_lp = _sequence(rng, V, 30, 12, 2, pad=0.0, empty=0.0, peaked=0.0)
    lp = np.full(30, -40.0)
    lp[:2] = np.log(0.3)
    lp[2] = np.log(0.4 - 1e-9)
    lps[5] = lp.astype(np.float32)
    tokens[5], token_lp[5] = ids[5, 0], np.nan
    out = _both(ids, lps, tokens, token_lp, 2, draws, seed=4, far_oversample=k, far_draws=f)
    assert out["target_counts"][5].astype(int).sum() == k * (draws - f) + f
    assert out["target_counts"].astype(int).sum(axis=1).max() == k * (draws - f) + f


def test_rows_without_rest_or_residual():
    """A head holding all the mass (rest 0: no draws), no residual candidates (K' = head), a residual whose
    mass underflows (covered 0), and a sequence without any candidates."""
    rng = np.random.default_rng(5)
    for kc, head in [(4, 4), (5, 4), (30, 4)]:
        ids, lps, tokens, token_lp = _sequence(rng, 50, kc, 16, head, peaked=0.4, dead_tail=0.3)
        out = _both(ids, lps, tokens, token_lp, head, 8, seed=2)
        _both(ids, lps, tokens, token_lp, head, 16, seed=2, far_oversample=3, far_draws=4, draw_logprobs=False)
        assert (out["target_counts"][1:].sum(axis=1) == 0).any()
    ids = np.full((3, 10), -1, np.int32)
    _both(ids, np.full((3, 10), -np.inf, np.float32), np.zeros(3, np.int64), np.full(3, np.nan, np.float32), 4, 8)


def test_input_dtypes():
    """int64 ids, float64 logprobs, int32 tokens, float64 token logprobs (as numpy hands them over from elsewhere)."""
    rng = np.random.default_rng(6)
    ids, lps, tokens, token_lp = _sequence(rng, 500, 64, 20, 4)
    for opts in (dict(), dict(far_oversample=3, far_draws=4, draw_logprobs=False), dict(draw_power=0.5)):
        _both(ids.astype(np.int64), lps.astype(np.float64), tokens.astype(np.int32), token_lp.astype(np.float64), 4, 16, seed=3, **opts)

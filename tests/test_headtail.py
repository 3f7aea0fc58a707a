"""Headtail targets (the default, store format v2): what the cache writes, what the loss makes of it.

The store against a transformers forward of the teacher (head, logprobs, data token, rest mass), the
loss against a dense float64 reference (value and gradient), its unbiasedness by Monte Carlo, the
store round trip (raw zarr too), v1 stores and unknown versions, resume, ``kdship inspect``.
"""


import numpy as np
import pytest
import torch
import zarr

from kdship.cache.inspect import format_report, inspect_store
from kdship.cache.run import cache
from kdship.cache.targets import draw_headtail_targets
from kdship.store import HEADER_ATTR, LOGPROB_SCALE, Shard, StoreError, StoreReader, StoreWriter
from kdship.train.losses import KINDS, LossConfig, kd_row_losses

DIVS = [k for k in KINDS if k != "sft"]
LP_TOL = 0.5 / LOGPROB_SCALE + 1e-5  # fixed-point logprobs: half a step


def _forward_logprobs(teacher, tokens):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    with torch.no_grad():
        return torch.log_softmax(m(torch.as_tensor([tokens])).logits[0].double(), -1).numpy()


@pytest.fixture(scope="module")
def ht_store(tmp_path_factory, tiny_teacher, corpus_dir):
    out = tmp_path_factory.mktemp("ht") / "store"
    summary = cache(str(tiny_teacher), str(corpus_dir / "chat.jsonl"), str(out), backend="hf", dtype="float32", top_k=4, draws=8, shard_size=4, progress=False,
                    draw_logprobs=True)  # the store every divergence trains from (the default keeps no draw logprob)
    return out, summary


@pytest.fixture(scope="module")
def ht_lean_store(tmp_path_factory, tiny_teacher, corpus_dir):
    """The ht_store's settings with --no-draw-logprobs (and its plain draws: the same draws)."""
    out = tmp_path_factory.mktemp("ht_lean") / "store"
    cache(str(tiny_teacher), str(corpus_dir / "chat.jsonl"), str(out), backend="hf", dtype="float32", top_k=4, draws=8, shard_size=4, progress=False,
          draw_logprobs=False, far_oversample=1)
    return out


def check_against_forward(store, teacher, head, draws, n_samples=3, candidates=None):
    """Every row of the first samples against the forward: returns the largest rest-mass error.
    ``candidates``: the backend's K' when below the vocabulary; then the stored "beyond" mass (never
    drawn) is checked too, and the trainer's weights sum to 1 minus it. A store written with
    ``--certain-exact`` (its header says) may hold more exact entries than the head: the residual's
    largest tokens, each one the draws left were certain to hit."""
    r = StoreReader(str(store))
    certain_exact = bool(r.header["target_sampling"].get("certain_exact"))
    far_k, far_f = int(r.header["target_sampling"].get("far_oversample", 1)), int(r.header["target_sampling"].get("far_draws", 0))
    lean = r.header["target_sampling"].get("draw_logprobs") is False
    worst = 0.0
    sh = r.read_shard(r.shard_paths[0])
    for i in range(min(n_samples, sh.num_samples)):
        a, b = int(sh.offsets[i]), int(sh.offsets[i + 1])
        toks = sh.tokens[a:b]
        lp = _forward_logprobs(teacher, toks.tolist())
        assert (sh.target_ids[a] == -1).all()  # row 0: no target
        for j in range(1, b - a):
            row = a + j
            ids, cnt, tl = sh.target_ids[row], sh.target_counts[row], sh.target_logprobs[row]
            valid = ids >= 0
            assert (np.diff(ids[valid]) > 0).all()  # ascending, distinct
            exact_ids = ids[valid & (cnt == 0)]
            rank = np.argsort(-lp[j - 1])
            tok = int(toks[j])
            extra = set(exact_ids.tolist()) - set(rank[:head].tolist())
            assert set(rank[:head].tolist()) <= set(exact_ids.tolist())
            assert certain_exact or not extra
            if extra:  # the largest residual tokens (drawable ones), each certain for the draws left then
                cands_k = rank[:candidates] if candidates is not None else rank
                resid = [int(v) for v in cands_k[head:] if v != tok]
                assert extra == set(resid[: len(extra)])
                left = float(np.exp(lp[j - 1][resid]).sum())
                for k, v in enumerate(resid[: len(extra)]):
                    assert (draws - k) * np.exp(lp[j - 1][v]) >= left * (1 - 1e-3)
                    left -= float(np.exp(lp[j - 1][v]))
                assert len(extra) < draws  # one draw always left for the rest
            if lean:  # only the exact entries' logprobs, packed in their (ascending id) order
                np.testing.assert_allclose(tl[: len(exact_ids)], lp[j - 1][exact_ids], atol=LP_TOL)
            else:
                np.testing.assert_allclose(tl[valid], lp[j - 1][ids[valid]], atol=LP_TOL)
            in_head = tok in exact_ids
            want_tok = 0.0 if in_head else lp[j - 1][tok]
            assert sh.token_logprob[row] == pytest.approx(want_tok, abs=LP_TOL)
            exact = set(exact_ids.tolist()) | {tok}
            true_rest = 1.0 - np.exp(lp[j - 1][sorted(exact)]).sum()
            worst = max(worst, abs(np.exp(float(sh.rest_logmass[row])) - true_rest))
            drawn = ids[valid & (cnt > 0)]
            assert not (set(drawn.tolist()) & exact)  # draws come from the residual only
            beyond = 0.0
            if candidates is not None:
                cands = set(np.argsort(-lp[j - 1])[:candidates].tolist())
                beyond = float(np.exp(lp[j - 1][sorted(set(range(lp.shape[1])) - cands - exact)]).sum())
                assert np.exp(np.float64(sh.beyond_logmass[row])) == pytest.approx(beyond, abs=1e-3)
            # stratified draws (--far-oversample k --far-draws f): a near hit counts k, a far one 1
            want_count = far_k * (draws - far_f) + far_f if far_k > 1 else draws - len(extra)
            assert int(cnt.sum()) == (want_count if true_rest - beyond > 1e-9 else 0)
            # the trainer's view: exact entries + data token + draws, weights summing to ~1 - beyond
            assert sh.target_weights[row].sum() == pytest.approx(1.0 - beyond, abs=2e-3)
    return worst


def test_headtail_store_matches_transformers_forward(ht_store, tiny_teacher):
    out, summary = ht_store
    assert summary["complete"] and summary["targets"] == "headtail" and summary["missing_mass"] == 0.0  # hf: exact draws
    worst = check_against_forward(out, str(tiny_teacher), head=4, draws=8)
    assert worst <= 1e-3, f"rest mass off by {worst}"
    hdr = StoreReader(str(out)).header
    assert hdr["format_version"] == 2 and hdr["target_sampling"]["head"] == 4 and hdr["target_sampling"]["draws"] == 8


def test_certain_exact_store_matches_transformers_forward(tmp_path, tiny_teacher, corpus_dir):
    """A store written with --certain-exact against the forward: the head plus certain residual tokens
    exact, the rest mass within 1e-3, the header records the option; resuming it with the option
    flipped is refused, naming target_sampling."""
    from kdship.cache.run import CacheError

    out = tmp_path / "ce"
    args = dict(backend="hf", dtype="float32", top_k=2, draws=8, shard_size=4, progress=False, draw_logprobs=True)
    s = cache(str(tiny_teacher), str(corpus_dir / "chat.jsonl"), str(out), certain_exact=True, **args)
    assert s["complete"]
    assert StoreReader(str(out)).header["target_sampling"]["certain_exact"] is True
    assert check_against_forward(out, str(tiny_teacher), head=2, draws=8) <= 1e-3
    sh = StoreReader(str(out)).read_shard(StoreReader(str(out)).shard_paths[0])
    assert ((sh.target_ids >= 0) & (sh.target_counts == 0)).sum(1).max() > 2  # some row promoted a certain token
    with pytest.raises(CacheError, match="target_sampling"):
        cache(str(tiny_teacher), str(corpus_dir / "chat.jsonl"), str(out), certain_exact=False, **args)


def test_raw_zarr_reads_the_store(ht_store):
    """Standard codecs only: zarr alone decodes ids (ascending, uint16 + 65535 padding) and logprobs."""
    out, _ = ht_store
    root = zarr.open_group(str(out), mode="r")
    first = StoreReader(str(out)).shard_paths[0]
    g = root[first]
    ids, lps = g["target_ids"][:], g["target_logprobs"][:]
    assert ids.dtype == np.uint16 and lps.dtype == np.float32
    sh = StoreReader(str(out)).read_shard(first)
    np.testing.assert_array_equal(np.where(ids == 65535, -1, ids.astype(np.int64)), sh.target_ids)
    np.testing.assert_array_equal(lps, sh.target_logprobs)


def test_loader_marks_the_draws_and_both_estimators_train(ht_store, tiny_student, tmp_path):
    """Asked to (the cv estimator), the trainer's rows carry which entries are draws (counts > 0 in the
    store), exact entries carry w = p; unasked, the loader leaves that out; a short run trains with
    either draw estimator and they differ."""
    from kdship.train.loader import StoreLoader
    from kdship.train.trainer import train

    out, _ = ht_store
    plain = next(iter(StoreLoader(str(out), batch_tokens=200, seed=0, heldout_fraction=0.0, max_epochs=1)))
    assert plain.rows.target_weights is not None and plain.rows.target_drawn is None
    batch = next(iter(StoreLoader(str(out), batch_tokens=200, seed=0, heldout_fraction=0.0, max_epochs=1, with_drawn=True)))
    r = batch.rows
    torch.testing.assert_close(r.target_weights, plain.rows.target_weights)
    valid = r.topk_ids >= 0
    assert r.target_drawn is not None and (r.target_drawn & valid).any() and (~r.target_drawn & valid).any()
    exact = valid & ~r.target_drawn
    torch.testing.assert_close(r.target_weights[exact], r.topk_logprobs[exact].exp(), rtol=1e-5, atol=1e-7)
    finals = {}
    for est in ("is", "cv"):
        s = train(str(out), student=str(tiny_student), out=str(tmp_path / est), max_steps=4, eval_every=0, ckpt_every=0, progress=False,
                  heldout_fraction=0.0, draw_estimator=est, lr=1e-3)
        assert s["steps"] == 4
        finals[est] = s["loss_last"]
    assert np.isfinite(list(finals.values())).all() and finals["is"] != finals["cv"], finals


def test_store_without_draw_logprobs_trains_fkl_as_the_full_store(ht_store, ht_lean_store, tiny_teacher, corpus_dir, tmp_path):
    """--no-draw-logprobs: the same draws (same ids, counts, rest, data token) as the full store, only the
    exact entries' logprobs kept (packed, width h); the trainer's weights equal the full store's and fkl's
    gradient too (it needs no draw logprob), while rkl and the cv estimator refuse the store by name;
    consumers of teacher logprobs see the draws masked; inspect says so; resuming with the option flipped
    is refused."""
    from kdship.cache.run import CacheError
    from kdship.store import teacher_entries
    from kdship.train.trainer import TrainError, train

    full, lean = ht_store[0], ht_lean_store
    args = dict(backend="hf", dtype="float32", top_k=4, draws=8, shard_size=4, progress=False)
    rl, rf = StoreReader(str(lean)), StoreReader(str(full))
    assert rl.header["target_sampling"]["draw_logprobs"] is False and "draw_logprobs" not in rf.header["target_sampling"]
    assert rl.shard_paths == rf.shard_paths
    for path in rl.shard_paths:
        a, b = rl.read_shard(path), rf.read_shard(path)
        for name in ("target_ids", "target_counts", "token_logprob", "rest_logmass", "beyond_logmass"):
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
        exact = (b.target_ids >= 0) & (b.target_counts == 0)
        assert a.target_logprobs.shape == (len(a.tokens), 4) and not a.draw_logprobs and b.draw_logprobs
        for row in np.flatnonzero(exact.any(1)):  # the k-th exact entry's logprob in column k
            np.testing.assert_array_equal(a.target_logprobs[row, : exact[row].sum()], b.target_logprobs[row][exact[row]])
        np.testing.assert_array_equal(a.target_weights, b.target_weights)
        np.testing.assert_array_equal(a.teacher_logprob_known, ~b.target_drawn)
        known = a.teacher_logprob_known
        np.testing.assert_array_equal(a.topk_logprobs[known], b.topk_logprobs[known])
        ids, lps = teacher_entries(a.sample(0))
        n = len(ids)
        assert (ids[~known[:n]] == -1).all() and np.isneginf(lps[~known[:n]]).all()
        np.testing.assert_array_equal(ids[known[:n]], a.sample(0)["topk_ids"][known[:n]])
    # fkl's value differs (a draw's logprob is its weight's log), its gradient does not
    sh_l, sh_f = rl.read_shard(rl.shard_paths[0]), rf.read_shard(rf.shard_paths[0])
    rows = np.flatnonzero(sh_f.has_target())
    ids = torch.as_tensor(sh_f.topk_ids[rows]).long()
    z = torch.randn(len(rows), int(ids.max()) + 1, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    grads = []
    for sh in (sh_l, sh_f):
        zz = z.clone().requires_grad_(True)
        s_lp = torch.log_softmax(zz, -1).gather(1, ids.clamp(min=0))
        t_lp = torch.as_tensor(sh.topk_logprobs[rows]).double()
        est = kd_row_losses(LossConfig(kind="fkl"), s_lp, t_lp, (ids >= 0) & torch.isfinite(t_lp), target_weights=torch.as_tensor(sh.target_weights[rows]).double())
        est.sum().backward()
        grads.append(zz.grad)
    torch.testing.assert_close(grads[0], grads[1])
    for bad, match in ((dict(loss="rkl"), "--loss rkl.*kdship cache .*--draw-logprobs"), (dict(draw_estimator="cv"), "--draw-estimator cv.*--draw-logprobs")):
        with pytest.raises(TrainError, match=match):
            train(str(lean), student=str(tiny_teacher), out=str(tmp_path / "t"), max_steps=1, progress=False, **bad)
    # held-out KL: from the lean store the exact entries alone (one rest category), never the draws, whose
    # logprob slot holds log w; from the full store the weighted estimate as before
    from kdship.train.loader import StoreLoader

    ev_l, ev_f = (StoreLoader(str(st), 4096, seed=0, heldout_fraction=0.5, eval_samples=8).eval_batches()[0].rows for st in (lean, full))
    assert ev_l.target_weights is None and ev_f.target_weights is not None
    kept, stored = ev_l.topk_ids >= 0, ev_f.topk_ids >= 0
    assert (kept <= stored).all() and kept.sum() < stored.sum()  # the draws are gone, nothing else
    torch.testing.assert_close(ev_l.topk_ids[kept], ev_f.topk_ids[kept])
    torch.testing.assert_close(ev_l.topk_logprobs[kept], ev_f.topk_logprobs[kept])
    torch.testing.assert_close(ev_f.target_weights[kept], ev_f.topk_logprobs[kept].exp())  # what is kept is exact: w = p
    info = inspect_store(str(lean))
    assert info["headtail"]["draw_logprobs"] is False and "not stored" in format_report(info)
    assert info["bytes_per_position_by_array"]["target_logprobs"] < inspect_store(str(full))["bytes_per_position_by_array"]["target_logprobs"]
    with pytest.raises(CacheError, match="target_sampling"):
        cache(str(tiny_teacher), str(corpus_dir / "chat.jsonl"), str(lean), draw_logprobs=True, **args)
    with pytest.raises(CacheError, match="--no-draw-logprobs"):
        cache(str(tiny_teacher), str(corpus_dir / "chat.jsonl"), str(tmp_path / "x"), targets="topk", draw_logprobs=False, **{k: v for k, v in args.items() if k != "draws"})


def test_default_store_serves_the_default_loss_and_a_refusal_gives_the_command_that_fixes_it(tiny_teacher, tiny_student, corpus_dir, tmp_path,
                                                                                               monkeypatch):
    """kdship cache's default headtail store: no draw logprobs, 16 stratified draws (4 far, 3x as dense), the
    header saying so; against the transformers forward (rest mass within 1e-3); the default loss trains
    from it; resuming it with --draw-logprobs is refused; rkl is refused with a `kdship cache` command, and
    that very command (run where the data file is) writes a store rkl trains from."""
    import shlex

    from typer.testing import CliRunner

    from kdship.cache.run import CacheError
    from kdship.cli import app
    from kdship.train.trainer import TrainError, train

    out = tmp_path / "default"
    assert cache(str(tiny_teacher), str(corpus_dir / "chat.jsonl"), str(out), backend="hf", dtype="float32", shard_size=4, progress=False)["complete"]
    ts = StoreReader(str(out)).header["target_sampling"]
    assert ts["draws"] == 16 and ts["draw_logprobs"] is False and ts["far_oversample"] == 3 and ts["far_draws"] == 4, ts
    assert check_against_forward(out, str(tiny_teacher), head=4, draws=16) <= 1e-3
    s = train(str(out), student=str(tiny_student), out=str(tmp_path / "fkl"), max_steps=2, eval_every=0, ckpt_every=0, progress=False, heldout_fraction=0.0)
    assert s["steps"] == 2 and np.isfinite(s["loss_last"])
    with pytest.raises(CacheError, match="target_sampling"):
        cache(str(tiny_teacher), str(corpus_dir / "chat.jsonl"), str(out), backend="hf", dtype="float32", shard_size=4, progress=False, draw_logprobs=True)
    with pytest.raises(TrainError) as e:
        train(str(out), student=str(tiny_student), out=str(tmp_path / "rkl"), max_steps=1, progress=False, loss="rkl")
    cmd = shlex.split(str(e.value).split("`")[1])
    assert cmd[:2] == ["kdship", "cache"] and "--draw-logprobs" in cmd and cmd[cmd.index("--out") + 1] == f"{out}-full"
    monkeypatch.chdir(corpus_dir)  # the header names the data file, not where it was
    res = CliRunner().invoke(app, cmd[1:] + ["--no-progress"])
    assert res.exit_code == 0, res.output
    full = StoreReader(f"{out}-full").header["target_sampling"]
    assert full["draws"] == 8 and "draw_logprobs" not in full and "far_oversample" not in full  # every divergence's store
    s = train(f"{out}-full", student=str(tiny_student), out=str(tmp_path / "rkl"), max_steps=2, eval_every=0, ckpt_every=0, progress=False,
              heldout_fraction=0.0, loss="rkl")
    assert s["steps"] == 2


def test_inspect_reports_headtail(ht_store):
    out, _ = ht_store
    info = inspect_store(str(out))
    ht = info["headtail"]
    assert ht["head"] == 4 and ht["draws"] == 8
    assert 0 < ht["mean_exact_mass"] < 1 and ht["mean_exact_mass"] + ht["mean_rest_mass"] == pytest.approx(1.0, abs=1e-3)
    assert 0 < ht["mean_distinct_draws"] <= 8 and ht["max_weight_sum_error"] < 2e-3
    assert "headtail" in format_report(info) and info["bytes_per_position_by_array"]["target_ids"] > 0


def test_resume_redoes_an_uncommitted_shard_bit_identically(ht_store, tmp_path, tiny_teacher, corpus_dir):
    out, _ = ht_store
    copy = tmp_path / "copy"
    args = dict(backend="hf", dtype="float32", top_k=4, draws=8, shard_size=4, progress=False, draw_logprobs=True)  # as ht_store
    cache(str(tiny_teacher), str(corpus_dir / "chat.jsonl"), str(copy), **args)
    # a crash after shard 2's arrays were written but before its commit record (so before the
    # completion snapshot too): remove the record, and the header back to its state before completion
    root = zarr.open_group(str(copy), mode="r+")
    hdr = dict(root.attrs[HEADER_ATTR])
    lost = hdr.pop("complete_shards")[2]
    hdr["complete"] = False
    root.attrs[HEADER_ATTR] = hdr
    (copy / "commits" / (lost.split("/")[1] + ".json")).unlink()
    assert lost not in StoreReader(str(copy)).shard_paths
    s = cache(str(tiny_teacher), str(corpus_dir / "chat.jsonl"), str(copy), **args)
    assert s["shards_written"] == 1 and s["shards_skipped"] == 3 and s["complete"]
    a, b = StoreReader(str(out)), StoreReader(str(copy))
    assert a.shard_attrs(lost)["checksum_sha256"] == b.shard_attrs(lost)["checksum_sha256"]


def test_v1_store_still_reads_and_unknown_version_is_refused(tmp_path):
    hdr = {"mode": "score", "top_k": 2, "targets": "topk", "teacher": {"vocab_size": 10}, "data": {}}
    w = StoreWriter(str(tmp_path / "s"), hdr)
    sample = dict(tokens=np.arange(3), loss_mask=np.ones(3, bool), sample_index=0,
                  topk_ids=np.array([[-1, -1], [1, 2], [3, 4]]), topk_logprobs=np.array([[-np.inf, -np.inf], [-0.5, -1.5], [-0.2, -2.0]]))
    w.write_shard(0, Shard.build([sample], 2))
    root = zarr.open_group(str(tmp_path / "s"), mode="r+")
    for version, ok in ((1, True), (3, False)):
        h = dict(root.attrs[HEADER_ATTR])
        h["format_version"] = version
        root.attrs[HEADER_ATTR] = h
        if ok:
            s = next(StoreReader(str(tmp_path / "s")).iter_samples())
            np.testing.assert_array_equal(s["topk_ids"][1], [1, 2])
        else:
            with pytest.raises(StoreError, match=r"format_version 3.*reads versions 1, 2"):
                StoreReader(str(tmp_path / "s"))


# --------------------------------------------------------------------------------------------------
# The loss on headtail rows


def _case(V=60, head=4, draws=8, seed=0, n_rows=6):
    g = torch.Generator().manual_seed(seed)
    t = torch.log_softmax(torch.randn(n_rows, V, generator=g, dtype=torch.float64) * 2.0, -1)
    z = torch.randn(n_rows, V, generator=g, dtype=torch.float64)
    tokens = torch.randint(0, V, (n_rows,), generator=g).numpy()
    return t, z, tokens


def _rows(t, tokens, head, draws, rng):
    """Headtail rows for full teacher log-probs t [N, V] through the cache's own drawing code."""
    order = torch.argsort(t, -1, descending=True)
    ids = order.numpy().astype(np.int32)
    lps = torch.gather(t, 1, order).numpy()
    tok_lp = t[torch.arange(len(tokens)), torch.as_tensor(tokens)].numpy()
    # the cache's row convention: row 0 has no target, so prepend a blank row
    ids = np.concatenate([np.full((1, ids.shape[1]), -1, np.int32), ids])
    lps = np.concatenate([np.full((1, lps.shape[1]), -np.inf), lps])
    out = draw_headtail_targets(ids, lps, np.concatenate([[0], tokens]), np.concatenate([[np.nan], tok_lp]), head, draws, rng)
    sh = Shard(tokens=np.concatenate([[0], tokens]).astype(np.int32), offsets=np.array([0, len(tokens) + 1]), sample_index=np.array([0]),
               loss_mask=np.ones(len(tokens) + 1, bool), **{k: v for k, v in out.items() if k != "missing_mass"})
    sh.headtail_view()
    return (torch.as_tensor(sh.topk_ids[1:]).long(), torch.as_tensor(sh.topk_logprobs[1:]).double(), torch.as_tensor(sh.target_weights[1:]).double(),
            torch.as_tensor(np.exp(sh.rest_logmass[1:].astype(np.float64))), torch.as_tensor(sh.target_drawn[1:]))


def _estimate(kind, z, ids, t_lp, w, drawn=None):
    """kd_row_losses on the rows: value [N] and gradient wrt the student logits. With ``drawn`` the
    control-variate estimator (draw_estimator "cv"), without it the plain importance-sampled sum."""
    z = z.clone().requires_grad_(True)
    s_lp = torch.log_softmax(z, -1).gather(1, ids.clamp(min=0))
    cfg = LossConfig(kind=kind, beta=0.3, alpha=0.2, draw_estimator="is" if drawn is None else "cv")
    est = kd_row_losses(cfg, s_lp, t_lp, ids >= 0, target_weights=w, target_drawn=drawn)
    est.sum().backward()
    return est.detach(), z.grad


def _term(kind, p, q, beta=0.3, alpha=0.2):
    """A divergence's per-token term phi(p, q) from its textbook definition."""
    kl = lambda a, b: a * (a.log() - b.log())  # noqa: E731
    return {
        "fkl": lambda p, q: kl(p, q),
        "rkl": lambda p, q: kl(q, p),
        "jsd": lambda p, q: beta * kl(p, beta * p + (1 - beta) * q) + (1 - beta) * kl(q, beta * p + (1 - beta) * q),
        "skl": lambda p, q: kl(p, alpha * p + (1 - alpha) * q),
        "srkl": lambda p, q: kl(q, alpha * q + (1 - alpha) * p),
        "tvd": lambda p, q: 0.5 * (p - q).abs(),
    }[kind](p, q)


def _dense_reference_estimate(kind, z, ids, t_lp, w):
    """The same estimator written densely in float64: sum_i (w_i / p_i) * term(p_i, q_i) with q the
    full softmax, terms from the textbook per-token definitions."""
    z = z.clone().requires_grad_(True)
    q = torch.softmax(z, -1)
    valid = ids >= 0
    p_i = torch.where(valid, t_lp.exp(), torch.ones_like(t_lp))
    q_i = q.gather(1, ids.clamp(min=0))
    term = _term(kind, p_i, q_i)
    est = torch.where(valid & (w > 0), w / p_i * term, torch.zeros_like(term)).sum(-1)
    est.sum().backward()
    return est.detach(), z.grad


def _dense_reference_cv(kind, z, ids, t_lp, w, drawn):
    """The control-variate estimator written densely in float64 from its definition: exact terms over E,
    plus sum over every token v outside E of phi(a_v, q_v) with a_v = R q_v / Q (detached; Q summed over
    the full softmax, not through the bucket identity), plus sum_n (w_n / p_n) [phi(p_n, q_n) - phi(a_n, q_n)]."""
    z = z.clone().requires_grad_(True)
    q = torch.softmax(z, -1)
    valid = (ids >= 0) & (w > 0)
    exact = valid & ~drawn
    draw = valid & drawn
    p_i = torch.where(valid, t_lp.exp(), torch.ones_like(t_lp))
    q_i = q.gather(1, ids.clamp(min=0))
    in_e = torch.zeros_like(q).scatter_add_(1, ids.clamp(min=0), exact.to(q.dtype)) > 0  # the exact entries' tokens
    R = 1.0 - torch.where(exact, w, torch.zeros_like(w)).sum(-1)
    Q = torch.where(in_e, torch.zeros_like(q), q).sum(-1)
    a = (R[:, None] * q / Q[:, None]).detach()
    dense_tail = torch.where(in_e, torch.zeros_like(q), _term(kind, a, q)).sum(-1)
    a_i = a.gather(1, ids.clamp(min=0))
    corr = torch.where(draw, w / p_i * (_term(kind, p_i, q_i) - _term(kind, a_i, q_i)), torch.zeros_like(q_i)).sum(-1)
    est = torch.where(exact, _term(kind, p_i, q_i), torch.zeros_like(q_i)).sum(-1) + dense_tail + corr
    est.sum().backward()
    return est.detach(), z.grad


@pytest.mark.parametrize("kind", DIVS)
def test_headtail_loss_matches_dense_float64_reference(kind):
    t, z, tokens = _case(seed=DIVS.index(kind))
    ids, t_lp, w, _, _ = _rows(t, tokens, 4, 8, np.random.default_rng(1))
    est, grad = _estimate(kind, z, ids, t_lp, w)
    ref, ref_grad = _dense_reference_estimate(kind, z, ids, t_lp, w)
    torch.testing.assert_close(est, ref, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("kind", DIVS)
def test_control_variate_loss_matches_dense_float64_reference(kind):
    """draw_estimator "cv": kd_row_losses (the tail's dense sum through the bucket identity phi(R, Q))
    equals the estimator summed over the whole vocabulary, value and gradient, and is not the plain one."""
    t, z, tokens = _case(seed=DIVS.index(kind))
    ids, t_lp, w, _, drawn = _rows(t, tokens, 4, 8, np.random.default_rng(1))
    assert drawn.any(-1).all() and (~drawn & (ids >= 0)).any(-1).all()
    est, grad = _estimate(kind, z, ids, t_lp, w, drawn)
    ref, ref_grad = _dense_reference_cv(kind, z, ids, t_lp, w, drawn)
    torch.testing.assert_close(est, ref, rtol=1e-8, atol=1e-10)
    torch.testing.assert_close(grad, ref_grad, rtol=1e-7, atol=1e-10)
    plain, _ = _estimate(kind, z, ids, t_lp, w)
    assert (plain - est).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["fkl", "rkl"])
def test_control_variate_has_no_noise_at_the_teacher(kind):
    """A student equal to the teacher (q = p): every draw set gives the divergence 0 with gradient 0 up to
    the stored logprobs' fixed-point encoding, where the plain importance-sampled sum's gradient is noise."""
    t, _, tokens = _case(seed=3)
    rng = np.random.default_rng(2)
    for _ in range(5):
        ids, t_lp, w, _, drawn = _rows(t, tokens, 4, 8, rng)
        v, g = _estimate(kind, t.clone(), ids, t_lp, w, drawn)
        _, g_is = _estimate(kind, t.clone(), ids, t_lp, w)
        assert v.abs().max() < 2e-3 and g.abs().max() < 2e-3, (v, g.abs().max())
        assert g_is.abs().max() > 20 * g.abs().max()


@pytest.mark.parametrize("kind", DIVS)
def test_head_covering_the_vocabulary_is_the_exact_divergence(kind):
    """No residual (h = V): the headtail loss is the full-vocabulary divergence, value and gradient."""
    V = 30
    t, z, tokens = _case(V=V, seed=7)
    ids, t_lp, w, rest, _ = _rows(t, tokens, V, 8, np.random.default_rng(0))
    assert (rest < 1e-6).all()
    est, grad = _estimate(kind, z, ids, t_lp, w)
    from test_losses import ref_div

    zz = z.clone().requires_grad_(True)
    # the stored logprobs are fixed-point: the reference uses the same decoded teacher
    p = torch.zeros_like(t).scatter_(1, ids[:, :V].clamp(min=0), t_lp[:, :V].exp())
    ref = ref_div(kind, p, torch.softmax(zz, -1), 0.3, 0.2)
    ref.sum().backward()
    torch.testing.assert_close(est, ref.detach(), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(grad, zz.grad, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("kind,estimator", [("fkl", "is"), ("jsd", "is"), ("fkl", "cv"), ("rkl", "cv")])
def test_headtail_estimate_is_unbiased_monte_carlo(kind, estimator):
    """Over many independent draws the mean estimate (value and gradient) is the exact divergence
    of the whole distribution, within Monte Carlo error, for both draw estimators."""
    from test_losses import ref_div

    V, head, draws, M = 60, 4, 8, 3000
    t, z, tokens = _case(V=V, seed=11, n_rows=2)
    zz = z.clone().requires_grad_(True)
    exact = ref_div(kind, t.exp(), torch.softmax(zz, -1), 0.3, 0.2)
    exact.sum().backward()
    vals, grads = [], []
    rng = np.random.default_rng(0)
    for _ in range(M):
        ids, t_lp, w, _, drawn = _rows(t, tokens, head, draws, rng)
        v, g = _estimate(kind, z, ids, t_lp, w, drawn if estimator == "cv" else None)
        vals.append(v)
        grads.append(g)
    vals, grads = torch.stack(vals), torch.stack(grads)
    se_v = vals.std(0) / M**0.5
    se_g = grads.std(0) / M**0.5
    # within 4.5 standard errors, plus the fixed-point encoding of the logprobs (<= 1e-3 relative)
    assert ((vals.mean(0) - exact.detach()).abs() <= 4.5 * se_v + 2e-3 * exact.detach().abs()).all(), (vals.mean(0), exact)
    assert ((grads.mean(0) - zz.grad).abs() <= 4.5 * se_g + 2e-3 * zz.grad.abs() + 1e-6).all()
    # the estimate is not trivially exact: single draw sets scatter around the exact value
    assert (vals.std(0) > 0.01 * exact.detach().abs()).all()


@pytest.mark.parametrize("lean", [False, True], ids=["full", "no-draw-logprobs"])
def test_format_md_example_reads_a_headtail_store_without_kdship(lean, ht_store, ht_lean_store, tmp_path, run_isolated):
    """cache/FORMAT.md's reading example on a headtail store (also one without the draws' logprobs),
    zarr and numpy only: the weights it computes plus the data token's equal the trainer's view."""
    import re
    from pathlib import Path

    md = (Path(__file__).resolve().parents[1] / "cache" / "FORMAT.md").read_text()
    code = re.search(r"## Reading a store without kdship\s+```python\n(.*?)```", md, re.S).group(1)
    out = ht_lean_store if lean else ht_store[0]
    code = code.replace("cache/mystore.zarr", str(out)) + "\nprint(ids.shape[1], float(np.nansum(w[1:]).round(3)))\n"
    res = run_isolated(code, tmp_path)
    assert res.returncode == 0, res.stderr
    width, wsum = res.stdout.split()
    sh = StoreReader(str(out)).read_shard(StoreReader(str(out)).shard_paths[-1])
    assert int(width) == 12
    assert float(wsum) == pytest.approx(float(sh.target_weights[:, :-1].astype(np.float64).sum().round(3)), abs=2e-3)


# --------------------------------------------------------------------------------------------------
# Systematic draws and the "beyond" bucket


def test_systematic_draws_are_unbiased_and_never_miss_a_large_residual_token():
    """Each residual token's mean count over many rows is N * r_v (unbiased), and a token with
    N * r_v >= 1 is drawn at least floor(N * r_v) times in every row (i.i.d. draws miss it often)."""
    V, head, draws, M = 40, 3, 8, 4000
    g = torch.Generator().manual_seed(3)
    t = torch.log_softmax(torch.randn(1, V, generator=g, dtype=torch.float64) * 4.0, -1)[0].numpy()
    order = np.argsort(-t)
    ids = np.concatenate([np.full((1, V), -1), order[None]]).astype(np.int32)
    lps = np.concatenate([np.full((1, V), -np.inf), t[order][None]])
    tok = int(order[0])  # the data token in the head: the residual is everything beyond the head
    r = np.exp(t[order[head:]])
    r /= r.sum()
    counts = np.zeros(V - head)
    rng = np.random.default_rng(0)
    for _ in range(M):
        out = draw_headtail_targets(ids, lps, np.array([0, tok]), np.array([np.nan, np.nan]), head, draws, rng)
        row_ids, row_c = out["target_ids"][1], out["target_counts"][1]
        c = dict(zip(row_ids[row_c > 0].tolist(), row_c[row_c > 0].tolist()))
        per = np.array([c.get(int(v), 0) for v in order[head:]])
        assert per.sum() == draws
        assert (per >= np.floor(draws * r + 1e-9)).all()
        counts += per
    se = np.sqrt(draws * r * (1 - r) / M) + 1e-12
    assert (np.abs(counts / M - draws * r) <= 4.5 * se).all()
    assert (draws * r >= 1).any()  # the case that makes the floor assertion bite


def _headtail_estimate(out, f, tok_p):
    """sum_v w_v f(v) over one row's stored entries with the trainer's weights (Shard.headtail_view):
    exact entries p, draws (R - B) count / sum(count), the data token outside the entries its own p."""
    i, c = out["target_ids"][1], out["target_counts"][1]
    p = np.exp(out["target_logprobs"][1].astype(np.float64))
    v = i >= 0
    ex, dr = v & (c == 0), v & (c > 0)
    r_b = np.exp(np.float64(out["rest_logmass"][1])) - (np.exp(np.float64(out["beyond_logmass"][1])))
    est = (p[ex] * f[i[ex]]).sum() + (r_b * c[dr] / max(c[dr].sum(), 1) * f[i[dr]]).sum()
    return est + (tok_p[1] * tok_p[0] if out["token_logprob"][1] != 0 else 0.0), int(ex.sum()), int(c.sum())


@pytest.mark.parametrize("scale", [4.0, 6.0])
def test_certain_exact_draws_are_unbiased_and_less_noisy(scale):
    """--certain-exact: residual tokens the systematic draws hit whatever u are stored exact (one draw
    fewer each). The estimate of sum_v p_v f(v) stays unbiased (Monte Carlo, 4.5 standard errors) and
    its spread falls below plain systematic draws'; the stored entries never exceed head + N."""
    V, head, draws, M = 200, 4, 8, 3000
    g = torch.Generator().manual_seed(11)
    t = torch.log_softmax(torch.randn(V, generator=g, dtype=torch.float64) * scale, -1).numpy()
    order = np.argsort(-t)
    K = 120  # vLLM-like candidates: some mass lies beyond them (the bucket's)
    ids = np.concatenate([np.full((1, K), -1), order[None, :K]]).astype(np.int32)
    lps = np.concatenate([np.full((1, K), -np.inf), t[order[:K]][None]])
    tok = int(order[30])
    f = np.random.default_rng(5).normal(size=V)
    truth = float((np.exp(t[order[:K]]) * f[order[:K]]).sum())  # the candidates' share; the beyond mass is the bucket's
    spread = {}
    for ce in (False, True):
        rng = np.random.default_rng(0)
        est, n_exact = [], []
        for _ in range(M):
            out = draw_headtail_targets(ids, lps, np.array([0, tok]), np.array([np.nan, t[tok]]), head, draws, rng, certain_exact=ce)
            e, nx, nc = _headtail_estimate(out, f, (f[tok], np.exp(t[tok])))
            est.append(e)
            n_exact.append(nx)
            assert nx + nc <= head + draws and nc >= 1
        est = np.asarray(est)
        assert abs(est.mean() - truth) <= 4.5 * est.std() / np.sqrt(M) + 1e-9, (ce, est.mean(), truth)
        spread[ce] = est.std()
        assert (max(n_exact) > head) == ce  # the case that makes the comparison bite
    assert spread[True] < 0.8 * spread[False], spread


def test_certain_exact_rows_without_draw_logprobs_read_as_the_full_rows():
    """--certain-exact with --no-draw-logprobs: a row may hold up to h + N - 1 exact entries, so the
    packed logprobs are that wide; the reader puts each back on its entry, and the trainer's weights
    equal those of the same draws with every logprob stored."""
    V, head, draws, K = 200, 4, 8, 120
    t = torch.log_softmax(torch.randn(V, generator=torch.Generator().manual_seed(3), dtype=torch.float64) * 6.0, -1).numpy()
    order = np.argsort(-t)
    ids = np.concatenate([np.full((1, K), -1), order[None, :K]]).astype(np.int32)
    lps = np.concatenate([np.full((1, K), -np.inf), t[order[:K]][None]])
    toks, tok_lp = np.array([0, int(order[30])]), np.array([np.nan, t[order[30]]])
    views = {}
    for keep in (True, False):
        out = draw_headtail_targets(ids, lps, toks, tok_lp, head, draws, np.random.default_rng(0), certain_exact=True, draw_logprobs=keep)
        assert out["target_logprobs"].shape[1] == (head + draws if keep else head + draws - 1)
        views[keep] = Shard(tokens=toks.astype(np.int32), offsets=np.array([0, 2]), sample_index=np.array([0]), loss_mask=np.array([False, True]),
                            **{k: v for k, v in out.items() if k != "missing_mass"}).headtail_view()
    full, lean = views[True], views[False]
    exact = (full.target_ids >= 0) & (full.target_counts == 0)
    assert exact[1].sum() > head  # certain draws were promoted: the packing is wider than the head
    np.testing.assert_array_equal(lean.target_weights, full.target_weights)
    known = lean.teacher_logprob_known
    np.testing.assert_array_equal(lean.topk_logprobs[known], full.topk_logprobs[known])
    assert full.teacher_logprob_known is None


def test_draw_power_weights_are_consistent_and_its_store_says_so(tmp_path, tiny_teacher, corpus_dir):
    """--draw-power a < 1 (experimental): draws from r ** a, weights count * p ** (1 - a) normalised to the
    row's R - B. Self-normalised, so biased by O(1/N): the Monte Carlo mean of sum_v w_v f(v) nears the
    truth as N grows (its error at N = 64 is a fraction of that at N = 4) and the far tail gets more
    draws than with a = 1. The header records the power; resuming with another is refused, and so is
    the option without the draws' logprobs."""
    from kdship.cache.run import CacheError

    V, head, K, M = 400, 4, 300, 600
    t = torch.log_softmax(torch.randn(V, generator=torch.Generator().manual_seed(8), dtype=torch.float64) * 2.5, -1).numpy()
    order = np.argsort(-t)
    ids = np.concatenate([np.full((1, K), -1), order[None, :K]]).astype(np.int32)
    lps = np.concatenate([np.full((1, K), -np.inf), t[order[:K]][None]])
    toks, tok_lp = np.array([0, int(order[0])]), np.array([np.nan, np.nan])
    f = np.random.default_rng(2).normal(size=V) + np.where(np.arange(V) == 0, 0, -t)  # a tail-heavy quantity
    resid = order[head:K]
    truth = float((np.exp(t[resid]) * f[resid]).sum())
    err, far = {}, {}
    for power, n in ((0.5, 4), (0.5, 64), (1.0, 4)):
        est, far_draws = [], 0
        for m in range(M):
            out = draw_headtail_targets(ids, lps, toks, tok_lp, head, n, np.random.default_rng(m), draw_power=power)
            sh = Shard(tokens=toks.astype(np.int32), offsets=np.array([0, 2]), sample_index=np.array([0]), loss_mask=np.array([False, True]),
                       **{k: v for k, v in out.items() if k != "missing_mass"}).headtail_view(power)
            i, w, c = sh.topk_ids[1], sh.target_weights[1].astype(np.float64), sh.target_drawn[1]
            est.append(float((w[c] * f[i[c]]).sum()))
            far_draws += int(sh.target_counts[1][np.isin(sh.target_ids[1], order[100:K])].sum())
        err[(power, n)] = abs(np.mean(est) - truth)
        far[(power, n)] = far_draws / M
    assert err[(0.5, 64)] < 0.5 * err[(0.5, 4)], err
    assert far[(0.5, 4)] > 1.2 * far[(1.0, 4)], far
    out = tmp_path / "pw"
    args = dict(backend="hf", dtype="float32", top_k=4, draws=8, shard_size=4, progress=False)
    assert cache(str(tiny_teacher), str(corpus_dir / "chat.jsonl"), str(out), draw_power=0.5, **args)["complete"]
    r = StoreReader(str(out))
    assert r.header["target_sampling"]["draw_power"] == 0.5
    sh = r.read_shard(r.shard_paths[0])
    beyond = np.where(sh.beyond_logmass > -16, np.exp(sh.beyond_logmass.astype(np.float64)), 0.0)
    has = sh.has_target()
    np.testing.assert_allclose(sh.target_weights[has].astype(np.float64).sum(1) + beyond[has], 1.0, atol=2e-3)
    with pytest.raises(CacheError, match="target_sampling"):
        cache(str(tiny_teacher), str(corpus_dir / "chat.jsonl"), str(out), draw_power=0.7, **args)
    with pytest.raises(CacheError, match="--draw-power"):
        cache(str(tiny_teacher), str(corpus_dir / "chat.jsonl"), str(tmp_path / "x"), draw_power=0.5, draw_logprobs=False, **args)


def test_far_oversampled_draws_are_unbiased_with_unchanged_readers(tmp_path, tiny_teacher, corpus_dir):
    """--far-oversample k --far-draws f (experimental): f of the N systematic draws on the residual cdf's
    last share phi = f / (f + k (N - f)), the rest on the first 1 - phi, near hits counting k. The reader's
    plain weights (R - B) count / sum(counts) then estimate sum_v p_v g(v) without bias (Monte Carlo,
    4.5 standard errors, for a quantity living in the far tail and for a generic one), the far tail gets
    more draws, and a quantity living there is estimated with less spread than with plain draws. A store
    records the option; bad combinations are refused by name."""
    from kdship.cache.run import CacheError
    from kdship.cache.targets import far_share

    V, head, K, M, n = 400, 4, 300, 2000, 8
    t = torch.log_softmax(torch.randn(V, generator=torch.Generator().manual_seed(9), dtype=torch.float64) * 2.5, -1).numpy()
    order = np.argsort(-t)
    ids = np.concatenate([np.full((1, K), -1), order[None, :K]]).astype(np.int32)
    lps = np.concatenate([np.full((1, K), -np.inf), t[order[:K]][None]])
    toks, tok_lp = np.array([0, int(order[0])]), np.array([np.nan, np.nan])
    resid = order[head:K]
    r = np.exp(t[resid]) / np.exp(t[resid]).sum()
    far_cols = resid[np.cumsum(r) > 1 - far_share(n, 2, 3) + 0.02]  # well inside the far stratum
    fs = {"far": np.isin(np.arange(V), far_cols).astype(float), "generic": np.random.default_rng(4).normal(size=V)}
    truth = {name: float((np.exp(t[resid]) * f[resid]).sum()) for name, f in fs.items()}
    spread, far_hits = {}, {}
    for k in (1, 3):
        est = {name: [] for name in fs}
        hits = 0
        for m in range(M):
            out = draw_headtail_targets(ids, lps, toks, tok_lp, head, n, np.random.default_rng(m), far_oversample=k, far_draws=2)
            sh = Shard(tokens=toks.astype(np.int32), offsets=np.array([0, 2]), sample_index=np.array([0]), loss_mask=np.array([False, True]),
                       **{a: b for a, b in out.items() if a != "missing_mass"}).headtail_view()
            i, w, d = sh.topk_ids[1], sh.target_weights[1].astype(np.float64), sh.target_drawn[1]
            for name, f in fs.items():
                est[name].append(float((w[d] * f[i[d]]).sum()))
            hits += int(np.isin(i[d], far_cols).sum())
        for name in fs:
            e = np.asarray(est[name])
            assert abs(e.mean() - truth[name]) <= 4.5 * e.std() / np.sqrt(M) + 1e-12, (k, name, e.mean(), truth[name])
        spread[k] = np.std(est["far"])
        far_hits[k] = hits / M
    assert far_hits[3] > 1.5 * far_hits[1], far_hits
    assert spread[3] < 0.8 * spread[1], spread
    out = tmp_path / "far"
    args = dict(backend="hf", dtype="float32", top_k=4, draws=8, shard_size=4, progress=False)
    assert cache(str(tiny_teacher), str(corpus_dir / "chat.jsonl"), str(out), far_oversample=3, far_draws=2, **args)["complete"]
    ts = StoreReader(str(out)).header["target_sampling"]
    assert ts["far_oversample"] == 3 and ts["far_draws"] == 2
    for bad in (dict(far_oversample=3, far_draws=8), dict(far_oversample=3, far_draws=2, certain_exact=True), dict(far_oversample=0)):
        with pytest.raises(CacheError, match="--far-oversample"):
            cache(str(tiny_teacher), str(corpus_dir / "chat.jsonl"), str(tmp_path / "x"), **{**args, **bad})


def _truncate(t, tokens, head, n_cands):
    """Candidate rows as vLLM gives them: only the top-``n_cands`` ids (sorted) and the data token's logprob."""
    order = torch.argsort(t, -1, descending=True)[:, :n_cands]
    ids = np.concatenate([np.full((1, n_cands), -1, np.int32), order.numpy().astype(np.int32)])
    lps = np.concatenate([np.full((1, n_cands), -np.inf), torch.gather(t, 1, order).numpy()])
    tok_lp = np.concatenate([[np.nan], t[torch.arange(len(tokens)), torch.as_tensor(tokens)].numpy()])
    return ids, lps, np.concatenate([[0], tokens]), tok_lp


@pytest.mark.parametrize("kind", DIVS)
def test_beyond_bucket_is_the_bucket_divergence_when_nothing_can_be_drawn(kind):
    """Candidates = the head only (vLLM with K' = h): every residual token lies beyond them, so the row is
    exact head + data token + one bucket holding the rest, which is top-k KD with tail "bucket" over the
    same exact entries; value and gradient match that loss."""
    V, head = 50, 5
    t, z, tokens = _case(V=V, seed=21)
    ids, lps, toks, tok_lp = _truncate(t, tokens, head, head)
    out = draw_headtail_targets(ids, lps, toks, tok_lp, head, 8, np.random.default_rng(0))
    assert (out["target_counts"] == 0).all() and (out["missing_mass"][1:] > 0.05).all()
    sh = Shard(tokens=toks.astype(np.int32), offsets=np.array([0, len(toks)]), sample_index=np.array([0]), loss_mask=np.ones(len(toks), bool),
               **{k: v for k, v in out.items() if k != "missing_mass"})
    sh.headtail_view()
    ids_t, t_lp, w = torch.as_tensor(sh.topk_ids[1:]).long(), torch.as_tensor(sh.topk_logprobs[1:]).double(), torch.as_tensor(sh.target_weights[1:]).double()
    assert (1 - w.sum(-1)).numpy() == pytest.approx(out["missing_mass"][1:], abs=1e-6)
    est, grad = _estimate(kind, z, ids_t, t_lp, w)
    zz = z.clone().requires_grad_(True)
    s_lp = torch.log_softmax(zz, -1).gather(1, ids_t.clamp(min=0))
    ref = kd_row_losses(LossConfig(kind=kind, tail="bucket", beta=0.3, alpha=0.2), s_lp, t_lp, ids_t >= 0)
    ref.sum().backward()
    torch.testing.assert_close(est, ref.detach(), rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(grad, zz.grad, rtol=1e-6, atol=1e-9)


def test_beyond_bucket_keeps_the_far_tail_alive():
    """Truncated candidates (K' < V): with the bucket, fkl's gradient no longer pushes the student's mass
    beyond the candidates to zero; at the teacher (q = p) its mean gradient there is ~0 instead of q."""
    V, head, n_cands, M = 60, 4, 12, 400
    t, _, tokens = _case(V=V, seed=5, n_rows=3)
    ids, lps, toks, tok_lp = _truncate(t, tokens, head, n_cands)
    far = torch.ones(3, V, dtype=torch.bool)
    far.scatter_(1, torch.argsort(t, -1, descending=True)[:, :n_cands], False)
    far[torch.arange(3), torch.as_tensor(tokens)] = False
    grads = []
    rng = np.random.default_rng(1)
    for _ in range(M):
        out = draw_headtail_targets(ids, lps, toks, tok_lp, head, 8, rng)
        sh = Shard(tokens=toks.astype(np.int32), offsets=np.array([0, len(toks)]), sample_index=np.array([0]), loss_mask=np.ones(len(toks), bool),
                   **{k: v for k, v in out.items() if k != "missing_mass"})
        sh.headtail_view()
        ids_t, t_lp, w = torch.as_tensor(sh.topk_ids[1:]).long(), torch.as_tensor(sh.topk_logprobs[1:]).double(), torch.as_tensor(sh.target_weights[1:]).double()
        grads.append(_estimate("fkl", t.clone(), ids_t, t_lp, w)[1])
    g = torch.stack(grads).mean(0)
    q_far = t.exp()[far].sum()
    without_bucket = q_far  # sum of q_v over the far tokens: what a loss with no bucket would push down
    assert g[far].sum().abs() < 0.1 * without_bucket, (g[far].sum(), without_bucket)


@pytest.mark.parametrize("kind", ["fkl", "rkl"])
def test_beyond_bucket_against_the_students_own_far_tail_matches_autograd(kind):
    """LossConfig.beyond_topk = K': the bucket's student side is its mass outside its own top-K' and the
    row's stored ids. The fused chunked loss (hand-built logit gradients) equals a dense autograd
    reference, value and gradient, and differs from the default bucket (so the option does something)."""
    from kdship.train.losses import DistillLoss

    torch.manual_seed(0)
    N, H, V, K, far_k = 12, 16, 200, 6, 40
    hidden = torch.randn(N, H, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(V, H, dtype=torch.float64, requires_grad=True)
    ids = torch.stack([torch.randperm(V)[:K] for _ in range(N)])
    t_lp = torch.log_softmax(torch.randn(N, K, dtype=torch.float64), -1) - 0.3  # the stored entries hold e^-0.3 of the mass
    w = t_lp.exp() * 0.9  # weights sum to 0.9 e^-0.3 < 1: a beyond bucket on every row
    rows = type("Rows", (), dict(topk_ids=ids, topk_logprobs=t_lp, target_weights=w, targets=ids[:, 0], row_weight=torch.full((N,), 1.0 / N, dtype=torch.float64)))
    cfg = LossConfig(kind=kind, beyond_topk=far_k, chunk_rows=5, draw_estimator="is")
    loss, _ = DistillLoss(cfg, V)(hidden, weight, rows)
    g_h, g_w = torch.autograd.grad(loss, [hidden, weight])

    z = hidden @ weight.T
    lq = torch.log_softmax(z, -1)
    far = torch.ones(N, V, dtype=torch.bool)
    far.scatter_(1, z.detach().topk(far_k, -1).indices, False)
    far.scatter_(1, ids, False)
    s_far = torch.logsumexp(lq.masked_fill(~far, float("-inf")), -1)
    ref = (kd_row_losses(cfg, lq.gather(1, ids), t_lp, torch.ones(N, K, dtype=torch.bool), w, V, s_far) / N).sum()
    r_h, r_w = torch.autograd.grad(ref, [hidden, weight])
    assert loss.item() == pytest.approx(ref.item(), rel=1e-9)
    torch.testing.assert_close(g_h, r_h, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(g_w, r_w, rtol=1e-7, atol=1e-9)
    default, _ = DistillLoss(LossConfig(kind=kind, chunk_rows=5), V)(hidden, weight, rows)
    assert abs(default.item() - loss.item()) > 1e-4

"""`kdship cache` with the real vLLM engine (CPU, in-process, one engine shared by this module).

Covers: stored top-k vs a transformers forward pass, vLLM vs the hf backend within 1e-4 nat,
the known vLLM pitfalls (max_logprobs default 20, the actual token's extra entry, prefix caching),
generate mode, SIGKILL + resume giving identical arrays, two processes writing one store, and the
refusal of a teacher the CPU kernels cannot run.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from kdship.cache.run import cache
from kdship.store import LOGPROB_MANTISSA_BITS, ARRAY_DTYPES, StoreReader

ENC_RTOL = 2.0 ** -(LOGPROB_MANTISSA_BITS + 1)  # BitRound's relative error bound
TOL = 1e-4  # nat: vLLM and transformers must agree this closely


@pytest.fixture(scope="module")
def vbackend(tiny_teacher):
    from kdship.render import load_tokenizer
    from kdship.cache.vllm_backend import VLLMBackend

    tok = load_tokenizer(str(tiny_teacher))
    return VLLMBackend(str(tiny_teacher), eos_token_ids=[tok.eos_token_id])


@pytest.fixture(scope="module")
def hf_model(tiny_teacher):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(tiny_teacher), dtype=torch.float32).eval()


def _logprobs(model, tokens):
    with torch.no_grad():
        return torch.log_softmax(model(torch.as_tensor([list(tokens)])).logits[0].float(), -1).numpy()


def _seqs(tiny_teacher, corpus_dir, n=6):
    from kdship.render import load_tokenizer
    from kdship.data import read_rows

    tok = load_tokenizer(str(tiny_teacher))
    rows, _ = read_rows(corpus_dir / "text.jsonl")
    return [tok(r.text)["input_ids"] for r in rows[:n]]


def test_vllm_scores_match_transformers_and_hf_backend(vbackend, hf_model, tiny_teacher, corpus_dir):
    from kdship.cache.hf_backend import HFBackend

    seqs = _seqs(tiny_teacher, corpus_dir)
    got = vbackend.score(seqs, 32)
    ref = HFBackend(str(tiny_teacher)).score(seqs, 32)
    worst = 0.0
    for seq, (ids, lps), (rids, rlps) in zip(seqs, got, ref):
        lp = _logprobs(hf_model, seq)
        assert ids.shape == (len(seq), 32) and (ids[0] == -1).all()
        for j in range(1, len(seq)):
            # every stored id's logprob is the transformers log-softmax value
            worst = max(worst, float(np.abs(lps[j] - lp[j - 1][ids[j]]).max()))
            # and the stored set is the true top-32 (ties at the boundary aside)
            assert lps[j][-1] >= np.sort(lp[j - 1])[::-1][31] - TOL
        np.testing.assert_allclose(lps[1:], rlps[1:], atol=TOL)  # vLLM vs hf backend, rank by rank
    assert worst < TOL


def test_vllm_and_hf_stores_agree(tmp_path, vbackend, tiny_teacher, corpus_dir):
    data = str(corpus_dir / "pairs.jsonl")
    a = cache(str(tiny_teacher), data, str(tmp_path / "v"), backend="vllm", targets="topk", top_k=16, progress=False)
    b = cache(str(tiny_teacher), data, str(tmp_path / "h"), backend="hf", targets="topk", top_k=16, progress=False)
    assert a["positions"] == b["positions"] > 0
    for x, y in zip(StoreReader(str(tmp_path / "v")).iter_samples(), StoreReader(str(tmp_path / "h")).iter_samples()):
        np.testing.assert_array_equal(x["tokens"], y["tokens"])
        np.testing.assert_array_equal(x["loss_mask"], y["loss_mask"])
        # each store rounds independently: they differ by at most two rounding errors of the encoding
        f = np.isfinite(x["topk_logprobs"])
        np.testing.assert_allclose(x["topk_logprobs"][f], y["topk_logprobs"][f], rtol=2 * ENC_RTOL, atol=1e-4)
        same = (x["topk_ids"] == y["topk_ids"]).mean()
        assert same > 0.99  # only near-ties may swap places


def test_pitfall_max_logprobs_raised_beyond_20(vbackend, tiny_teacher, corpus_dir):
    assert vbackend.llm.llm_engine.model_config.max_logprobs >= 128  # vLLM's default cap is 20
    seq = _seqs(tiny_teacher, corpus_dir, 1)[0]
    ids, lps = vbackend.score([seq], 128)[0]
    assert (ids[1:] >= 0).all() and np.isfinite(lps[1:]).all()  # 128 real entries per row


def test_pitfall_actual_token_extra_entry_is_dropped(vbackend, hf_model, tiny_teacher, corpus_dir):
    seq = _seqs(tiny_teacher, corpus_dir, 1)[0]
    ids, lps = vbackend.score([seq], 1)[0]
    lp = _logprobs(hf_model, seq)
    outside = [j for j in range(1, len(seq)) if int(np.argmax(lp[j - 1])) != seq[j]]
    assert outside, "need positions whose actual token is not the top-1"
    for j in outside:
        # vLLM returned two entries here (top-1 and the actual token): only the top-1 is stored
        assert ids[j, 0] == int(np.argmax(lp[j - 1])) and ids.shape[1] == 1
    # and the raw vLLM output really has the extra entry (what the parser must handle)
    from vllm import SamplingParams, TokensPrompt

    out = vbackend.llm.generate([TokensPrompt(prompt_token_ids=seq)], SamplingParams(max_tokens=1, prompt_logprobs=1, detokenize=False), use_tqdm=False)[0]
    assert len(out.prompt_logprobs[outside[0]]) == 2


def test_pitfall_prefix_caching_off(vbackend, tiny_teacher, corpus_dir):
    assert vbackend.llm.llm_engine.vllm_config.cache_config.enable_prefix_caching is False
    seq = _seqs(tiny_teacher, corpus_dir, 1)[0]
    # the same prompt twice, then a prompt sharing its prefix: every row still gets prompt logprobs
    outs = vbackend.score([seq, seq, seq + seq[1:5]], 8)
    for ids, lps in outs:
        assert (ids[1:, 0] >= 0).all()
    np.testing.assert_array_equal(outs[0][1], outs[1][1])


def test_vllm_generate_mode(tmp_path, vbackend, hf_model, tiny_teacher, corpus_dir):
    kw = dict(mode="generate", targets="topk", samples=2, max_new_tokens=6, top_k=8, seed=11, temperature=0.7, shard_size=10, progress=False)
    s = cache(str(tiny_teacher), str(corpus_dir / "prompts.jsonl"), str(tmp_path / "g"), **kw)
    assert s["samples"] == 20 and s["generated_tokens"] > 0
    cache(str(tiny_teacher), str(corpus_dir / "prompts.jsonl"), str(tmp_path / "g2"), **kw)
    a = list(StoreReader(str(tmp_path / "g")).iter_samples())
    b = list(StoreReader(str(tmp_path / "g2")).iter_samples())
    for x, y in zip(a, b):  # per-(row, sample) seeds: bit-identical reruns
        np.testing.assert_array_equal(x["tokens"], y["tokens"])
        np.testing.assert_array_equal(x["topk_logprobs"], y["topk_logprobs"])
    x = a[0]
    gen = np.flatnonzero(x["loss_mask"])
    lp = _logprobs(hf_model, x["tokens"])
    for j in gen:  # raw temperature-1 logprobs although sampled at 0.7
        np.testing.assert_allclose(x["topk_logprobs"][j], np.sort(lp[j - 1])[::-1][:8], rtol=ENC_RTOL, atol=TOL)


def test_vllm_sampled_targets(tmp_path, vbackend, tiny_teacher, corpus_dir):
    s = cache(str(tiny_teacher), str(corpus_dir / "pairs.jsonl"), str(tmp_path / "s"), targets="sampled", top_k=16, sampled_candidates=128, progress=False)
    r = StoreReader(str(tmp_path / "s"))
    ts = r.header["target_sampling"]
    assert ts["exact"] is False and ts["candidates"] == 128
    assert r.header["compute_dtype"] == "float32"  # --dtype auto, resolved for vLLM on the CPU
    sh = r.read_shard(r.shard_paths[0])
    has = sh.topk_ids[:, 0] >= 0
    np.testing.assert_allclose(sh.target_weights[has].sum(1), 1.0, atol=1e-6)
    assert s["targeted_positions"] > 0


def test_vllm_headtail_store_matches_transformers_forward(tmp_path, vbackend, tiny_teacher, corpus_dir):
    """The default targets through the real engine: head, logprobs, data token and rest mass (<= 1e-3)
    against a transformers forward; with K' below the vocabulary the never-drawn mass is reported."""
    from test_headtail import check_against_forward

    s = cache(str(tiny_teacher), str(corpus_dir / "text.jsonl"), str(tmp_path / "ht"), progress=False)
    assert s["targets"] == "headtail" and s["complete"] and s["missing_mass"] == 0.0  # K' = 1024 >= vocab 512
    assert check_against_forward(tmp_path / "ht", str(tiny_teacher), head=4, draws=16) <= 1e-3  # the default: 16 stratified draws
    s = cache(str(tiny_teacher), str(corpus_dir / "text.jsonl"), str(tmp_path / "ht64"), sampled_candidates=64, progress=False, draw_logprobs=True)
    assert 0.0 < s["missing_mass"] < 1.0
    assert check_against_forward(tmp_path / "ht64", str(tiny_teacher), head=4, draws=8, candidates=64) <= 1e-3
    assert StoreReader(str(tmp_path / "ht64")).header["target_sampling"]["candidates"] == 64


def test_engine_calls_bounded_by_entries_give_the_same_store(tmp_path, vbackend, tiny_teacher, corpus_dir, monkeypatch):
    """A shard split over several engine calls (to bound vLLM's Python logprob objects) stores what one call would."""
    import kdship.cache.run as run_mod

    data = str(corpus_dir / "pairs.jsonl")
    cache(str(tiny_teacher), data, str(tmp_path / "one"), targets="sampled", top_k=16, sampled_candidates=128, progress=False)
    calls = []
    real_score = type(vbackend).score

    def counting_score(self, seqs, k):
        calls.append(len(seqs))
        return real_score(self, seqs, k)

    monkeypatch.setattr(run_mod, "MAX_ENTRIES_PER_CALL", 128 * 40)  # a few short rows per call
    monkeypatch.setattr(type(vbackend), "score", counting_score)
    cache(str(tiny_teacher), data, str(tmp_path / "many"), targets="sampled", top_k=16, sampled_candidates=128, progress=False)
    assert len(calls) > 1
    a = list(StoreReader(str(tmp_path / "one")).iter_samples())
    b = list(StoreReader(str(tmp_path / "many")).iter_samples())
    assert len(a) == len(b) == sum(calls)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["tokens"], y["tokens"])
        np.testing.assert_array_equal(x["topk_ids"], y["topk_ids"])
        np.testing.assert_allclose(x["topk_logprobs"], y["topk_logprobs"], rtol=ENC_RTOL, atol=TOL)


def test_refuses_teacher_the_cpu_kernels_cannot_run(tmp_path):
    from kdship.runtime.vllm_engine import TeacherUnsupported, check_teacher_runs
    from kdship.tiny import build_tiny_llama

    d = build_tiny_llama(tmp_path / "h16", hidden=64, layers=1, heads=4, kv_heads=1, vocab_size=300)
    with pytest.raises(TeacherUnsupported, match=r"head_dim=16.*CPU attention kernels"):
        check_teacher_runs(str(d))


# --------------------------------------------------------------------------------------------------
# Processes: SIGKILL + resume, two writers


def _env():
    env = dict(os.environ)
    env.update(VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1", OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "2"), VLLM_CPU_NUM_OF_RESERVED_CPU="0", TOKENIZERS_PARALLELISM="false")
    return env


def _cmd(teacher, data, out, *extra):
    return [sys.executable, "-m", "kdship", "cache", str(teacher), str(data), "--out", str(out), "--top-k", "8", "--shard-size", "1", "--no-progress", *extra]


def _committed(out: Path) -> list:
    """The shards committed so far: one record each in STORE/commits/ (cache/FORMAT.md)."""
    try:
        return [n for n in os.listdir(out / "commits") if n.endswith(".json")]
    except OSError:
        return []


def _arrays(url):
    r = StoreReader(str(url))
    return {p: {n: getattr(r.read_shard(p), n) for n in ARRAY_DTYPES} for p in r.shard_paths}


def _assert_same(a, b):
    assert list(a) == list(b)
    for p in a:
        for n in a[p]:
            np.testing.assert_array_equal(a[p][n], b[p][n], err_msg=f"{p}/{n}")


def test_sigkill_then_resume_is_identical_and_two_processes_share_a_store(tmp_path, tiny_teacher, corpus_dir):
    data = corpus_dir / "text.jsonl"  # 20 rows -> 20 shards
    ref = tmp_path / "ref"  # uninterrupted, in this process (same engine settings and thread count)
    cache(str(tiny_teacher), str(data), str(ref), top_k=8, shard_size=1, progress=False)

    killed = tmp_path / "killed"
    p = subprocess.Popen(_cmd(tiny_teacher, data, killed), env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while len(_committed(killed)) < 3 and p.poll() is None and time.time() - t0 < 240:
        time.sleep(0.02)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    n_at_kill = len(_committed(killed))
    assert 3 <= n_at_kill < 20, f"the kill came too late ({n_at_kill} shards committed)"
    assert StoreReader(str(killed)).complete is False
    res = subprocess.run(_cmd(tiny_teacher, data, killed, "--json"), env=_env(), capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads(res.stdout[res.stdout.rindex('{\n "store"') :])
    assert summary["shards_skipped"] == n_at_kill and summary["complete"] is True
    _assert_same(_arrays(ref), _arrays(killed))

    # two processes, each with its own engine, write disjoint shards of one store
    both = tmp_path / "both"
    procs = [subprocess.Popen(_cmd(tiny_teacher, data, both, "--num-shards", "2", "--shard-index", str(i)), env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE) for i in (0, 1)]
    for q in procs:
        _, err = q.communicate(timeout=300)
        assert q.returncode == 0, err[-2000:]
    r = StoreReader(str(both))
    assert r.complete and len(r.shard_paths) == 20
    _assert_same(_arrays(ref), _arrays(both))


def test_flat_logprobs_parse_as_per_position_dicts_would():
    """vLLM's FlatLogprobs (Python lists, [actual token, top-1..top-k] per position) -> the rows and the
    actual tokens' logprobs: the back-to-back fast path, a layout with gaps, empty positions and a short
    position all give what reading each position on its own gives."""
    from types import SimpleNamespace

    from kdship.cache.vllm_backend import _own_from_flat, _rows_from_flat

    rng = np.random.default_rng(3)
    k = 6

    def flat_of(lens, gap=0):
        tok, lp, ranks, starts, ends, rows = [], [], [], [], [], []
        for n in lens:
            starts.append(len(tok))
            ids = rng.choice(1000, n, replace=False).tolist()
            vals = sorted(rng.normal(size=n).tolist(), reverse=True)
            if n:  # the actual token first (rank up to 999), then the top entries in rank order
                vals = [vals[-1]] + vals[:-1]
            tok += ids
            lp += vals
            ranks += ([999] + list(range(1, n))) if n else []
            ends.append(len(tok))
            rows.append((ids, vals))
            tok += [7] * gap
            lp += [0.5] * gap
            ranks += [1] * gap
        return SimpleNamespace(start_indices=starts, end_indices=ends, token_ids=tok, logprobs=lp, ranks=ranks), rows

    for lens, gap in (([0] + [k + 1] * 9, 0), ([0] + [k + 1] * 9, 2), ([0, k + 1, 0, k + 1, 3], 0)):
        flat, rows = flat_of(lens, gap)
        ids, lps = _rows_from_flat(flat, k, len(lens), skip_first=True)
        actual = [r[0][0] if r[0] else -5 for r in rows]
        own = _own_from_flat(flat, actual, len(lens))
        for j, (row_ids, vals) in enumerate(rows):
            top = list(zip(row_ids[1:], vals[1:]))[:k]
            np.testing.assert_array_equal(ids[j, : len(top)], [t for t, _ in top])
            np.testing.assert_allclose(lps[j, : len(top)], [v for _, v in top], rtol=1e-6)
            assert (ids[j, len(top):] == -1).all() and np.isneginf(lps[j, len(top):]).all()
            assert (np.isnan(own[j]) if not row_ids else own[j] == pytest.approx(vals[0], rel=1e-6))

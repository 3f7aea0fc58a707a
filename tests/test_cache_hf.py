"""`kdship cache` with the transformers backend (the reference): targets, refusals, inspect, config."""

import json
import time

import numpy as np
import pytest
import torch
import zarr
from typer.testing import CliRunner

from kdship.cache.inspect import inspect_store
from kdship.cache.run import CacheError, cache
from kdship.cli import app
from kdship.store import LOGPROB_MANTISSA_BITS, StoreReader

runner = CliRunner()
ENC_RTOL = 2.0 ** -(LOGPROB_MANTISSA_BITS + 1)  # BitRound's relative error bound


def _forward_logprobs(teacher, tokens):
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    with torch.no_grad():
        return torch.log_softmax(m(torch.as_tensor([tokens])).logits[0].float(), -1).numpy()


@pytest.fixture(scope="module")
def hf_be(tiny_teacher):
    """One transformers teacher for the generate tests (cache() accepts a ready backend); float32, as
    the forward the tests compare with (on CUDA the backend's default is bfloat16)."""
    from transformers import AutoTokenizer

    from kdship.cache.hf_backend import HFBackend

    return HFBackend(str(tiny_teacher), dtype="float32", eos_token_ids=[AutoTokenizer.from_pretrained(str(tiny_teacher)).eos_token_id])


@pytest.fixture(scope="module")
def hf_store(tmp_path_factory, tiny_teacher, corpus_dir):
    out = tmp_path_factory.mktemp("hf") / "store"
    summary = cache(str(tiny_teacher), str(corpus_dir / "chat.jsonl"), str(out), backend="hf", dtype="float32", targets="topk", top_k=16, shard_size=4, progress=False)
    return out, summary


def test_hf_store_matches_transformers_forward(hf_store, tiny_teacher):
    out, summary = hf_store
    assert summary["complete"] and summary["shards_written"] == 4 and summary["samples"] == 15
    r = StoreReader(str(out))
    s = next(r.iter_samples())
    lp = _forward_logprobs(tiny_teacher, s["tokens"].tolist())
    assert (s["topk_ids"][0] == -1).all() and np.isneginf(s["topk_logprobs"][0]).all()
    for j in range(1, len(s["tokens"])):
        want_ids = np.argsort(-lp[j - 1])[:16]
        np.testing.assert_array_equal(np.sort(s["topk_ids"][j]), np.sort(want_ids))
        got = s["topk_logprobs"][j]
        assert (np.diff(got) <= 0).all()  # sorted descending
        # lossy storage: BitRound keeps LOGPROB_MANTISSA_BITS mantissa bits -> relative error <= ENC_RTOL
        np.testing.assert_allclose(got, lp[j - 1][s["topk_ids"][j]], rtol=ENC_RTOL, atol=1e-6)


def test_inspect_json_and_text(hf_store):
    out, _ = hf_store
    info = inspect_store(str(out))
    assert info["samples"] == 15 and info["top_k"] == 16 and info["complete"] is True
    assert info["positions"] > info["targeted_positions"] > 0
    assert 0.0 < info["mean_topk_mass"] <= 1.0
    assert info["bytes_per_position"] > 0
    assert len(info["teacher"]["weights_sha256"]) == 64 and info["teacher"]["chat_template_sha256"]
    res = runner.invoke(app, ["inspect", str(out), "--json"])
    assert res.exit_code == 0, res.output
    assert json.loads(res.output)["samples"] == 15
    res = runner.invoke(app, ["inspect", str(out)])
    assert "complete=True" in res.output and "top-k mass" in res.output
    # 4-sample shards: inspect says they are small and how to get bigger ones
    assert info["mean_positions_per_shard"] == round(info["positions"] / info["shards_committed"])
    assert "small shards" in res.output and "--shard-positions" in res.output


def test_refusals(tmp_path, tiny_teacher, corpus_dir, hf_store):
    data = str(corpus_dir / "pairs.jsonl")
    with pytest.raises(CacheError, match="no such directory"):
        cache(str(tmp_path / "missing-teacher"), data, str(tmp_path / "a"), backend="hf", progress=False)
    with pytest.raises(CacheError, match=r"larger than the teacher's vocabulary \(\d+ tokens\)"):
        cache(str(tiny_teacher), data, str(tmp_path / "a"), backend="hf", top_k=100000, progress=False)
    # an existing store with other settings is refused, naming the setting
    out, _ = hf_store
    with pytest.raises(CacheError, match="top_k: store has 16, asked 8"):
        cache(str(tiny_teacher), str(corpus_dir / "chat.jsonl"), str(out), backend="hf", top_k=8, shard_size=4, progress=False)
    with pytest.raises(CacheError, match="data"):
        cache(str(tiny_teacher), data, str(out), backend="hf", top_k=16, shard_size=4, progress=False)
    # ... and so is another teacher precision: shards of a bf16 and a float32 teacher never mix
    args = dict(backend="hf", targets="topk", top_k=16, shard_size=4, progress=False)
    with pytest.raises(CacheError, match="compute_dtype: store has 'float32', asked 'bfloat16'"):
        cache(str(tiny_teacher), str(corpus_dir / "chat.jsonl"), str(out), dtype="bfloat16", **args)
    assert cache(str(tiny_teacher), str(corpus_dir / "chat.jsonl"), str(out), dtype="auto", **args)["complete"]  # auto is float32 on the CPU
    # score mode needs something to score
    with pytest.raises(CacheError, match=r"prompts\.jsonl:1: score mode needs"):
        cache(str(tiny_teacher), str(corpus_dir / "prompts.jsonl"), str(tmp_path / "b"), backend="hf", progress=False)
    res = runner.invoke(app, ["cache", str(tiny_teacher), data, "--out", str(tmp_path / "c"), "--backend", "hf", "--overflow", "wrap"])
    assert res.exit_code == 2 and "--overflow 'wrap'" in res.output
    res = runner.invoke(app, ["cache", str(tiny_teacher), data, "--out", str(tmp_path / "c"), "--backend", "hf", "--dtype", "fp8"])
    assert res.exit_code == 2 and "--dtype 'fp8'" in res.output


def test_a_store_from_before_compute_dtype_resumes(tmp_path, tiny_teacher, corpus_dir, hf_store):
    """Stores written before the header recorded the teacher's compute dtype resume as they always did."""
    import shutil

    import zarr

    from kdship.store import HEADER_ATTR

    old = tmp_path / "old"
    shutil.copytree(hf_store[0], old)
    root = zarr.open_group(str(old), mode="r+")
    h = dict(root.attrs[HEADER_ATTR])
    assert h.pop("compute_dtype") == "float32"
    root.attrs[HEADER_ATTR] = h
    s = cache(str(tiny_teacher), str(corpus_dir / "chat.jsonl"), str(old), backend="hf", dtype="bfloat16", targets="topk", top_k=16, shard_size=4, progress=False)
    assert s["complete"] and "compute_dtype" not in dict(zarr.open_group(str(old), mode="r").attrs[HEADER_ATTR])


def test_resume_refuses_another_teacher_or_chat_template(tmp_path, tiny_teacher, corpus_dir, hf_store):
    """Resuming a store with a teacher whose chat template or weights changed (same path, same
    vocabulary) is refused, naming the identity field; the store is left as it was."""
    import shutil

    from safetensors.torch import load_file, save_file
    from transformers import AutoTokenizer

    out, _ = hf_store
    before = sorted(p.name for p in (out / "commits").iterdir())
    args = dict(backend="hf", targets="topk", top_k=16, shard_size=4, progress=False)
    templated = tmp_path / "teacher_template"
    shutil.copytree(tiny_teacher, templated)
    tok = AutoTokenizer.from_pretrained(templated)
    assert "<|end|>\n" in tok.chat_template
    tok.chat_template = tok.chat_template.replace("<|end|>\n", "<|end|>\n\n")  # another turn separator
    tok.save_pretrained(templated)
    with pytest.raises(CacheError, match=r"teacher chat_template_sha256: store has '[0-9a-f]+', asked '[0-9a-f]+'"):
        cache(str(templated), str(corpus_dir / "chat.jsonl"), str(out), **args)
    reweighted = tmp_path / "teacher_weights"
    shutil.copytree(tiny_teacher, reweighted)
    w = load_file(reweighted / "model.safetensors")
    name = next(iter(w))
    w[name] = w[name] + 1e-3
    save_file(w, reweighted / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CacheError, match="teacher weights_sha256: store has") as err:
        cache(str(reweighted), str(corpus_dir / "chat.jsonl"), str(out), **args)
    assert "chat_template" not in str(err.value)  # only what differs is named
    assert sorted(p.name for p in (out / "commits").iterdir()) == before


def test_overflow_and_skip_bad(tmp_path, tiny_teacher, corpus_dir):
    data = tmp_path / "d.jsonl"
    long_text = " ".join(["the quick red dog runs over the hill"] * 20)
    data.write_bytes(b'{"text": "a small cat sees the river"}\n{"text": "' + long_text.encode() + b'"}\n{"text": ""}\nnot json\n{"text": "one two three"}\n')
    t = str(tiny_teacher)
    with pytest.raises(CacheError, match=r"d\.jsonl:3: field 'text' is empty"):
        cache(t, str(data), str(tmp_path / "s0"), backend="hf", max_length=32, progress=False)
    with pytest.raises(CacheError, match=r"d\.jsonl:2: \d+ tokens exceed --max-length \(32\)"):
        cache(t, str(data), str(tmp_path / "s0"), backend="hf", max_length=32, skip_bad=True, progress=False)
    s = cache(t, str(data), str(tmp_path / "s1"), backend="hf", max_length=32, skip_bad=True, overflow="skip", shard_size=2, progress=False)
    assert s["samples"] == 2 and s["rejects_in_store"] == 3
    rej = [json.loads(x) for x in (tmp_path / "s1" / "rejects.jsonl").read_text().splitlines()]
    assert [r["row"] for r in rej] == [1, 2, 3]
    assert rej[0]["reason"].startswith("overflow") and "empty" in rej[1]["reason"] and "malformed JSON" in rej[2]["reason"]
    assert inspect_store(str(tmp_path / "s1"))["rejects"] == 3
    s = cache(t, str(data), str(tmp_path / "s2"), backend="hf", max_length=32, skip_bad=True, overflow="truncate", progress=False)
    r = StoreReader(str(tmp_path / "s2"))
    lengths = [len(x["tokens"]) for x in r.iter_samples()]
    assert s["samples"] == 3 and max(lengths) == 32


def test_sampled_targets_exact_with_hf(tmp_path, tiny_teacher, corpus_dir):
    out = tmp_path / "sampled"
    s = cache(str(tiny_teacher), str(corpus_dir / "pairs.jsonl"), str(out), backend="hf", dtype="float32", targets="sampled", top_k=12, seed=3, progress=False)
    r = StoreReader(str(out))
    assert r.targets == "sampled" and r.header["target_sampling"]["exact"] is True
    shard = r.read_shard(r.shard_paths[0])
    w = shard.target_weights
    has = shard.topk_ids[:, 0] >= 0
    np.testing.assert_allclose(w[has].sum(1), 1.0, atol=1e-6)
    assert np.all((w * 12) == np.round(w * 12))  # counts / N
    assert np.all((shard.topk_ids >= 0) == (w > 0))
    # the stored logprob is the teacher's own for that id
    smp = shard.sample(0)
    lp = _forward_logprobs(tiny_teacher, smp["tokens"].tolist())
    j = 3
    v = smp["topk_ids"][j] >= 0
    np.testing.assert_allclose(smp["topk_logprobs"][j][v], lp[j - 1][smp["topk_ids"][j][v]], rtol=ENC_RTOL)
    # raw zarr sees the extra array; topk stores do not have it
    z = zarr.open_group(str(out), mode="r")
    assert z[f"{r.shard_paths[0]}/target_weights"].dtype == np.float32
    # a rerun with the same seed is identical
    cache(str(tiny_teacher), str(corpus_dir / "pairs.jsonl"), str(tmp_path / "again"), backend="hf", dtype="float32", targets="sampled", top_k=12, seed=3, progress=False)
    r2 = StoreReader(str(tmp_path / "again"))
    np.testing.assert_array_equal(r2.read_shard(r2.shard_paths[0]).topk_ids, shard.topk_ids)
    assert s["targeted_positions"] > 0


def test_topk_store_has_no_weights_and_file_url_and_config(tmp_path, tiny_teacher, corpus_dir):
    cfg = tmp_path / "run.yaml"
    cfg.write_text("backend: hf\ntargets: topk\ntop_k: 8\nshard_size: 7\nmax_length: 64\n")
    url = "file://" + str(tmp_path / "viaurl")
    res = runner.invoke(app, ["cache", str(tiny_teacher), str(corpus_dir / "text.jsonl"), "--out", url, "--config", str(cfg), "--top-k", "4", "--json", "--no-progress"])
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output[res.output.index("{") :])
    assert summary["top_k"] == 4 and summary["shards_total"] == 3  # flag beat the file; file beat defaults
    r = StoreReader(url)
    assert r.targets == "topk" and r.header["shard_size"] == 7
    assert r.read_shard(r.shard_paths[0]).target_weights is None
    # text rows: every position is targeted except row 0
    info = inspect_store(url)
    assert info["targeted_positions"] == info["positions"] - info["samples"]
    # resuming a complete store does no work
    res = runner.invoke(app, ["cache", str(tiny_teacher), str(corpus_dir / "text.jsonl"), "--out", url, "--config", str(cfg), "--top-k", "4", "--json", "--no-progress"])
    assert json.loads(res.output[res.output.index("{") :])["shards_written"] == 0
    bad = tmp_path / "bad.yaml"
    bad.write_text("topk: 3\n")
    res = runner.invoke(app, ["cache", str(tiny_teacher), str(corpus_dir / "text.jsonl"), "--out", str(tmp_path / "z"), "--config", str(bad)])
    assert res.exit_code == 2 and "unknown option(s) topk" in res.output


def test_generate_hf_reproducible_and_masked(tmp_path, tiny_teacher, corpus_dir, hf_be):
    kw = dict(backend="hf", mode="generate", targets="topk", samples=2, max_new_tokens=6, top_k=8, seed=5, temperature=1.0, progress=False, teacher_backend=hf_be)
    cache(str(tiny_teacher), str(corpus_dir / "prompts.jsonl"), str(tmp_path / "g1"), shard_size=4, **kw)
    cache(str(tiny_teacher), str(corpus_dir / "prompts.jsonl"), str(tmp_path / "g2"), shard_size=4, **kw)
    a = list(StoreReader(str(tmp_path / "g1")).iter_samples())
    b = list(StoreReader(str(tmp_path / "g2")).iter_samples())
    assert len(a) == 20 and [x["sample_index"] for x in a[:4]] == [0, 0, 1, 1]
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["tokens"], y["tokens"])
    # per-(row, sample) seeds: the two samples of a row are not copies of each other
    assert any(not np.array_equal(a[2 * i]["tokens"], a[2 * i + 1]["tokens"]) for i in range(10))
    s = a[0]
    gen = s["loss_mask"]
    assert gen.sum() >= 1 and not gen[0]
    assert (s["topk_ids"][~gen] == -1).all() and (s["topk_ids"][gen][:, 0] >= 0).all()
    # generated positions hold the raw (temperature-1) teacher distribution of the teacher-forced sequence
    lp = _forward_logprobs(tiny_teacher, s["tokens"].tolist())
    j = int(np.flatnonzero(gen)[0])
    np.testing.assert_allclose(s["topk_logprobs"][j], np.sort(lp[j - 1])[::-1][:8], rtol=ENC_RTOL, atol=1e-5)


def test_generate_filters_send_rejects_with_reasons(tmp_path, tiny_teacher, corpus_dir, hf_be):
    """The eval engineer's filter_generations is called on the generate path; rejects keep reasons."""
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"What is {i} plus {i}?", "answer": str(2 * i)}) + "\n" for i in range(4)))
    base = dict(backend="hf", mode="generate", samples=3, max_new_tokens=4, top_k=4, seed=0, shard_size=6, progress=False, teacher_backend=hf_be)
    # a random teacher never states the answer: every generation is rejected, none silently
    s = cache(str(tiny_teacher), str(data), str(tmp_path / "am"), filter="answer-match", **base)
    assert s["samples"] == 0 and s["rejects_in_store"] == 12
    assert set(s["rejects_by_reason"]) <= {"answer_mismatch", "no_answer"}
    rej = [json.loads(x) for x in (tmp_path / "am" / "rejects.jsonl").read_text().splitlines()]
    assert sorted((r["row"], r["sample"]) for r in rej) == [(i, j) for i in range(4) for j in range(3)]
    # length bounds: nothing is shorter than 1 token, everything is shorter than 100
    s = cache(str(tiny_teacher), str(data), str(tmp_path / "len"), min_new_tokens=100, **base)
    assert s["samples"] == 0 and s["rejects_by_reason"] == {"too_short": 12}
    s = cache(str(tiny_teacher), str(data), str(tmp_path / "ok"), min_new_tokens=1, dedupe=True, **base)
    assert s["samples"] + s["rejects_by_reason"].get("duplicate", 0) == 12
    # a filter that needs a reference answer refuses rows without one, naming the row
    with pytest.raises(CacheError, match=r"prompts\.jsonl:1: .*reference answer"):
        cache(str(tiny_teacher), str(corpus_dir / "prompts.jsonl"), str(tmp_path / "noref"), filter="answer-match", **base)


def test_format_md_example_reads_a_store_without_kdship(hf_store, tmp_path, run_isolated):
    """The reading example in cache/FORMAT.md runs as written, with zarr and numpy only."""
    import re
    from pathlib import Path

    md = (Path(__file__).resolve().parents[1] / "cache" / "FORMAT.md").read_text()
    code = re.search(r"## Reading a store without kdship\s+```python\n(.*?)```", md, re.S).group(1)
    assert "kdship" not in "".join(line for line in code.splitlines() if "import" in line)
    out, _ = hf_store
    code = code.replace("cache/mystore.zarr", str(out)) + "\nprint(len(committed), ids.shape)\n"
    res = run_isolated(code, tmp_path)
    assert res.returncode == 0, res.stderr
    assert res.stdout.split()[0] == "4" and "16)" in res.stdout


def test_plan_shards_by_positions():
    from kdship.cache.run import plan_shards

    # rows 2 and 5 were rejected (absent): they weigh nothing but stay inside a shard's row range
    positions = {0: 30, 1: 40, 3: 10, 4: 80, 6: 5, 7: 5}
    assert plan_shards(8, positions, 50) == [0, 2, 5]
    assert plan_shards(8, positions, 10**6) == [0]
    assert plan_shards(0, {}, 50) == [0]
    assert plan_shards(3, {0: 1, 1: 1, 2: 1}, 1) == [0, 1, 2]


def test_shards_planned_by_positions(tmp_path, tiny_teacher, corpus_dir):
    out = tmp_path / "by_positions"
    summary = cache(str(tiny_teacher), str(corpus_dir / "chat.jsonl"), str(out), backend="hf", top_k=8, shard_positions=120, progress=False)
    r = StoreReader(str(out))
    assert r.header["shard_positions"] == 120 and r.header["shard_size"] is None
    assert summary["complete"] and summary["shards_total"] == len(r.shard_paths) > 1
    rows = [r.shard_attrs(p)["rows"] for p in r.shard_paths]
    assert rows[0][0] == 0 and rows[-1][1] == r.header["data"]["num_records"]
    assert all(a[1] == b[0] for a, b in zip(rows, rows[1:]))  # consecutive, no row twice or lost
    for p in r.shard_paths[:-1]:  # every shard but the last reaches the target, and only with its last row
        sh = r.read_shard(p)
        last = int(sh.offsets[-1] - sh.offsets[-2])
        assert sh.num_positions >= 120 > sh.num_positions - last
    # the same store, sharded by samples, holds the same samples
    ref = tmp_path / "by_samples"
    cache(str(tiny_teacher), str(corpus_dir / "chat.jsonl"), str(ref), backend="hf", top_k=8, shard_size=4, progress=False)
    got = [s["tokens"].tolist() for s in r.iter_samples()]
    assert got == [s["tokens"].tolist() for s in StoreReader(str(ref)).iter_samples()]
    # resuming with the other layout is refused, naming the setting
    with pytest.raises(CacheError, match="shard_positions"):
        cache(str(tiny_teacher), str(corpus_dir / "chat.jsonl"), str(out), backend="hf", top_k=8, shard_positions=240, progress=False)


def test_bounded_groups_keep_order_and_the_entry_bound():
    from kdship.cache.run import MAX_ENTRIES_PER_CALL, _bounded_groups

    rng = np.random.default_rng(0)
    sizes = [int(x) for x in rng.integers(1, MAX_ENTRIES_PER_CALL // 3, 50)] + [MAX_ENTRIES_PER_CALL * 2]  # one row alone over the bound
    groups = list(_bounded_groups(list(range(len(sizes))), sizes))
    assert [i for g in groups for i in g] == list(range(len(sizes)))
    for g in groups:
        assert len(g) == 1 or sum(sizes[i] for i in g) <= MAX_ENTRIES_PER_CALL
    assert groups[-1] == [len(sizes) - 1]
    assert len(groups) < len(sizes)  # rows that fit together share a call


# --------------------------------------------------------------------------------------------------
# The background shard writer (kdship.cache.run._write_shards): same store as the sequential code,
# errors on either thread stop the run and nothing committed is lost.


class _CountingBackend:
    """A ready backend that counts its engine calls and can fail the n-th one (``fail_at``, 1-based)."""

    def __init__(self, inner, fail_at=None, exc=KeyboardInterrupt, store=None):
        self.inner, self.calls, self.fail_at, self.exc, self.store = inner, 0, fail_at, exc, store
        self.commits_at_fail = None

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def _count(self):
        self.calls += 1
        if self.calls == self.fail_at:
            self.commits_at_fail = _commits(self.store) if self.store else None
            raise self.exc(f"engine call {self.calls} interrupted")

    def score(self, *a, **kw):
        self._count()
        return self.inner.score(*a, **kw)

    def generate(self, *a, **kw):
        self._count()
        return self.inner.generate(*a, **kw)


def _stored(out):
    """Every shard's arrays as stored on disk (encoded) and its attributes (checksum, rejects, rows)."""
    root = zarr.open_group(str(out), mode="r")
    return {name: ({a: arr[...] for a, arr in g.arrays()}, dict(g.attrs)) for name, g in root["shards"].groups()}


def _assert_bit_identical(a, b):
    assert sorted(a) == sorted(b)
    for name in a:
        (xa, attrs_a), (xb, attrs_b) = a[name], b[name]
        assert attrs_a == attrs_b, name
        assert sorted(xa) == sorted(xb), name
        for n in xa:
            assert xa[n].dtype == xb[n].dtype and xa[n].tobytes() == xb[n].tobytes(), f"{name}/{n} differs"


def _commits(out):
    return sorted(p.name for p in (out / "commits").glob("*.json"))


def _writer_threads():
    import threading

    return [t for t in threading.enumerate() if t.name == "kdship-cache-writer"]


HT = dict(backend="hf", dtype="float32", progress=False)  # headtail, the default targets: draws from per-row seeded rngs


@pytest.fixture(scope="module")
def sequential_ref(tmp_path_factory, tiny_teacher, corpus_dir, hf_be):
    """chat.jsonl in 15 one-sample shards, written with the writer forced inline (the sequential code)."""
    import kdship.cache.run as run_mod

    out = tmp_path_factory.mktemp("seq") / "ref"
    mp = pytest.MonkeyPatch()
    mp.setattr(run_mod, "_BACKGROUND_WRITER", False)
    try:
        cache(str(tiny_teacher), str(corpus_dir / "chat.jsonl"), str(out), shard_size=1, teacher_backend=hf_be, **HT)
    finally:
        mp.undo()
    return _stored(out)


@pytest.mark.parametrize("mode", ["score", "generate"])
def test_background_writer_store_is_bit_identical_to_sequential(tmp_path, tiny_teacher, corpus_dir, hf_be, monkeypatch, mode):
    """Shards of several engine calls each, written on the writer thread, equal (encoded bytes, checksums,
    rejects) those written inline; generate mode with filters that reject some generations."""
    import threading

    import kdship.cache.run as run_mod
    from kdship.store import StoreWriter

    monkeypatch.setattr(run_mod, "MAX_ENTRIES_PER_CALL", 2 * 3 * 6 * 512)  # 1-2 rows per engine call: several per shard
    written_on = []
    real_write = StoreWriter.write_shard

    def recording_write(self, index, *a, **kw):
        written_on.append(threading.current_thread().name)
        return real_write(self, index, *a, **kw)

    monkeypatch.setattr(StoreWriter, "write_shard", recording_write)
    if mode == "score":
        data, kw = corpus_dir / "chat.jsonl", dict(shard_size=4)
    else:
        # near-greedy samples of a row repeat each other: --dedupe rejects some, not all; 4 rows per shard
        data, kw = corpus_dir / "prompts.jsonl", dict(mode="generate", samples=3, max_new_tokens=6, temperature=0.05, seed=2, shard_size=12, dedupe=True)
    runs = {}
    for background in (False, True):
        monkeypatch.setattr(run_mod, "_BACKGROUND_WRITER", background)
        be = _CountingBackend(hf_be)
        out = tmp_path / f"bg{int(background)}"
        s = cache(str(tiny_teacher), str(data), str(out), teacher_backend=be, **HT, **kw)
        runs[background] = out, s, be.calls, written_on[:]
        written_on.clear()
    (seq, s_seq, calls, on_seq), (bg, s_bg, calls_bg, on_bg) = runs[False], runs[True]
    assert s_bg["complete"] and s_bg["shards_written"] == s_seq["shards_written"] > 1
    assert calls == calls_bg > s_bg["shards_written"]  # several engine calls per shard
    assert set(on_seq) == {"MainThread"} and set(on_bg) == {"kdship-cache-writer"}  # the knob does what it says
    _assert_bit_identical(_stored(seq), _stored(bg))
    assert (seq / "rejects.jsonl").read_text() == (bg / "rejects.jsonl").read_text()
    for key in ("samples", "positions", "targeted_positions", "generated_tokens", "rejects_by_reason", "missing_mass"):
        assert s_seq[key] == s_bg[key], key
    if mode == "generate":
        assert s_bg["rejects_this_run"] > 0 and s_bg["samples"] > 0  # the filters did reject some, not all
    assert s_bg["writer_busy_seconds"] > 0 and s_bg["writer_stall_seconds"] >= 0
    assert s_seq["writer_stall_seconds"] >= s_seq["writer_busy_seconds"] > 0  # inline, the engine waits for all of it
    assert not _writer_threads()


@pytest.mark.timeout(300)  # a writer that died must not leave the engine thread blocked on a full queue
def test_writer_error_stops_the_run_and_resume_completes_identically(tmp_path, tiny_teacher, corpus_dir, hf_be, monkeypatch, sequential_ref):
    import traceback

    import kdship.cache.run as run_mod
    from kdship.store import StoreWriter

    real_write = StoreWriter.write_shard
    n = {"writes": 0}

    def failing_write(self, index, *a, **kw):
        n["writes"] += 1
        if n["writes"] == 2:
            raise RuntimeError(f"injected write fault on shard {index}")
        return real_write(self, index, *a, **kw)

    monkeypatch.setattr(StoreWriter, "write_shard", failing_write)
    out, be = tmp_path / "s", _CountingBackend(hf_be)
    with pytest.raises(RuntimeError, match="injected write fault on shard 1") as err:
        cache(str(tiny_teacher), str(corpus_dir / "chat.jsonl"), str(out), shard_size=1, teacher_backend=be, **HT)
    # the writer thread's own frames are in the traceback re-raised on the caller's thread
    assert "failing_write" in [f.name for f in traceback.extract_tb(err.value.__traceback__)]
    assert _commits(out) == ["s000000.json"]  # shard 0 stays committed; nothing after the failed one
    # the engine stopped promptly (one call, two messages per shard here): at most the queue's slack ahead
    # of the failed shard 1, not all 15 shards
    assert be.calls <= 2 + run_mod.WRITER_QUEUE
    assert not _writer_threads() and n["writes"] == 2
    monkeypatch.setattr(StoreWriter, "write_shard", real_write)
    s = cache(str(tiny_teacher), str(corpus_dir / "chat.jsonl"), str(out), shard_size=1, teacher_backend=hf_be, **HT)
    assert s["complete"] and s["shards_skipped"] == 1 and s["shards_written"] == 14
    _assert_bit_identical(sequential_ref, _stored(out))


@pytest.mark.timeout(300)
def test_engine_interrupt_commits_the_queued_shards_and_joins_the_writer(tmp_path, tiny_teacher, corpus_dir, hf_be, monkeypatch, sequential_ref):
    """Ctrl-C (or any error) on the engine thread: the shards already queued whole are still committed,
    the writer thread is joined before the exception leaves cache(), and a rerun completes the store."""
    from kdship.store import StoreWriter

    real_write = StoreWriter.write_shard

    def slow_write(self, *a, **kw):  # the writer lags: shards 0 and 1 are still queued when the engine stops
        time.sleep(1.0)
        return real_write(self, *a, **kw)

    monkeypatch.setattr(StoreWriter, "write_shard", slow_write)
    out = tmp_path / "s"
    be = _CountingBackend(hf_be, fail_at=3, store=out)
    with pytest.raises(KeyboardInterrupt, match="engine call 3 interrupted"):
        cache(str(tiny_teacher), str(corpus_dir / "chat.jsonl"), str(out), shard_size=1, teacher_backend=be, **HT)
    assert be.commits_at_fail == []  # nothing was committed yet when the engine thread stopped ...
    assert not _writer_threads()
    assert _commits(out) == ["s000000.json", "s000001.json"]  # ... the two shards queued whole were, before cache() returned
    assert StoreReader(str(out)).complete is False
    monkeypatch.setattr(StoreWriter, "write_shard", real_write)
    s = cache(str(tiny_teacher), str(corpus_dir / "chat.jsonl"), str(out), shard_size=1, teacher_backend=hf_be, **HT)
    assert s["complete"] and s["shards_skipped"] == 2
    _assert_bit_identical(sequential_ref, _stored(out))

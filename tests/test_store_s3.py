"""Stores on an object store: a real S3-compatible server (moto's server mode) on 127.0.0.1, s3fs.

Many writers commit shards of one store at once (no lock exists on S3), writers are killed
mid-shard and rerun, `kdship cache` writes and `kdship train` reads over s3://: every shard is
committed exactly once and the arrays equal a single writer's local store.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from kdship.store import COMMITS_DIR, Shard, StoreReader, StoreWriter
from s3_stores import BUCKET, assert_same_arrays, cache_cmd, store_arrays

HEADER = {
    "mode": "score", "top_k": 4, "targets": "topk", "teacher": {"name_or_path": "t"}, "sampling": {}, "logprobs_mode": "raw_logprobs",
    "max_length": 64, "overflow": "error", "data": {}, "shard_size": 1,
}  # fmt: skip


def _synthetic_shard(index: int) -> Shard:
    rng = np.random.default_rng(index)
    L = 6
    lp = np.sort(np.log(rng.dirichlet(np.ones(4), size=L)).astype(np.float32), axis=1)[:, ::-1].copy()
    ids = rng.integers(0, 100, size=(L, 4)).astype(np.int32)
    ids[0], lp[0] = -1, -np.inf
    return Shard.build([dict(tokens=rng.integers(0, 100, L), loss_mask=np.ones(L, bool), topk_ids=ids, topk_logprobs=lp, sample_index=index)], 4)


WRITER = textwrap.dedent(
    """
    import sys, numpy as np
    sys.path.insert(0, {tests!r})
    from test_store_s3 import HEADER, _synthetic_shard
    from kdship.store import StoreWriter
    url, first, step, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
    w = StoreWriter(url, HEADER)
    for i in range(first, n, step):
        w.write_shard(i, _synthetic_shard(i))
    """
)


def test_concurrent_writers_lose_no_commit(s3):
    """3 processes commit 12 shards of one S3 store at once: with a header list read-modified-written
    by each writer, commits made at the same moment overwrite each other; with records none is lost."""
    url = f"s3://{BUCKET}/concurrent"
    code = WRITER.format(tests=os.path.dirname(__file__))
    procs = [subprocess.Popen([sys.executable, "-c", code, url, str(i), "3", "12"], env=s3["env"], stderr=subprocess.PIPE, text=True) for i in range(3)]
    for p in procs:
        _, err = p.communicate(timeout=300)
        assert p.returncode == 0, err[-2000:]
    r = StoreReader(url)
    assert r.shard_paths == [f"shards/s{i:06d}" for i in range(12)]
    assert [s["sample_index"] for s in r.iter_samples()] == list(range(12))  # checksums verified on read
    records = s3["fs"].ls(f"{BUCKET}/concurrent/{COMMITS_DIR}", detail=False)
    assert len(records) == 12
    rec = json.loads(s3["fs"].cat(records[0]))
    assert rec["shard"] == "shards/s000000" and rec["num_samples"] == 1


def test_commit_refused_when_settings_changed_under_the_writer(s3):
    url = f"s3://{BUCKET}/changed"
    w = StoreWriter(url, HEADER)
    w.write_shard(0, _synthetic_shard(0))
    StoreWriter(url, dict(HEADER, top_k=8), overwrite=True)  # another writer re-creates it differently
    with pytest.raises(Exception, match="settings changed"):
        w.write_shard(1, _synthetic_shard(1))
    assert "flask" not in sys.modules  # the S3 server is another process (tests/s3_stores.py: Flask here breaks vLLM)


def test_cache_over_s3_concurrent_killed_and_rerun_then_train(s3, tmp_path, tiny_teacher, tiny_student, corpus_dir):
    """`kdship cache` into s3://: 3 concurrent writers (--num-shards 3), and one writer SIGKILLed after
    its first commits then rerun; both stores equal a single local writer's, shard by shard. Then
    `kdship train` reads the S3 store."""
    from kdship.cache.run import cache

    rows = [json.loads(line) for line in (corpus_dir / "text.jsonl").read_text().splitlines()[:6]]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    ref = tmp_path / "ref"
    cache(str(tiny_teacher), str(data), str(ref), backend="hf", shard_size=1, progress=False)
    ref_arrays = store_arrays(ref)
    assert len(ref_arrays) == 6

    url = f"s3://{BUCKET}/three"
    procs = [subprocess.Popen(cache_cmd(tiny_teacher, data, url, "--num-shards", "3", "--shard-index", str(i)), env=s3["env"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for i in range(3)]  # fmt: skip
    for p in procs:
        _, err = p.communicate(timeout=600)
        assert p.returncode == 0, err[-2000:]
    r = StoreReader(url)
    assert r.complete
    assert_same_arrays(ref_arrays, store_arrays(url))

    killed = f"s3://{BUCKET}/killed"
    records = f"{BUCKET}/killed/{COMMITS_DIR}"

    def n_records():
        s3["fs"].invalidate_cache(records)
        return len(s3["fs"].ls(records, detail=False)) if s3["fs"].exists(records) else 0

    p = subprocess.Popen(cache_cmd(tiny_teacher, data, killed), env=s3["env"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.time()
    while n_records() < 2 and p.poll() is None and time.time() - t0 < 300:
        time.sleep(0.05)
    os.kill(p.pid, signal.SIGKILL)
    p.wait()
    n_at_kill = n_records()
    assert 2 <= n_at_kill < 6, f"the kill came too late ({n_at_kill} shards committed)"
    assert not StoreReader(killed).complete
    res = subprocess.run(cache_cmd(tiny_teacher, data, killed, "--json"), env=s3["env"], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-2000:]
    summary = json.loads(res.stdout[res.stdout.rindex('{\n "store"') :])
    assert summary["shards_skipped"] == n_at_kill and summary["complete"] is True
    assert_same_arrays(ref_arrays, store_arrays(killed))

    from kdship.train.trainer import train

    s = train(url, student=str(tiny_student), out=str(tmp_path / "run"), max_steps=2, batch_tokens=64, eval_every=0, ckpt_every=0, progress=False)
    assert s["steps"] == 2 and s["tokens"] > 0
    losses = [json.loads(line)["loss"] for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines() if '"loss"' in line]
    assert losses and all(np.isfinite(losses))

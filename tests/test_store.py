"""The store schema: round trip, checksums, settings refusal, fsspec URLs, raw-zarr readability."""

import json

import numpy as np
import pytest
import zarr

from kdship.store import LOGPROB_MANTISSA_BITS, Shard, StoreError, StoreReader, StoreWriter, sample_hash

ENC_RTOL = 2.0 ** -(LOGPROB_MANTISSA_BITS + 1)  # BitRound's relative error bound
HEADER = {
    "mode": "score",
    "top_k": 4,
    "targets": "topk",
    "teacher": {"name_or_path": "t"},
    "sampling": {},
    "logprobs_mode": "raw_logprobs",
    "max_length": 64,
    "overflow": "error",
    "data": {},
    "shard_size": 2,
}


def _samples(n, k=4, seed=0):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        L = 5 + i
        lp = np.sort(np.log(rng.dirichlet(np.ones(k), size=L)).astype(np.float32), axis=1)[:, ::-1].copy()
        ids = rng.integers(0, 100, size=(L, k)).astype(np.int32)
        ids[0], lp[0] = -1, -np.inf
        out.append(dict(tokens=rng.integers(0, 100, L), loss_mask=rng.random(L) < 0.7, topk_ids=ids, topk_logprobs=lp, sample_index=10 + i))
    return out


def test_round_trip_and_raw_zarr(tmp_path):
    url = str(tmp_path / "s")
    samples = _samples(3)
    w = StoreWriter(url, HEADER)
    w.write_shard(0, Shard.build(samples[:2], 4))
    w.write_shard(1, Shard.build(samples[2:], 4), rejects=[{"row": 5, "reason": "empty text"}])
    assert w.rebuild_rejects() == 1
    r = StoreReader(url)
    assert r.shard_paths == ["shards/s000000", "shards/s000001"]
    got = list(r.iter_samples())
    assert [g["sample_index"] for g in got] == [10, 11, 12]
    for g, s in zip(got, samples):
        np.testing.assert_array_equal(g["tokens"], s["tokens"])
        np.testing.assert_array_equal(g["topk_ids"], s["topk_ids"])
        np.testing.assert_array_equal(g["loss_mask"], s["loss_mask"])
        assert np.isneginf(g["topk_logprobs"][0]).all()
        # lossy logprob encoding: relative error bounded by the kept mantissa bits
        np.testing.assert_allclose(g["topk_logprobs"][1:], s["topk_logprobs"][1:], rtol=ENC_RTOL)
    # readable with zarr alone, decoded to float32 by zarr's own codecs
    z = zarr.open_group(url, mode="r")
    assert z["shards/s000001/topk_logprobs"].dtype == np.float32
    assert json.loads((tmp_path / "s" / "rejects.jsonl").read_text().splitlines()[0])["row"] == 5
    np.testing.assert_array_equal(z["shards/s000000/sample_hash"][0], sample_hash(samples[0]["tokens"]))


def test_checksum_detects_corruption(tmp_path):
    url = str(tmp_path / "s")
    w = StoreWriter(url, HEADER)
    w.write_shard(0, Shard.build(_samples(2), 4))
    z = zarr.open_group(url, mode="r+")
    z["shards/s000000/tokens"][0] = 99999
    with pytest.raises(StoreError, match="checksum"):
        StoreReader(url).read_shard("shards/s000000")


def test_refuses_other_settings_and_fsspec_url(tmp_path):
    url = str(tmp_path / "s")
    StoreWriter(url, HEADER).write_shard(0, Shard.build(_samples(1), 4))
    with pytest.raises(StoreError, match="top_k"):
        StoreWriter(url, dict(HEADER, top_k=8))
    # same settings re-open (resume) and an fsspec URL to the same store
    assert StoreWriter("file://" + url, HEADER).committed() == ["shards/s000000"]
    assert StoreReader("file://" + url).num_samples() == 1
    with pytest.raises(StoreError, match="no kdship store"):
        StoreReader(str(tmp_path / "nothing"))


def test_default_encoding_kl_error_below_1e3(tmp_path):
    """The lossy logprob encoding keeps the decoded top-k within 1e-3 nat KL of the exact one."""
    rng = np.random.default_rng(0)
    k, L = 32, 400
    logits = rng.normal(size=(L, 512)) * 3  # peaked, like a real teacher's
    lp = logits - np.log(np.exp(logits).sum(1, keepdims=True))
    top = np.sort(lp, axis=1)[:, ::-1][:, :k].astype(np.float32)
    ids = np.argsort(-lp, axis=1)[:, :k].astype(np.int32)
    w = StoreWriter(str(tmp_path / "s"), dict(HEADER, top_k=k))
    w.write_shard(0, Shard.build([dict(tokens=np.arange(L), loss_mask=np.ones(L, bool), topk_ids=ids, topk_logprobs=top, sample_index=0)], k))
    dec = StoreReader(str(tmp_path / "s")).read_shard("shards/s000000").topk_logprobs.astype(np.float64)

    def norm(x):
        e = np.exp(x - x.max(1, keepdims=True))
        return e / e.sum(1, keepdims=True)

    p, q = norm(top.astype(np.float64)), norm(dec)
    kl = (p * (np.log(p) - np.log(q))).sum(1)
    assert kl.max() < 1e-3 and kl.mean() > 0  # lossy, but within the bound

"""Hint (feature) KD from the store: `kdship cache --hidden-layers --hidden-dim` and `kdship train --hint-weight`.

Real stores written by `kdship cache --backend hf` from the tiny teacher (2 blocks, hidden 128),
real transformers forwards as the reference, real training runs of the tiny 1-block student.
"""

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import zarr
from safetensors.torch import load_file
from typer.testing import CliRunner

from kdship.cache.run import CacheError, StoreMismatch, cache
from kdship.cache.inspect import inspect_store
from kdship.cli import app
from kdship.store import HIDDEN_QMAX, PROJECTION_GROUP, StoreReader, dequantize_hidden, shard_path
from kdship.tiny import synthetic_sentences, write_jsonl
from kdship.train.hint import HintHead, resolve_hint_map
from kdship.train.trainer import HINT_MAP_FILE, TrainError, train

LAYERS = [1, 2]  # after block 1, and after block 2 (= after the final norm)
FAST = dict(progress=False, ce_weight=0.0, heldout_fraction=0.0, batch_tokens=4096, lr=3e-3, warmup_steps=1, eval_every=0)


@pytest.fixture(scope="module")
def hint_data(tmp_path_factory):
    sents = synthetic_sentences(48, seed=11)
    path = tmp_path_factory.mktemp("hintdata") / "text.jsonl"
    write_jsonl(path, [{"text": " ".join(sents[i : i + 4])} for i in range(0, 48, 4)])  # 12 rows
    return path


def _cache(teacher, data, out, dim, **kw):
    return cache(str(teacher), str(data), str(out), backend="hf", shard_size=6, hidden_layers=",".join(map(str, LAYERS)), hidden_dim=dim, progress=False, **kw)


@pytest.fixture(scope="module")
def full_dim_store(tmp_path_factory, tiny_teacher, hint_data):
    out = tmp_path_factory.mktemp("hint_full") / "store"
    _cache(tiny_teacher, hint_data, out, 128)
    return out


@pytest.fixture(scope="module")
def small_dim_store(tmp_path_factory, tiny_teacher, hint_data):
    out = tmp_path_factory.mktemp("hint_small") / "store"
    _cache(tiny_teacher, hint_data, out, 16)
    return out


def _teacher_states(teacher, tokens) -> np.ndarray:
    """[L, len(LAYERS), H] from one plain transformers forward."""
    from transformers import AutoModelForCausalLM

    m = AutoModelForCausalLM.from_pretrained(teacher, dtype=torch.float32).eval()
    with torch.no_grad():
        hs = m(torch.as_tensor([tokens]), output_hidden_states=True).hidden_states
    return torch.stack([hs[layer][0] for layer in LAYERS], 1).numpy()


def _stored(store):
    """(reader, first shard, its first sample's slice, decoded stored values [T, L, D], scales [T, L])."""
    r = StoreReader(str(store), with_hidden=True)
    shard = r.read_shard(r.shard_paths[0])
    a, b = int(shard.offsets[0]), int(shard.offsets[1])
    return r, shard, (a, b), dequantize_hidden(shard.hidden_states, shard.hidden_scales)[a:b], shard.hidden_scales[a:b].astype(np.float32)


def test_full_dim_store_reconstructs_the_teacher_hidden_states(full_dim_store, tiny_teacher):
    r, shard, (a, b), y, scales = _stored(full_dim_store)
    proj = r.projection()
    assert proj.components.shape == (2, 128, 128) and r.hidden_states["layers"] == LAYERS
    np.testing.assert_allclose(proj.components[0] @ proj.components[0].T, np.eye(128), atol=1e-5)  # a rotation
    want = _teacher_states(tiny_teacher, shard.tokens[a:b].tolist())  # [L, layers, H]
    got = proj.reconstruct(y)
    assert not y[0].any()  # row 0 predicts nothing: stored as 0
    # row j holds the state at position j - 1; int8 error <= scale / 2 per value, a rotation keeps the norm
    err = np.linalg.norm(got[1:] - want[:-1], axis=-1)
    bound = 0.5 * scales[1:] * np.sqrt(128) * 1.01 + 1e-4
    assert (err <= bound).all(), (err / bound).max()
    rel = err / np.linalg.norm(want[:-1], axis=-1)
    assert rel.max() < 0.02 and rel.mean() < 0.01  # the encoding's error is small against the states


def test_small_dim_store_holds_the_projection_of_a_transformers_forward(small_dim_store, tiny_teacher):
    r, shard, (a, b), y, scales = _stored(small_dim_store)
    proj = r.projection()
    assert proj.components.shape == (2, 16, 128) and proj.variance.shape == (2, 16)
    assert (np.diff(proj.variance, axis=1) <= 0).all()  # principal components, largest first
    want = proj.project(_teacher_states(tiny_teacher, shard.tokens[a:b].tolist()))[:-1]
    err = np.abs(y[1:] - want).max(-1)
    assert (err <= 0.5 * scales[1:] * 1.01 + 1e-5).all()
    assert (np.abs(shard.hidden_states) <= HIDDEN_QMAX).all() and (np.abs(shard.hidden_states).max(-1)[a + 1 : b] == HIDDEN_QMAX).all()
    info = inspect_store(str(small_dim_store))
    hs = info["hidden_states"]
    assert hs["layers"] == LAYERS and hs["dim"] == 16 and hs["bytes_per_position"] > 0 and hs["projection_bytes"] > 0
    res = CliRunner().invoke(app, ["inspect", str(small_dim_store)])
    assert res.exit_code == 0 and "hidden states    layers [1, 2] projected 128 -> 16" in res.output


def test_a_store_without_hidden_states_reads_as_before(tmp_path, tiny_teacher, hint_data):
    out = tmp_path / "plain"
    cache(str(tiny_teacher), str(hint_data), str(out), backend="hf", shard_size=6, progress=False)
    r = StoreReader(str(out), with_hidden=True)
    assert "hidden_states" not in r.header and r.projection() is None
    assert r.read_shard(r.shard_paths[0]).hidden_states is None
    assert inspect_store(str(out))["hidden_states"] is None


def test_resume_uses_the_stored_projection(tmp_path, tiny_teacher, hint_data, small_dim_store):
    part = tmp_path / "part"
    s = _cache(tiny_teacher, hint_data, part, 16, num_shards=2, shard_index=0)  # shard 0 only: a stopped run
    assert s["shards_written"] == 1 and not s["complete"]
    one_go = StoreReader(str(small_dim_store), with_hidden=True)
    resumed = StoreReader(str(part), with_hidden=True)
    np.testing.assert_array_equal(resumed.read_shard(shard_path(0)).hidden_states, one_go.read_shard(shard_path(0)).hidden_states)
    # flip the stored projection's signs: a resumed run that refitted would not see it, one that reads it must
    comps = zarr.open_array(str(part / PROJECTION_GROUP / "components"), mode="r+")
    flipped = -np.asarray(comps[...])
    comps[...] = flipped
    with pytest.raises(StoreMismatch, match="hidden_states"):
        _cache(tiny_teacher, hint_data, part, 8)  # other --hidden-dim: refused like any setting
    s = _cache(tiny_teacher, hint_data, part, 16)
    assert s["shards_written"] == 1 and s["complete"]
    resumed = StoreReader(str(part), with_hidden=True)
    np.testing.assert_array_equal(resumed.projection().components, flipped)  # unchanged by the resume
    a, b = resumed.read_shard(shard_path(1)), one_go.read_shard(shard_path(1))
    np.testing.assert_array_equal(a.hidden_states, -b.hidden_states)  # symmetric int8: negation is exact
    np.testing.assert_array_equal(a.hidden_scales, b.hidden_scales)


@pytest.mark.parametrize("backend", ["vllm", "openai"])
def test_backends_without_hidden_states_refuse_before_any_engine(tmp_path, tiny_teacher, hint_data, backend):
    out = tmp_path / "store"
    t0 = time.time()
    with pytest.raises(CacheError, match="--hidden-layers needs --backend hf") as e:
        cache(str(tiny_teacher), str(hint_data), str(out), backend=backend, teacher_url="http://127.0.0.1:9/v1", targets="topk",
              hidden_layers="1", hidden_dim=8, progress=False)
    assert "hidden states" in str(e.value) and time.time() - t0 < 5 and not out.exists()
    res = CliRunner().invoke(app, ["cache", str(tiny_teacher), str(hint_data), "--out", str(out), "--backend", backend, "--hidden-layers", "1", "--hidden-dim", "8",
                                       "--teacher-url", "http://127.0.0.1:9/v1", "--targets", "topk"])
    assert res.exit_code == 2 and "--backend hf" in res.output


def test_bad_hidden_options_are_refused(tmp_path, tiny_teacher, hint_data):
    with pytest.raises(CacheError, match="go together"):
        cache(str(tiny_teacher), str(hint_data), str(tmp_path / "a"), backend="hf", hidden_layers="1", progress=False)
    with pytest.raises(CacheError, match=r"hidden states 0\.\.2.*\[3\]"):
        cache(str(tiny_teacher), str(hint_data), str(tmp_path / "b"), backend="hf", hidden_layers="1,3", hidden_dim=8, progress=False)
    with pytest.raises(CacheError, match=r"--hidden-dim 129: must be in 1\.\.128"):
        cache(str(tiny_teacher), str(hint_data), str(tmp_path / "c"), backend="hf", hidden_layers="1", hidden_dim=129, progress=False)


def test_hint_loss_matches_a_reference():
    torch.manual_seed(0)
    variance = np.array([[4.0, 1.0], [2.0, 2.0]], np.float32)
    hidden = tuple(torch.randn(2, 5, 3) for _ in range(3))  # embeddings + 2 blocks, [R, C, H]
    pred_index = torch.tensor([0, 3, 6, 9])
    rows = type("Rows", (), {"hint_targets": torch.randn(4, 2, 2), "row_weight": torch.tensor([0.1, 0.2, 0.3, 0.4])})()
    for kind in ("mse", "cosine"):
        head = HintHead([(1, 4), (2, 8)], [4, 8], variance, 3, 2, kind, weight=1.0)
        got = head(hidden, pred_index, rows).item()
        want = 0.0
        for p, (s, ti) in enumerate([(1, 0), (2, 1)]):
            h = hidden[s].reshape(-1, 3)[pred_index].double().numpy()
            a = h @ head.maps[p].weight.detach().double().numpy().T + head.maps[p].bias.detach().double().numpy()
            t = rows.hint_targets[:, ti].double().numpy()
            if kind == "mse":
                row = ((a - t) ** 2).sum(1) / variance[ti].sum()
            else:
                row = 1 - (a * t).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(t, axis=1))
            want += (rows.row_weight.double().numpy() * row).sum() / 2
        assert abs(got - want) < 1e-5, (kind, got, want)


def test_default_map_pairs_layers_proportionally():
    assert resolve_hint_map(None, [0, 10, 20, 30], 30, 6, "s") == [(0, 0), (2, 10), (4, 20), (6, 30)]
    assert resolve_hint_map(None, [1, 2], 2, 2, "s") == [(1, 1), (2, 2)]
    assert resolve_hint_map("1:2,0:1", [1, 2], 2, 1, "s") == [(1, 2), (0, 1)]


def _records(run: Path) -> list[dict]:
    return [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]


def test_train_with_hints_logs_a_falling_hint_loss_resumes_and_exports_the_plain_student(small_dim_store, tiny_student, tmp_path):
    from transformers import AutoModelForCausalLM

    # 12 short samples and 4096 batch tokens: every step trains on the same (whole) batch
    kw = dict(max_steps=20, ckpt_every=5, hint_weight=1.0, **FAST)
    full = train(str(small_dim_store), student=str(tiny_student), out=str(tmp_path / "full"), **kw)
    recs = _records(tmp_path / "full")
    assert all("hint" in r and "kd" in r for r in recs) and len(recs) == 20
    hints = [r["hint"] for r in recs]
    assert hints[-1] < 0.85 * hints[0] and sum(b < a for a, b in zip(hints, hints[1:])) >= 15, hints  # measured: 1.07 -> 0.79
    assert abs(recs[0]["loss"] - (recs[0]["kd"] + recs[0]["hint"])) < 1e-5  # loss = KD + W * hint (ce_weight 0)
    assert (tmp_path / "full" / "checkpoints" / "step_0000015" / HINT_MAP_FILE).is_file()
    # resume: a session stopped at step 8; the maps come back from the step-5 checkpoint
    train(str(small_dim_store), student=str(tiny_student), out=str(tmp_path / "cut"), stop_after=8, **kw)
    import shutil

    shutil.rmtree(tmp_path / "cut" / "checkpoints" / "step_0000008")
    s2 = train(str(small_dim_store), student=str(tiny_student), out=str(tmp_path / "cut"), resume=True, **kw)
    assert s2["resumed_from"].endswith("step_0000005")
    np.testing.assert_allclose([r["hint"] for r in _records(tmp_path / "cut")], [r["hint"] for r in recs], rtol=1e-5)
    np.testing.assert_allclose([r["loss"] for r in _records(tmp_path / "cut")], [r["loss"] for r in recs], rtol=1e-5)
    # final/ is the student alone: loads in transformers, no hint keys
    final = Path(full["final"])
    keys = set(load_file(str(final / "model.safetensors")))
    assert keys == set(load_file(str(Path(tiny_student) / "model.safetensors"))) and not any("hint" in k or "maps" in k for k in keys)
    AutoModelForCausalLM.from_pretrained(final)


def test_hint_weight_refusals(tmp_path, tiny_teacher, tiny_student, hint_data, small_dim_store):
    plain = tmp_path / "plain"
    cache(str(tiny_teacher), str(hint_data), str(plain), backend="hf", shard_size=6, progress=False)
    with pytest.raises(TrainError, match="holds no teacher hidden states") as e:
        train(str(plain), student=str(tiny_student), out=str(tmp_path / "r0"), max_steps=1, hint_weight=1.0, **FAST)
    assert str(plain) in str(e.value) and "--hidden-layers" in str(e.value) and "--backend hf" in str(e.value)
    with pytest.raises(TrainError, match=r"holds teacher hidden states at layers \[1, 2\] only, not 5"):
        train(str(small_dim_store), student=str(tiny_student), out=str(tmp_path / "r1"), max_steps=1, hint_weight=1.0, hint_map="1:5", **FAST)
    with pytest.raises(TrainError, match=r"the student has hidden states 0\.\.1"):
        train(str(small_dim_store), student=str(tiny_student), out=str(tmp_path / "r2"), max_steps=1, hint_weight=1.0, hint_map="3:1", **FAST)

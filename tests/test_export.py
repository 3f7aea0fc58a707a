"""`kdship export` on the tiny student: layout, verification report, ONNX runtime behaviour, bad input."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from kdship.export.onnx import ExportError
from kdship.runtime.onnx import OnnxCausalLM, OnnxModelError, position_ids_from_mask
from kdship.export.run import export


@pytest.fixture(scope="module")
def teacher_store(tmp_path_factory, tiny_teacher, corpus_dir):
    """A real store from the tiny teacher (plain transformers backend: no second vLLM engine)."""
    from kdship.cache.run import cache

    out = tmp_path_factory.mktemp("export_store") / "store.zarr"
    cache(str(tiny_teacher), str(corpus_dir / "text.jsonl"), str(out), mode="score", top_k=16, backend="hf", progress=False)
    return out


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_student, teacher_store):
    """One full export (hf + onnx + int8, verified, vLLM check, KL on the store), shared by the tests."""
    out = tmp_path_factory.mktemp("export") / "student"
    report = export(tiny_student, out, formats="hf,onnx", quantize="int8", verify=True, store=str(teacher_store), heldout_fraction=0.5, prompts=6, new_tokens=12)
    return out, report


def _torch_model(path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def test_layout_and_report(exported):
    out, report = exported
    assert (out / "hf" / "model.safetensors").is_file() and (out / "hf" / "generation_config.json").is_file()
    assert not list((out / "hf").glob("*.bin"))
    meta = json.loads((out / "onnx" / "kdship_onnx.json").read_text())
    assert meta["files"] == {"fp32": "model.onnx", "int8": "model.int8.onnx"}
    assert meta["num_layers"] == 1 and meta["num_kv_heads"] == 1 and meta["head_dim"] == 64
    assert meta["input_names"][:3] == ["input_ids", "attention_mask", "position_ids"] and meta["output_names"][0] == "logits"
    assert (out / "onnx" / "tokenizer.json").is_file()
    on_disk = json.loads((out / "export_report.json").read_text())
    assert on_disk["passed"] is True and report["passed"] is True
    v = on_disk["verify"]
    assert v["onnx"]["max_abs_logit_diff"] < 1e-3
    assert v["onnx"]["greedy_identical"] == v["onnx"]["greedy_prompts"] == 6
    assert v["hf"]["max_abs_logit_diff"] < 1e-5
    # int8 drifts (reported, not gated), but it must still be the same model: its argmax agrees on most
    # teacher-forced steps, a greedy run leaves PyTorch's path only where PyTorch's top two logits lie
    # closer than int8's own logit error, and its distribution gives nearly the same KL (checked below)
    q = v["onnx_int8"]
    assert q["finite"] and 0.0 < q["max_abs_logit_diff"] < 1.0
    assert q["top1_agreement"] >= 0.75, q
    for d in q["divergences"]:
        assert d["pytorch_top2_gap"] <= 2 * q["max_abs_logit_diff"], d
    # vLLM loaded the hf folder as it is and reproduced PyTorch's greedy tokens
    assert "skipped" not in v["vllm"], v["vllm"]
    assert v["vllm"]["greedy_identical"] == 6 and v["vllm"]["max_abs_logprob_diff"] < 1e-3
    kl = v["kl_to_teacher"]
    assert kl["positions"] > 0
    for name in ("pytorch", "onnx", "onnx_int8", "vllm"):
        assert math.isfinite(kl[name]) and kl[name] > 0, name
    # the fp32 formats compute the same function, so the same KL
    assert abs(kl["onnx"] - kl["pytorch"]) < 1e-3 and abs(kl["vllm"] - kl["pytorch"]) < 1e-3
    assert abs(kl["onnx_int8"] - kl["pytorch"]) < 0.01 * kl["pytorch"]


def test_onnx_left_padded_batch_equals_unpadded_and_pytorch(exported, tiny_student):
    import torch

    out, _ = exported
    lm = OnnxCausalLM(out / "onnx")
    prompts = [[5, 17, 40, 33, 9, 21, 8], [61, 3], [100, 200, 300, 12]]
    batch = lm.generate(prompts, 10, stop_token_ids=[])
    single = [lm.generate([p], 10, stop_token_ids=[])[0] for p in prompts]
    assert batch == single
    model = _torch_model(tiny_student)
    for p, got in zip(prompts, batch):
        ref = model.generate(torch.tensor([p]), attention_mask=torch.ones(1, len(p), dtype=torch.long), max_new_tokens=10, min_new_tokens=10, do_sample=False)
        assert got == ref[0, len(p) :].tolist()


def test_incremental_decode_equals_full_forward(exported, tiny_student):
    """Prefill on a left-padded prefix, then one token at a time: same logits as one full pass."""
    import torch

    out, _ = exported
    lm = OnnxCausalLM(out / "onnx")
    rng = np.random.default_rng(0)
    seqs = [rng.integers(10, lm.vocab_size, n).tolist() for n in (12, 7)]
    ids, mask = lm.left_pad(seqs)
    b, T = ids.shape
    full, _ = lm.forward(ids, mask, position_ids_from_mask(mask, T), lm.new_past(b))
    k = 8  # prefix length (padded batch coordinates)
    logits, past = lm.forward(ids[:, :k], mask[:, :k], position_ids_from_mask(mask[:, :k], k), lm.new_past(b))
    steps = [logits]
    for t in range(k, T):
        m = mask[:, : t + 1]
        logits, past = lm.forward(ids[:, t : t + 1], m, position_ids_from_mask(m, 1), past)
        steps.append(logits)
    inc = np.concatenate(steps, axis=1)
    real = mask.astype(bool)
    assert past[0].shape == (b, lm.num_kv_heads, T, lm.head_dim)
    np.testing.assert_allclose(inc[real], full[real], atol=1e-4)
    # and the padded row equals the same sequence run alone in PyTorch
    model = _torch_model(tiny_student)
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([seqs[1]])).logits[0].numpy()
    np.testing.assert_allclose(inc[1, T - len(seqs[1]) :], ref, atol=1e-3)


def test_int8_runs_and_is_smaller(exported):
    out, report = exported
    q = OnnxCausalLM(out / "onnx", int8=True)
    toks = q.generate([[5, 6, 7], [8]], 6, stop_token_ids=[])
    assert [len(t) for t in toks] == [6, 6] and all(0 <= t < q.vocab_size for row in toks for t in row)
    assert (out / "onnx" / "model.int8.onnx").stat().st_size < (out / "onnx" / "model.onnx").stat().st_size
    assert report["int8"]["int8_bytes"] < report["int8"]["fp32_bytes"]


def test_no_spin_session_sleeps_idle_threads_and_decodes_the_same(exported):
    out, _ = exported
    quiet = OnnxCausalLM(out / "onnx", num_threads=2, spin=False)
    assert quiet.session.get_session_options().get_session_config_entry("session.intra_op.allow_spinning") == "0"
    assert quiet.generate([[5, 6, 7], [8]], 8, stop_token_ids=[]) == OnnxCausalLM(out / "onnx").generate([[5, 6, 7], [8]], 8, stop_token_ids=[])


def test_sampling_is_seeded_and_eos_stops(exported):
    out, _ = exported
    lm = OnnxCausalLM(out / "onnx")
    a = lm.generate([[5, 6, 7]], 12, temperature=1.0, top_p=0.9, seed=3, stop_token_ids=[])
    b = lm.generate([[5, 6, 7]], 12, temperature=1.0, top_p=0.9, seed=3, stop_token_ids=[])
    assert a == b
    greedy = lm.generate([[5, 6, 7]], 12, stop_token_ids=[])[0]
    stop = greedy[3]
    cut = lm.generate([[5, 6, 7]], 12, stop_token_ids=[stop])[0]
    assert cut == greedy[: greedy.index(stop) + 1]


def test_topk_kl_matches_full_kl_when_k_is_vocab():
    from kdship.divergence import topk_rest_kl

    rng = np.random.default_rng(0)
    lt = rng.normal(size=(4, 10)); lt -= np.log(np.exp(lt).sum(-1, keepdims=True))
    ls = rng.normal(size=(4, 10)); ls -= np.log(np.exp(ls).sum(-1, keepdims=True))
    full = (np.exp(lt) * (lt - ls)).sum(-1)
    ids = np.tile(np.arange(10), (4, 1))
    np.testing.assert_allclose(topk_rest_kl(ids, lt, ls), full, atol=1e-9)
    assert np.allclose(topk_rest_kl(ids[:, :3], lt[:, :3], lt[:, :3]), 0.0)
    assert (topk_rest_kl(ids[:, :3], lt[:, :3], ls[:, :3]) > 0).all()


def test_run_folder_resolves_to_final(tmp_path, tiny_student):
    import shutil

    from kdship.export.hf import resolve_model_dir

    run = tmp_path / "run"
    shutil.copytree(tiny_student, run / "final")
    assert resolve_model_dir(run) == run / "final"
    assert resolve_model_dir(tiny_student) == tiny_student


def test_bad_input_errors(tmp_path, tiny_student, exported):
    from typer.testing import CliRunner

    from kdship.cli import app

    with pytest.raises(ExportError, match="RUN_DIR not found"):
        export(tmp_path / "missing", tmp_path / "o")
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "ckpt-10").mkdir()
    with pytest.raises(ExportError, match="ckpt-10"):
        export(tmp_path / "empty", tmp_path / "o")
    with pytest.raises(ExportError, match="unknown format"):
        export(tiny_student, tmp_path / "o", formats="hf,gguf")
    with pytest.raises(ExportError, match="add onnx"):
        export(tiny_student, tmp_path / "o", formats="hf", quantize="int8")
    with pytest.raises(ExportError, match="--quantize int4"):
        export(tiny_student, tmp_path / "o", quantize="int4")
    with pytest.raises(ExportError, match="no kdship store"):
        export(tiny_student, tmp_path / "o", store=str(tmp_path / "nostore"))
    with pytest.raises(OnnxModelError, match="kdship_onnx.json"):
        OnnxCausalLM(tmp_path / "empty")
    out, _ = exported
    lm = OnnxCausalLM(out / "onnx")
    with pytest.raises(ValueError, match="attention_mask"):
        lm.forward(np.zeros((1, 3), np.int64), np.ones((1, 2), np.int64), np.zeros((1, 3), np.int64), lm.new_past(1))
    with pytest.raises(ValueError, match="exceeds"):
        lm.generate([[1, 2]], lm.max_length)
    res = CliRunner().invoke(app, ["export", str(tmp_path / "missing"), "--out", str(tmp_path / "o")])
    assert res.exit_code == 2 and "RUN_DIR not found" in res.output
    res = CliRunner().invoke(app, ["export", str(tiny_student), "--out", str(tmp_path / "o"), "--format", "tflite"])
    assert res.exit_code == 2 and "tflite" in res.output
    cfg = tmp_path / "export.yaml"
    cfg.write_text("out: /tmp/x\nquantise: int8\n")
    res = CliRunner().invoke(app, ["export", str(tiny_student), "--config", str(cfg)])
    assert res.exit_code == 2 and "quantise" in res.output and str(cfg) in res.output


def test_cli_export_onnx_only(tmp_path, tiny_student):
    from typer.testing import CliRunner

    from kdship.cli import app

    out = tmp_path / "cli"
    res = CliRunner().invoke(app, ["export", str(tiny_student), "--out", str(out), "--format", "onnx", "--prompts", "3", "--new-tokens", "4"])
    assert res.exit_code == 0, res.output
    assert (out / "onnx" / "model.onnx").is_file() and not (out / "hf").exists()
    assert "onnx fp32" in res.output and json.loads((out / "export_report.json").read_text())["passed"]


def test_export_of_a_run_measures_kl_on_the_runs_heldout_samples(tmp_path, tiny_student, teacher_store):
    """`kdship export RUN` with nothing retyped: the store and the held-out rule come from the run manifest."""
    from kdship.heldout import heldout_mask
    from kdship.run_manifest import read_manifest
    from kdship.store import StoreReader
    from kdship.train.trainer import train

    run = tmp_path / "run"
    train(str(teacher_store), student=str(tiny_student), out=str(run), max_steps=1, heldout_fraction=0.5, eval_every=0, ckpt_every=0,
          batch_tokens=256, progress=False)
    m = read_manifest(run)
    assert m is not None and m.store == str(teacher_store) and m.heldout_fraction == 0.5 and read_manifest(run / "final") == m
    report = export(run, tmp_path / "out", formats="onnx", prompts=2, new_tokens=4, vllm=False)
    kl = report["verify"]["kl_to_teacher"]
    assert kl["store"] == str(teacher_store) and "fraction=0.5" in kl["heldout_rule"]
    held = sum(int(heldout_mask(sh.sample_hash, 0.5).sum()) for _, sh in StoreReader(str(teacher_store)).iter_shards())
    assert 0 < kl["samples"] <= held and kl["onnx"] >= 0

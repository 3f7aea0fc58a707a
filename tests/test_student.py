"""`kdship student`: depth + width pruning of tiny local Llama teachers, loaded back and trained."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from kdship.student.run import student
from kdship.student.width import StudentError
from kdship.tiny import build_tiny_llama, synthetic_sentences

from train_stores import write_teacher_store

PROMPT = [[5, 17, 40, 33, 9, 21, 8, 60, 2, 99]]


def _load(path):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32).eval()


def _logits(path_or_model):
    import torch

    model = _load(path_or_model) if isinstance(path_or_model, (str, Path)) else path_or_model
    with torch.no_grad():
        return model(torch.tensor(PROMPT)).logits


def _edited_teacher(src: Path, dst: Path, edit) -> Path:
    """A copy of ``src`` whose weights ``edit(model)`` changed in place (tokenizer shared)."""
    import torch
    from transformers import AutoTokenizer

    model = _load(src)
    with torch.no_grad():
        edit(model)
    model.save_pretrained(dst, safe_serialization=True)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return dst


@pytest.fixture(scope="module")
def calib(corpus_dir):
    return str(corpus_dir / "text.jsonl")


@pytest.fixture(scope="module")
def gqa_teacher(tmp_path_factory, tiny_teacher):
    """3 layers, hidden 128, 4 query heads in 2 KV groups (head_dim 32), tied embeddings."""
    return build_tiny_llama(
        tmp_path_factory.mktemp("gqa") / "t", hidden=128, layers=3, heads=4, kv_heads=2, seed=2, tokenizer_dir=tiny_teacher, tie_embeddings=True
    )


def test_nothing_pruned_keeps_the_teachers_function_exactly(tiny_teacher, calib, tmp_path):
    import torch
    from safetensors.torch import load_file

    info = student(tiny_teacher, tmp_path / "s", layers=2, hidden=128, intermediate=256, heads=2, calibration=calib, progress=False)
    assert info["kept_layers"] == [0, 1] and info["strategy"] == "none" and info["student_params"] == info["teacher_params"]
    torch.testing.assert_close(_logits(tmp_path / "s"), _logits(tiny_teacher), rtol=0, atol=1e-6)
    t, s = load_file(str(tiny_teacher / "model.safetensors")), load_file(str(tmp_path / "s" / "model.safetensors"))
    assert t.keys() == s.keys() and all(torch.equal(t[k], s[k]) for k in t)


def test_pruned_shapes_load_run_and_keep_the_top_head_of_each_group(gqa_teacher, calib, tmp_path):
    import torch
    from transformers import AutoTokenizer

    out = tmp_path / "s"
    info = student(gqa_teacher, out, layers=2, hidden=64, intermediate=100, heads=2, calibration=calib, hidden_basis="channels", progress=False)
    cfg = json.loads((out / "config.json").read_text())
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"]) == (2, 64, 100)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (2, 2, 32)
    model = _load(out)
    assert model.lm_head.weight.shape == model.model.embed_tokens.weight.shape == (cfg["vocab_size"], 64)
    assert torch.equal(model.lm_head.weight, model.model.embed_tokens.weight)  # still tied
    assert torch.isfinite(_logits(model)).all()
    assert AutoTokenizer.from_pretrained(out).get_vocab() == AutoTokenizer.from_pretrained(gqa_teacher).get_vocab()
    heads = info["width"]["heads"]
    assert heads["mode"] == "within_groups" and heads["kv_heads"] == [[0, 1], [0, 1]]
    for scores, kept in zip(heads["scores"], heads["query_heads"]):  # per KV group (query heads 0-1, 2-3): its best head
        assert kept == [max((0, 1), key=lambda h: scores[h]), max((2, 3), key=lambda h: scores[h])]
    on_disk = json.loads((out / "kdship_prune.json").read_text())
    assert {"kept_layers", "strategy", "student_params", "block_influence", "width"} <= on_disk.keys()
    assert on_disk["student_params"] < on_disk["teacher_params"] and len(on_disk["width"]["hidden"]["channels"]) == 64


def test_width_pruning_drops_silent_neurons_and_keeps_the_output(tiny_teacher, calib, tmp_path):
    """Neurons whose gate/up/down weights are zero contribute nothing: they are the ones pruned, exactly."""
    silent = {0: [3, 50, 51, 200], 1: [0, 7, 100, 255]}

    def zero_neurons(model):
        for i, idx in silent.items():
            mlp = model.model.layers[i].mlp
            mlp.gate_proj.weight[idx] = 0
            mlp.up_proj.weight[idx] = 0
            mlp.down_proj.weight[:, idx] = 0

    teacher = _edited_teacher(tiny_teacher, tmp_path / "t", zero_neurons)
    info = student(teacher, tmp_path / "s", layers=2, intermediate=252, calibration=calib, progress=False)
    kept = info["width"]["intermediate"]["neurons"]
    for i, idx in silent.items():
        assert kept[i] == [j for j in range(256) if j not in idx]
    import torch

    torch.testing.assert_close(_logits(tmp_path / "s"), _logits(teacher), rtol=0, atol=1e-5)


def test_width_pruning_drops_silent_channels_and_heads(tiny_teacher, calib, tmp_path):
    """A residual channel nothing writes and a head whose values are zero are pruned; the output stays
    (up to RMSNorm's eps: the norm weights are rescaled for the narrower mean)."""
    mha = build_tiny_llama(tmp_path / "mha", hidden=128, layers=2, heads=4, kv_heads=4, seed=3, tokenizer_dir=tiny_teacher)
    channels = list(range(40, 72))  # 32 of 128

    def silence(model):
        model.model.embed_tokens.weight[:, channels] = 0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[channels] = 0
            layer.mlp.down_proj.weight[channels] = 0
            layer.self_attn.v_proj.weight[32:64] = 0  # head 1 (its own KV head: multi-head attention)

    teacher = _edited_teacher(mha, tmp_path / "t", silence)
    info = student(teacher, tmp_path / "s", layers=2, hidden=96, heads=3, calibration=calib, hidden_basis="channels", progress=False)
    w = info["width"]
    assert w["hidden"]["channels"] == [c for c in range(128) if c not in channels]
    assert w["heads"]["mode"] == "whole_groups" and w["heads"]["query_heads"] == [[0, 2, 3]] * 2 == w["heads"]["kv_heads"]
    import torch

    torch.testing.assert_close(_logits(tmp_path / "s"), _logits(teacher), rtol=1e-3, atol=1e-3)
    # the principal basis finds the same 96-dimensional subspace even when it is not a set of channels:
    # rotate the silenced teacher's residual stream by a random orthogonal matrix first
    g = torch.Generator().manual_seed(0)
    R, _ = torch.linalg.qr(torch.randn(128, 128, generator=g, dtype=torch.float64))

    def rotate(model):
        for i, layer in enumerate(model.model.layers):
            for norm, projs in ((layer.input_layernorm, (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj)),
                                (layer.post_attention_layernorm, (layer.mlp.gate_proj, layer.mlp.up_proj))):
                for lin in projs:
                    lin.weight.copy_(((lin.weight.double() * norm.weight.double()[None, :]) @ R).float())
                norm.weight.fill_(1.0)
            for lin in (layer.self_attn.o_proj, layer.mlp.down_proj):
                lin.weight.copy_((R.T @ lin.weight.double()).float())
        model.lm_head.weight.copy_(((model.lm_head.weight.double() * model.model.norm.weight.double()[None, :]) @ R).float())
        model.model.norm.weight.fill_(1.0)
        model.model.embed_tokens.weight.copy_((model.model.embed_tokens.weight.double() @ R).float())

    mixed = _edited_teacher(teacher, tmp_path / "t_rot", rotate)
    torch.testing.assert_close(_logits(mixed), _logits(teacher), rtol=1e-4, atol=1e-4)  # the same function
    student(mixed, tmp_path / "s_ch", layers=2, hidden=96, calibration=calib, hidden_basis="channels", progress=False)
    info = student(mixed, tmp_path / "s_pca", layers=2, hidden=96, calibration=calib, progress=False)
    assert info["width"]["hidden_basis"]["basis"] == "pca" and info["width"]["hidden_basis"]["variance_share_by_width"][64] < 1.0
    torch.testing.assert_close(_logits(tmp_path / "s_pca"), _logits(teacher), rtol=1e-3, atol=1e-3)
    assert (_logits(tmp_path / "s_ch") - _logits(teacher)).abs().max() > 0.05  # channels cannot: every channel carries some of it


def test_rotation_keeps_the_function_and_sorts_the_residual_variance(gqa_teacher, calib):
    """rotate_hidden: norms folded and set to 1, lm_head untied, logits unchanged; the residual covariance in
    the new basis is diagonal with decreasing variance, and its top-k channels keep at least the variance
    of the best k channels of the old basis (PCA is the best k-dimensional subspace)."""
    import torch

    from kdship.student.calibration import calibration_sequences
    from kdship.student.rotate import residual_covariance, rotate_hidden
    from transformers import AutoTokenizer

    model = _load(gqa_teacher)
    batches, _ = calibration_sequences(calib, AutoTokenizer.from_pretrained(gqa_teacher), 512, 64)
    rotated, info = rotate_hidden(model, batches)
    assert not rotated.config.tie_word_embeddings and rotated.lm_head.weight.data_ptr() != rotated.model.embed_tokens.weight.data_ptr()
    assert all(torch.equal(n.weight, torch.ones_like(n.weight)) for layer in rotated.model.layers for n in (layer.input_layernorm, layer.post_attention_layernorm))
    torch.testing.assert_close(_logits(rotated), _logits(model), rtol=1e-4, atol=1e-4)
    before, after = residual_covariance(model, batches), residual_covariance(rotated, batches)
    d = after.diagonal()
    assert (d[:-1] >= d[1:] - 1e-5 * d.max()).all() and (after - torch.diag(d)).abs().max() < 1e-4 * d.max()
    for k in (16, 32, 64):
        best_channels = before.diagonal().sort(descending=True).values[:k].sum() / before.diagonal().sum()
        assert d[:k].sum() / d.sum() >= best_channels - 1e-5


def test_impossible_shapes_are_refused_naming_the_flag(tiny_teacher, calib, tmp_path):
    from transformers import GPT2Config

    bad = [
        (dict(layers=0), "--layers 0"),
        (dict(layers=3), "--layers 3"),
        (dict(layers=2, hidden=100), "--hidden 100: must be a multiple of the teacher's head_dim 64"),
        (dict(layers=2, hidden=256), "--hidden 256"),
        (dict(layers=2, intermediate=999), "--intermediate 999"),
        (dict(layers=2, heads=3), "--heads 3"),
    ]
    for kw, msg in bad:
        with pytest.raises(StudentError, match=msg):
            student(tiny_teacher, tmp_path / "s", calibration=calib, **kw)
    with pytest.raises(StudentError, match="--calibration is required"):
        student(tiny_teacher, tmp_path / "s", layers=1)
    with pytest.raises(StudentError, match="--calibration .*missing.jsonl: not found"):
        student(tiny_teacher, tmp_path / "s", layers=1, calibration=str(tmp_path / "missing.jsonl"))
    GPT2Config(n_layer=2).save_pretrained(tmp_path / "gpt2")
    with pytest.raises(StudentError, match="model_type 'gpt2'"):
        student(tmp_path / "gpt2", tmp_path / "s", layers=1, hidden=64, calibration=calib)
    assert not (tmp_path / "s").exists()


def test_cli_help_config_override_and_bad_shape(tiny_teacher, corpus_dir, tmp_path):
    from typer.testing import CliRunner

    from kdship.cli import app

    r = subprocess.run([sys.executable, "-m", "kdship", "student", "--help"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "--intermediate" in r.stdout and "--calibration" in r.stdout
    r = CliRunner().invoke(app, ["student", str(tiny_teacher), "--out", str(tmp_path / "s"), "--layers", "2", "--hidden", "100", "--calibration", str(corpus_dir / "text.jsonl")])
    assert r.exit_code == 2 and "--hidden 100" in r.output
    # calibration from a kdship store; the YAML's intermediate is overridden by the flag
    store = write_teacher_store(tiny_teacher, tmp_path / "store", synthetic_sentences(12, seed=5), top_k=4)
    cfg = tmp_path / "student.yaml"
    cfg.write_text(f"layers: 1\nintermediate: 128\ncalibration: {store}\nprogress: false\n")
    r = CliRunner().invoke(app, ["student", str(tiny_teacher), "--out", str(tmp_path / "s"), "--config", str(cfg), "--intermediate", "64"])
    assert r.exit_code == 0, r.output
    shape = json.loads((tmp_path / "s" / "config.json").read_text())
    assert (shape["num_hidden_layers"], shape["intermediate_size"]) == (1, 64)
    assert json.loads((tmp_path / "s" / "kdship_prune.json").read_text())["calibration"] == f"store {store}"
    cfg.write_text("layers: 1\nlayer: 2\n")
    r = CliRunner().invoke(app, ["student", str(tiny_teacher), "--out", str(tmp_path / "s2"), "--config", str(cfg)])
    assert r.exit_code == 2 and "layer" in r.output and str(cfg) in r.output


@pytest.fixture(scope="module")
def pruned(tmp_path_factory, tiny_teacher, calib):
    """Depth and width pruned: 1 layer, hidden 64, one head of 64 (vLLM's CPU kernels take head_dim 64)."""
    out = tmp_path_factory.mktemp("pruned") / "s"
    student(tiny_teacher, out, layers=1, hidden=64, intermediate=96, heads=1, calibration=calib, progress=False)
    return out


def test_train_accepts_the_pruned_student(pruned, tiny_teacher, tmp_path):
    from kdship.train.trainer import train

    sents = synthetic_sentences(90, seed=4)
    store = write_teacher_store(tiny_teacher, tmp_path / "store", [" ".join(sents[i : i + 3]) for i in range(0, 90, 3)], top_k=8)
    s = train(str(store), student=str(pruned), out=str(tmp_path / "run"), max_steps=2, eval_every=0, progress=False, batch_tokens=256)
    assert s["steps"] == 2 and Path(s["final"], "model.safetensors").is_file()
    assert json.loads(Path(s["final"], "config.json").read_text())["hidden_size"] == 64


def test_onnx_export_and_vllm_load_the_pruned_student(pruned, tmp_path):
    from kdship.export.run import export

    report = export(pruned, tmp_path / "exp", formats="hf,onnx", verify=True, prompts=3, new_tokens=6)
    v = report["verify"]
    assert report["passed"] and v["onnx"]["max_abs_logit_diff"] < 1e-3 and v["onnx"]["greedy_identical"] == 3
    assert "skipped" not in v["vllm"], v["vllm"]
    assert v["vllm"]["greedy_identical"] == 3 and v["vllm"]["max_abs_logprob_diff"] < 1e-3


def test_hidden_that_the_heads_do_not_divide_is_refused_before_pruning():
    """SmolLM2-135M's shape (576 = 9 heads x 64, 3 KV groups): --hidden 256 --heads 3 passes the head_dim
    and GQA checks but transformers' config refuses it at load time, so kdship refuses it up front."""
    from transformers import LlamaConfig

    from kdship.student.run import check_shapes

    tcfg = LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, head_dim=64, intermediate_size=1536, num_hidden_layers=30)
    with pytest.raises(StudentError, match=r"--hidden 256 with --heads 3: .*choose --heads among \[\]"):
        check_shapes(tcfg, 12, 256, 768, 3)
    with pytest.raises(StudentError, match=r"--hidden 384 with --heads 9: .*choose --heads among \[3, 6\]"):
        check_shapes(tcfg, 6, 384, None, None)
    check_shapes(tcfg, 6, 384, 1024, 6)  # the shapes bench/student_frontier.py prunes to
    check_shapes(tcfg, 12, 192, 768, 3)

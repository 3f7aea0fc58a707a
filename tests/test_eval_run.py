"""kdship eval end to end on the tiny teacher/student: every reported figure re-derived independently
(a plain transformers forward / generate, the per-item file, the metric functions)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from typer.testing import CliRunner

from kdship.answers import extract_answer
from kdship.eval import metrics as M
from kdship.eval.run import evaluate, parse_model_specs
from kdship.tiny import synthetic_sentences, write_jsonl


@pytest.fixture(scope="module")
def hf(tiny_teacher, tiny_student):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    load = lambda d: AutoModelForCausalLM.from_pretrained(d, dtype=torch.float32).eval()  # noqa: E731
    return {"teacher": load(tiny_teacher), "kd": load(tiny_student), "tok": AutoTokenizer.from_pretrained(tiny_teacher)}


def _logsoftmax(model, ids):
    import torch

    with torch.inference_mode():
        return torch.log_softmax(model(torch.tensor([list(ids)])).logits[0].double(), -1).numpy()


def _items(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]


def test_lm_perplexity_kl_retention_against_direct_forward(tiny_teacher, tiny_student, corpus_dir, tmp_path, hf):
    from kdship.render import render_score
    from kdship.data import read_rows

    ood = write_jsonl(tmp_path / "ood.jsonl", [{"text": "Quantum chromodynamics describes quarks and gluons."}, {"text": "Zebras juggled seventeen umbrellas quietly."}])
    out = tmp_path / "rep"
    rep = evaluate({"kd": str(tiny_student)}, data=str(corpus_dir / "pairs.jsonl"), teacher=str(tiny_teacher), ood=str(ood), perturb="typo", out=str(out), batch_size=4, progress=False)
    assert rep["task"] == "lm" and list(rep["splits"]) == ["id", "ood", "typo"]
    # recompute NLL and full-vocabulary KL on the id split with plain transformers
    rows, _ = read_rows(corpus_dir / "pairs.jsonl")
    nll = {"teacher": 0.0, "kd": 0.0}
    kl, n = 0.0, 0
    for r in rows:
        toks, mask = render_score(r, hf["tok"])
        pos = np.nonzero(mask)[0]
        pos = pos[pos >= 1]
        lt, ls = _logsoftmax(hf["teacher"], toks)[pos - 1], _logsoftmax(hf["kd"], toks)[pos - 1]
        nll["teacher"] -= lt[np.arange(len(pos)), toks[pos]].sum()
        nll["kd"] -= ls[np.arange(len(pos)), toks[pos]].sum()
        kl += (np.exp(lt) * (lt - ls)).sum()
        n += len(pos)
    m = rep["splits"]["id"]["metrics"]
    for name in ("teacher", "kd"):
        assert m[name]["tokens"] == n
        assert m[name]["perplexity"] == pytest.approx(math.exp(nll[name] / n), rel=1e-4)
    assert m["kd"]["kl_to_teacher"] == pytest.approx(kl / n, rel=1e-4)
    assert "kl_to_teacher" not in m["teacher"]
    # retention: raw ratio student/teacher, oriented retention teacher/student for perplexity
    ret = rep["retention"]["id"]["kd"]["perplexity"]
    assert ret["higher_is_better"] is False
    assert ret["ratio"] == pytest.approx(m["kd"]["perplexity"] / m["teacher"]["perplexity"])
    assert ret["retention"] == pytest.approx(m["teacher"]["perplexity"] / m["kd"]["perplexity"])
    assert rep["splits"]["ood"]["items"] == 2
    # the files a person reads
    md = (out / "report.md").read_text()
    assert "| `kd` |" in md and "perplexity" in md and "lower is better" in md
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((out / "report.json").read_text())["splits"]["id"]["metrics"]["kd"]["perplexity"] == pytest.approx(m["kd"]["perplexity"])


def test_lm_kl_from_a_teacher_store(tiny_teacher, tiny_student, corpus_dir, tmp_path):
    from kdship.cache.run import cache

    store = tmp_path / "t.zarr"
    cache(str(tiny_teacher), str(corpus_dir / "text.jsonl"), str(store), backend="hf", top_k=16, progress=False)
    live = evaluate({"kd": str(tiny_student)}, data=str(corpus_dir / "text.jsonl"), teacher=str(tiny_teacher), perturb=None, out=str(tmp_path / "live"), progress=False)
    st = evaluate({"teacher": str(tiny_teacher), "kd": str(tiny_student)}, data=str(corpus_dir / "text.jsonl"), teacher=str(store), perturb=None, out=str(tmp_path / "st"), progress=False)
    assert "store" in st["kl_source"]
    ms, ml = st["splits"]["id"]["metrics"], live["splits"]["id"]["metrics"]
    assert ms["kd"]["kl_tokens"] == ml["kd"]["tokens"]  # every row matched by its sample hash
    assert "kl_unmatched_items" not in ms["kd"]
    # the (k+1)-bin KL is a lower bound of the full KL, and the teacher vs its own store is ~0
    assert 0 < ms["kd"]["kl_to_teacher"] <= ml["kd"]["kl_to_teacher"] + 1e-9
    assert ms["teacher"]["kl_to_teacher"] < 1e-3
    # the store itself as data: the same token sequences, so the same perplexity
    sd = evaluate({"kd": str(tiny_student)}, data=str(store), perturb="typo", out=str(tmp_path / "sd"), progress=False)
    assert list(sd["splits"]) == ["id"] and "skipped" in sd["perturbations_skipped"]  # token ids: nothing to misspell
    assert sd["splits"]["id"]["metrics"]["kd"]["perplexity"] == pytest.approx(ml["kd"]["perplexity"], rel=1e-5)
    assert sd["splits"]["id"]["metrics"]["kd"]["kl_to_teacher"] == pytest.approx(ms["kd"]["kl_to_teacher"], rel=1e-5)


def test_answer_task_exact_match_and_attack_success(tiny_teacher, tiny_student, tmp_path, hf):
    import torch

    tok, teacher = hf["tok"], hf["teacher"]
    prompts = synthetic_sentences(24, seed=5)
    # find prompts whose greedy teacher continuation holds a number (independently of kdship eval:
    # one left-padded transformers generate call)
    enc = [tok(p)["input_ids"] for p in prompts]
    L = max(map(len, enc))
    ids = torch.tensor([[tok.pad_token_id] * (L - len(e)) + e for e in enc])
    mask = torch.tensor([[0] * (L - len(e)) + [1] * len(e) for e in enc])
    with torch.inference_mode():
        g = teacher.generate(input_ids=ids, attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id)
    found = []
    for p, row in zip(prompts, g[:, L:].tolist()):
        row = row[: row.index(tok.eos_token_id)] if tok.eos_token_id in row else row
        ans = extract_answer(tok.decode(row, skip_special_tokens=True))
        if ans is not None and len(found) < 2:
            found.append((p, ans))
    assert found, "no greedy continuation of the tiny teacher holds a number"
    rows = [{"prompt": p, "answer": f"#### {a}"} for p, a in found] + [{"prompt": p, "answer": "#### 123456789"} for p, _ in found]
    data = write_jsonl(tmp_path / "ans.jsonl", rows)
    out = tmp_path / "rep"
    rep = evaluate({"kd": str(tiny_student)}, data=str(data), teacher=str(tiny_teacher), perturb="typo,distractor", out=str(out), max_new_tokens=12, progress=False)
    m = rep["splits"]["id"]["metrics"]
    assert m["teacher"]["exact_match"] == pytest.approx(len(found) / len(rows))
    items = _items(out)
    for split in ("id", "typo", "distractor"):
        for name in ("teacher", "kd"):
            its = [i for i in items if i["split"] == split and i["model"] == name]
            assert len(its) == len(rows)
            for i in its:  # every verdict re-derived from the stored generation
                assert i["correct"] == (extract_answer(i["generation"]) is not None and extract_answer(i["generation"]) == i["reference_answer"])
            assert rep["splits"][split]["metrics"][name]["exact_match"] == pytest.approx(np.mean([i["correct"] for i in its]))
            if split != "id":
                before = [i["correct"] for i in items if i["split"] == "id" and i["model"] == name]
                after = [i["correct"] for i in its]
                flipped = sum(b and not a for b, a in zip(before, after))
                assert rep["splits"][split]["metrics"][name]["attack_success_rate"] == pytest.approx(flipped / len(rows))
                assert i["input"] != rows[i["row"]]["prompt"]
    assert "ASR typo" in (out / "report.md").read_text()


def test_choice_accuracy_from_option_loglikelihoods(tiny_student, tmp_path, hf):
    sents = synthetic_sentences(30, seed=9)
    rows = [{"prompt": sents[i], "choices": [sents[i + 1].split()[0].lower(), "blue river", "many"], "label": i % 3} for i in range(0, 12, 2)]
    data = write_jsonl(tmp_path / "choice.jsonl", rows)
    out = tmp_path / "rep"
    rep = evaluate({"kd": str(tiny_student)}, data=str(data), perturb=None, out=str(out), progress=False)
    assert rep["task"] == "choice" and rep["retention"] == {}
    tok = hf["tok"]
    preds = []
    for it, row in zip(_items(out), rows):
        p = tok(row["prompt"])["input_ids"]
        lps = []
        for c in row["choices"]:
            o = tok(" " + c, add_special_tokens=False)["input_ids"]
            ls = _logsoftmax(hf["kd"], p + o)
            lps.append(sum(ls[len(p) - 1 + j, o[j]] for j in range(len(o))))
        np.testing.assert_allclose(it["option_logprobs"], lps, atol=1e-4)
        preds.append(int(np.argmax(lps)))
    assert rep["splits"]["id"]["metrics"]["kd"]["accuracy"] == pytest.approx(M.accuracy(preds, [r["label"] for r in rows]))


def test_generation_rouge_l_and_cli(tiny_teacher, tiny_student, tmp_path):
    from kdship.cli import app

    sents = synthetic_sentences(20, seed=11)
    data = write_jsonl(tmp_path / "gen.jsonl", [{"prompt": sents[i], "reference": sents[i + 1]} for i in range(6)])
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(yaml.safe_dump({"perturb": "swap", "max_new_tokens": 8, "models": [f"kd={tiny_student}"]}))
    out = tmp_path / "rep"
    res = CliRunner().invoke(app, ["eval", "--config", str(cfg), "--data", str(data), "--teacher", str(tiny_teacher), "--out", str(out), "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "rouge_l_f1" in res.output and "ASR word swap" in res.output
    rep = json.loads((out / "report.json").read_text())
    assert rep["task"] == "generation" and rep["perturbations"] == ["swap"]
    for split in ("id", "swap"):
        its = [i for i in _items(out) if i["split"] == split and i["model"] == "kd"]
        f1 = [M.rouge_l(i["generation"], sents[i["row"] + 1])["f1"] for i in its]
        assert [i["rouge_l"]["f1"] for i in its] == pytest.approx(f1)
        assert rep["splits"][split]["metrics"]["kd"]["rouge_l_f1"] == pytest.approx(np.mean(f1))


def test_generation_judged_by_the_teacher(hf, tiny_teacher, tiny_student, tmp_path):
    """With a live teacher, each model's free-running output gets the teacher's NLL per token and ROUGE-L
    against the teacher's own answer; both re-derived here from a plain transformers generate + forward."""
    import torch

    sents = synthetic_sentences(20, seed=5)
    rows = [{"prompt": sents[i], "reference": sents[i + 1]} for i in range(5)]
    data = write_jsonl(tmp_path / "gen.jsonl", rows)
    rep = evaluate({"kd": str(tiny_student)}, str(data), teacher=str(tiny_teacher), perturb=None, out=str(tmp_path / "rep"), max_new_tokens=10, progress=False)
    tok = hf["tok"]
    its = {(i["model"], i["row"]): i for i in _items(tmp_path / "rep")}
    nll_sum, n_tok = {"teacher": 0.0, "kd": 0.0}, {"teacher": 0, "kd": 0}
    for r, row in enumerate(rows):
        prompt = tok(row["prompt"]).input_ids
        gens = {}
        for name in ("teacher", "kd"):
            with torch.inference_mode():
                g = hf[name].generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long), max_new_tokens=10, do_sample=False, pad_token_id=tok.pad_token_id or tok.eos_token_id)
            gen = g[0, len(prompt):].tolist()
            eos = tok.eos_token_id
            gen = gen[: gen.index(eos)] if eos in gen else gen
            gens[name] = gen
            lp = _logsoftmax(hf["teacher"], prompt + gen)
            want = -sum(lp[len(prompt) - 1 + j, t] for j, t in enumerate(gen))
            it = its[(name, r)]
            assert it["generated_tokens"] == len(gen) and it["teacher_nll_sum"] == pytest.approx(want, rel=1e-4, abs=1e-4)
            nll_sum[name] += want
            n_tok[name] += len(gen)
        text = {n: tok.decode(g, skip_special_tokens=True) for n, g in gens.items()}
        assert its[("kd", r)]["rouge_l_vs_teacher"]["f1"] == pytest.approx(M.rouge_l(text["kd"], text["teacher"])["f1"])
    m = rep["splits"]["id"]["metrics"]
    for name in ("teacher", "kd"):
        assert m[name]["teacher_nll"] == pytest.approx(nll_sum[name] / n_tok[name], rel=1e-4)
    assert m["teacher"]["rouge_l_f1_vs_teacher"] == pytest.approx(1.0)
    # a random student writes what the teacher would not: the teacher finds it far less likely than its own text
    assert m["kd"]["teacher_nll"] > m["teacher"]["teacher_nll"] + 1.0
    assert "teacher NLL of own generations" in (tmp_path / "rep" / "report.md").read_text()
    for name in ("teacher", "kd"):
        gens = [i["generation"] for i in its.values() if i["model"] == name]
        assert m[name]["repeated_4gram_share"] == pytest.approx(np.mean([M.repeated_ngram_share(g) for g in gens]))


def test_bad_input_names_file_line_and_option(tiny_student, tmp_path):
    from kdship.cli import app

    bad = write_jsonl(tmp_path / "bad.jsonl", [{"prompt": "a b", "choices": ["x", "y"], "label": 0}, {"prompt": "c d", "choices": ["x", "y"]}])
    res = CliRunner().invoke(app, ["eval", str(tiny_student), "--data", str(bad), "--out", str(tmp_path / "r"), "--no-progress"])
    assert res.exit_code == 2 and "bad.jsonl:2" in res.output and "label" in res.output
    res = CliRunner().invoke(app, ["eval", str(tiny_student), "--data", str(bad), "--perturb", "typos", "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and "--perturb" in res.output and "typos" in res.output
    res = CliRunner().invoke(app, ["eval", f"kd={tmp_path / 'nowhere'}", "--data", str(bad), "--out", str(tmp_path / "r")])
    assert res.exit_code == 2 and "nowhere" in res.output
    assert parse_model_specs(["a=/x", "/y/run/final"]) == {"a": "/x", "run": "/y/run/final"}

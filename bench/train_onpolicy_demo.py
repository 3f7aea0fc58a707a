"""On-policy rounds vs off-policy KD on the demo's budget, with the real teacher; two seeds.

Run: .venv/bin/python bench/train_onpolicy_demo.py [--seeds 0,1 --rounds 2 --prompts 64]
Writes bench/results/train_onpolicy_demo.md (and refreshes bench/results/train.md).

The question: does training on the student's own generations, scored offline by the teacher
(`kdship train --on-policy-rounds`), give a student whose free-running answers the teacher agrees
with more, at the same steps and loss as store-only KD, and what does it cost?
  * teacher SmolLM2-135M-Instruct, the demo's score store (`kdship cache` defaults, real vLLM engine) and
    its 6-of-30 depth-pruned student (`kdship.demo.pipeline.run_demo(stages=...)`), the default loss
    (forward KL + CE 0.5 on the data tokens; round stores train on the teacher's targets alone)
  * off-policy: `kdship train STORE --max-steps S` (S = two epochs of the store); on-policy: the same S
    steps with `--on-policy-rounds R --on-policy-fraction 0.5 --samples-per-prompt 1`, the prompts being
    the first user turns of the store's own training chats (in-distribution, as MiniLLM uses its
    training prompts); each trainer runs as its own `kdship train` process (its peak memory is its own)
  * a seed fixes the batch order and the students' sampling seeds; both variants of a seed share it
  * held-out: `kdship eval` on held-out chats no model trained on: the generation task (the first user
    turn as prompt, the chat's answer as reference) with the live teacher as judge (`teacher_nll`, the
    teacher's NLL per token of each student's greedy answer; ROUGE-L vs the teacher's answer and vs the
    reference), and the lm task (perplexity, full-vocabulary KL to the teacher)
Partial results are kept in WORK/onpolicy_<settings>.json; a rerun with the same settings continues.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / ".kdship" / "bench" / "train_onpolicy_demo"
RESULTS = ROOT / "bench" / "results"

sys.path.insert(0, str(ROOT))
from kdship.demo.pipeline import env_defaults  # noqa: E402  (vLLM in-process, all cores: before vLLM/torch load)

env_defaults()

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_fidelity_smollm2 import _machine  # noqa: E402


def first_turn_rows(chats_path: str, n: int, with_reference: bool) -> list[dict]:
    """``{"messages": [first user turn]}`` (+ ``reference``: the first assistant turn) per chat."""
    rows = []
    for line in Path(chats_path).read_text().splitlines():
        msgs = json.loads(line)["messages"]
        if len(msgs) >= 2 and msgs[0]["role"] == "user" and msgs[1]["role"] == "assistant":
            row = {"messages": [msgs[0]]}
            if with_reference:
                row["reference"] = msgs[1]["content"]
            rows.append(row)
        if len(rows) == n:
            break
    return rows


def run_train(args: list[str], run: Path) -> dict:
    """`kdship train` in its own process; its summary."""
    shutil.rmtree(run, ignore_errors=True)
    t0 = time.time()
    p = subprocess.run([sys.executable, "-m", "kdship", "train", *args, "--out", str(run), "--no-progress"], cwd=ROOT, capture_output=True, text=True,
                       env={**os.environ, "PYTHONPATH": str(ROOT)})  # fmt: skip
    summary = run / "summary.json"
    s = json.loads(summary.read_text()) if summary.is_file() else {}
    if p.returncode != 0:
        # a process that saved its final model and summary, then died at exit, is a result (noted) not a failure
        if not (s.get("final") and s.get("steps") == s.get("total_steps") and (run / "final" / "model.safetensors").is_file()):
            raise SystemExit(f"kdship train failed ({run}):\n{p.stderr[-3000:]}")
        s["exit"] = f"exit code {p.returncode} after saving its final model: {p.stderr.strip().splitlines()[-1][:200]}"
        print(f"WARNING {run}: {s['exit']}", flush=True)
    s["wall_s"] = round(time.time() - t0, 1)
    # the trainer process's peak RSS (logged per step; on-policy runs generate in this process too)
    steps = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines() if '"peak_mem_mb"' in x]
    s["peak_mem_mb"] = max((r["peak_mem_mb"] for r in steps if r.get("peak_mem_mb")), default=None)
    s["peak_mem_own"] = True  # the trainer's own VmHWM (before commit 'peak memory ... VmHWM' it was the parent's)
    return s


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=64, help="on-policy prompts (first user turns of training chats)")
    ap.add_argument("--max-new-tokens", type=int, default=48)
    ap.add_argument("--eval-items", type=int, default=40)
    ap.add_argument("--md-only", action="store_true")
    a = ap.parse_args()
    seeds = [int(x) for x in a.seeds.split(",")]
    from kdship.demo.pipeline import DemoSizes, run_demo
    from kdship.tiny import write_jsonl

    # the depth-only 6-of-30 student these results were measured on (the demo's student until 2026-12-04, when it
    # moved to 8 layers at 2/3 width); pinned so that a rerun measures the same student and reuses its runs
    sizes = DemoSizes(keep_layers=6, width=1.0)
    settings = dict(v=1, rounds=a.rounds, prompts=a.prompts, new=a.max_new_tokens, items=a.eval_items,
                    sizes={k: getattr(sizes, k) for k in ("train_conversations", "heldout_conversations", "max_turns", "max_length", "keep_layers", "epochs", "batch_tokens", "lr")})  # fmt: skip
    tag = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:10]
    WORK.mkdir(parents=True, exist_ok=True)
    state_file = WORK / f"onpolicy_{tag}.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {"settings": settings, "runs": {}, "eval": None}
    t_all = time.time()
    if not a.md_only:
        demo = run_demo(out=WORK / "demo", sizes=sizes, stages=("assets", "cache_score", "prune"), progress=False)
        res = demo["results"]
        store, student0, assets = res["cache_score"]["store"], res["prune"]["dir"], res["assets"]
        teacher = assets["teacher"]
        prompts = write_jsonl(WORK / "onpolicy_prompts.jsonl", first_turn_rows(assets["data"]["train"], a.prompts, False))
        heldout_gen = write_jsonl(WORK / "heldout_first_turns.jsonl", first_turn_rows(assets["data"]["heldout"], a.eval_items, True))
        common = [str(store), "--student", str(student0), "--batch-tokens", str(sizes.batch_tokens), "--lr", str(sizes.lr), "--eval-every", "0", "--ckpt-every", "0"]
        for sd in seeds:
            off_key, on_key = f"off-policy | seed {sd}", f"on-policy ({a.rounds} rounds) | seed {sd}"
            if off_key not in state["runs"]:
                s = run_train(common + ["--epochs", str(sizes.epochs), "--seed", str(sd)], WORK / "runs" / f"{tag}_off_s{sd}")
                state["runs"][off_key] = {"final": s["final"], "steps": s["steps"], "tokens": s["tokens"], "wall_s": s["wall_s"], "peak_mem_mb": s.get("peak_mem_mb"),
                                          "peak_mem_own": s.get("peak_mem_own", False)}  # fmt: skip
                state_file.write_text(json.dumps(state, indent=1))
                print(off_key, state["runs"][off_key], flush=True)
            if on_key not in state["runs"]:
                steps = state["runs"][off_key]["steps"]
                run = WORK / "runs" / f"{tag}_on_s{sd}"
                s = run_train(common + ["--max-steps", str(steps), "--seed", str(sd), "--on-policy-rounds", str(a.rounds), "--prompts", str(prompts),
                                        "--teacher", str(teacher), "--on-policy-fraction", "0.5", "--samples-per-prompt", "1",
                                        "--on-policy-max-new-tokens", str(a.max_new_tokens)], run)  # fmt: skip
                rounds = json.loads((run / "rounds" / "summary.json").read_text())
                state["runs"][on_key] = {"final": s["final"], "steps": s["steps"], "tokens": s["tokens"], "wall_s": s["wall_s"], "peak_mem_mb": s.get("peak_mem_mb"),
                                         "peak_mem_own": s.get("peak_mem_own", False), "rounds": rounds, "exit": s.get("exit")}  # fmt: skip
                state_file.write_text(json.dumps(state, indent=1))
                print(on_key, {k: v for k, v in state["runs"][on_key].items() if k != "rounds"}, flush=True)
        wanted = sorted(state["runs"])
        if state.get("eval") is None or state["eval"]["models"] != wanted or "repeated_4gram_share" not in next(iter(state["eval"]["gen"].values())):
            from kdship.eval.run import evaluate

            models = {k: state["runs"][k]["final"] for k in wanted}
            gen = evaluate(models=models, data=str(heldout_gen), teacher=teacher, perturb=(), out=str(WORK / "eval_gen"), task="generation",
                           max_new_tokens=a.max_new_tokens, progress=False)  # fmt: skip
            lm = evaluate(models=models, data=assets["data"]["heldout"], teacher=teacher, perturb=(), out=str(WORK / "eval_lm"), task="lm",
                          limit=a.eval_items, progress=False)  # fmt: skip
            keep = ("teacher_nll", "rouge_l_f1_vs_teacher", "rouge_l_f1", "generated_tokens", "repeated_4gram_share")
            state["eval"] = {"models": wanted, "gen": {m: {k: v.get(k) for k in keep} for m, v in gen["splits"]["id"]["metrics"].items()},
                             "lm": {m: {k: v.get(k) for k in ("perplexity", "kl_to_teacher")} for m, v in lm["splits"]["id"]["metrics"].items()}}  # fmt: skip
        state["wall_s"] = state.get("wall_s", 0.0) + time.time() - t_all
        state_file.write_text(json.dumps(state, indent=1))
    write_md(state, sizes, seeds, a)


def write_md(state, sizes, seeds, a) -> None:
    ev = state["eval"]
    variants = ["off-policy", f"on-policy ({a.rounds} rounds)"]
    lines = [
        "# kdship train: on-policy rounds vs off-policy KD on the demo's budget",
        "",
        f"Machine: {_machine()}. Written by bench/train_onpolicy_demo.py.",
        f"Teacher SmolLM2-135M-Instruct; the demo's score store and {sizes.keep_layers}-of-30 pruned student; `kdship train` defaults "
        f"(forward KL + CE 0.5), {sizes.batch_tokens} tokens/step, lr {sizes.lr}; off-policy: {sizes.epochs} epochs of the store; on-policy: "
        f"the same steps, {a.rounds} rounds, {a.prompts} prompts (first user turns of the training chats), 1 sample each (temperature 1, "
        f"up to {a.max_new_tokens} tokens), half of each later phase's batches from the round stores (scored by the teacher in a "
        f"`kdship cache` subprocess, vLLM). Seeds {', '.join(map(str, seeds))}.",
        f"Held-out ({a.eval_items} chats no model trained on): teacher NLL = the teacher's nats per token of the student's own greedy answer "
        "to the first user turn (lower = the teacher would have written it); ROUGE-L F1 of that answer vs the teacher's greedy answer and vs "
        "the chat's own answer; perplexity and full-vocabulary KL to the teacher on the whole held-out chats (teacher-forced).",
        "",
        "| variant | teacher NLL of own answers (seeds) | mean | repeated 4-grams in them (mean) | answer tokens (mean) | ROUGE-L vs teacher (seeds) | mean | ROUGE-L vs reference (mean) | held-out perplexity (mean) | held-out KL (mean) | train wall s (mean) | trainer peak RSS MB (max; own VmHWM) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    means = {}
    for v in variants:
        keys = [f"{v} | seed {s}" for s in seeds]
        if not ev or not all(k in ev["gen"] for k in keys):
            continue

        def col(src, metric, fmt, keys=keys):
            vals = [ev[src][k][metric] for k in keys]
            return vals, " / ".join(fmt.format(x) for x in vals), fmt.format(sum(vals) / len(vals))

        nll, nll_s, nll_m = col("gen", "teacher_nll", "{:.3f}")
        rt, rt_s, rt_m = col("gen", "rouge_l_f1_vs_teacher", "{:.3f}")
        _, _, rr_m = col("gen", "rouge_l_f1", "{:.3f}")
        _, _, rep_m = col("gen", "repeated_4gram_share", "{:.3f}")
        _, _, len_m = col("gen", "generated_tokens", "{:.0f}")
        _, _, ppl_m = col("lm", "perplexity", "{:.1f}")
        _, _, kl_m = col("lm", "kl_to_teacher", "{:.3f}")
        means[v] = sum(nll) / len(nll)
        wall = sum(state["runs"][k]["wall_s"] for k in keys) / len(keys)
        mems = [state["runs"][k]["peak_mem_mb"] for k in keys if state["runs"][k].get("peak_mem_own") and state["runs"][k].get("peak_mem_mb")]
        mem = f"{max(mems):.0f}" if mems else "-"
        lines.append(f"| {v} | {nll_s} | {nll_m} | {rep_m} | {len_m} | {rt_s} | {rt_m} | {rr_m} | {ppl_m} | {kl_m} | {wall:.0f} | {mem} |")
    if ev and "teacher" in ev["gen"]:
        t = ev["gen"]["teacher"]
        lines.append(f"| teacher | {t['teacher_nll']:.3f} | | {t['repeated_4gram_share']:.3f} | {t['generated_tokens']} | 1 | | {t['rouge_l_f1']:.3f} | "
                     f"{ev['lm']['teacher']['perplexity']:.1f} | 0 | | |")
    lines.append("")
    if len(means) == 2:
        off, on = means[variants[0]], means[variants[1]]
        reps = {v: sum(ev["gen"][f"{v} | seed {sd}"]["repeated_4gram_share"] for sd in seeds) / len(seeds) for v in variants}
        lines.append(f"Teacher NLL of the students' own answers, mean of the seeds: on-policy {on:.3f} vs off-policy {off:.3f}; "
                     f"repeated 4-grams {reps[variants[1]]:.3f} vs {reps[variants[0]]:.3f} (teacher {ev['gen']['teacher']['repeated_4gram_share']:.3f}). "
                     "A lower teacher NLL counts only with no more repetition: a loop is cheap for the teacher to predict from its own context.")
    on_runs = [r for k, r in state["runs"].items() if k.startswith("on-policy") and "rounds" in r]
    if on_runs:
        shares = {}
        for r in on_runs:
            secs = {p: 0.0 for p in ("train", "generate", "score")}
            for rec in r["rounds"]["rounds"]:
                for p, x in rec["seconds"].items():
                    secs[p] += x or 0.0
            tot = sum(secs.values()) or 1.0
            for p, x in secs.items():
                shares.setdefault(p, []).append(x / tot)
        lines.append("Cost of the on-policy runs, share of their wall time (mean over seeds): " +
                     ", ".join(f"{p} {100 * sum(v) / len(v):.0f} %" for p, v in shares.items()) +
                     ". The teacher ran only in the scoring subprocess: the trainer's peak RSS above is the trainer process's own.")
    for k, r in sorted(state["runs"].items()):
        if r.get("exit"):
            lines.append(f"Note: `{k}`: the trainer process ended with {r['exit']} (its model and summary were complete; used as they are).")
    own = sorted(k for k, r in state["runs"].items() if r.get("peak_mem_own"))
    lines.append(f"Peak RSS measured as each trainer process's own VmHWM on: {', '.join(own) if own else 'none'} (a dash: not measured that way). "
                 "For scale: the teacher alone is 134.5 M parameters, 538 MB in fp32, and a vLLM engine holding it several GB.")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "train_onpolicy_demo.md").write_text("\n".join(lines) + "\n")
    from run_all import combine_area

    combine_area("train")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()

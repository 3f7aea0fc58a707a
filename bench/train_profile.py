"""Where `kdship train`'s step time goes (`--profile-steps`), and tokens/s before vs after a change.

Run: .venv/bin/python bench/train_profile.py [--baseline REF] [--rounds 2] [--quick]
Writes bench/results/train_profile.md (merged into bench/results/train.md) and, per student, the step
profile's own files under .kdship/bench/train_profile/ (profile.md, trace.json).

Students (each `kdship train --init-from-config`, fresh weights, on one headtail store written by the
hf backend from a tiny local teacher):
  * smollm2_6l : SmolLM2-135M's shape (hidden 576, 9 heads / 3 KV, MLP 1536, tied lm_head) at 6 layers
                 and its vocabulary of 49,152 rows (the tokenizer here has 512 tokens; the rows beyond it
                 are never targets but cost the same lm_head work): the lm_head + loss dominate, as in
                 real small students
  * tiny_2l    : hidden 256, 2 layers, vocab 512: per-operator overhead dominates (what a GPU suffers
                 from when kernels are small)
Profile: one run per student with --profile-steps (phases synchronised on CUDA; the CPU is synchronous).
A/B (--baseline REF): `kdship train` from REF (a git worktree) and from this tree, the same command and
batches, alternating round by round in this one process; tokens/s from each run's metrics.jsonl after
the warm-up steps; a variant's figure is its best round (the machine is shared: the least disturbed).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / ".kdship" / "bench" / "train_profile"
RESULTS = ROOT / "bench" / "results"
sys.path.insert(0, str(Path(__file__).resolve().parent))

SMOLLM2 = {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3, "head_dim": 64,
           "vocab_size": 49152, "tie_word_embeddings": True, "rms_norm_eps": 1e-5, "rope_theta": 100000.0, "max_position_embeddings": 2048}


def prepare(quick: bool) -> dict:
    from transformers import LlamaConfig

    from kdship.cache.run import cache
    from kdship.tiny import build_tiny_llama, synthetic_sentences, write_jsonl

    WORK.mkdir(parents=True, exist_ok=True)
    teacher = WORK / "teacher"
    if not (teacher / "config.json").is_file():
        build_tiny_llama(teacher, hidden=256, layers=4, heads=4, kv_heads=4, seed=0, init_range=0.05)
    students = {}
    for name, extra in (("smollm2_6l", dict(SMOLLM2, num_hidden_layers=6)),
                        ("tiny_2l", {"hidden_size": 256, "intermediate_size": 688, "num_attention_heads": 4, "num_key_value_heads": 4,
                                     "head_dim": 64, "vocab_size": 512, "num_hidden_layers": 2})):
        d = WORK / f"student_{name}"
        if not (d / "config.json").is_file():
            d.mkdir(parents=True, exist_ok=True)
            LlamaConfig(**extra).save_pretrained(d)
            for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
                if (teacher / f).is_file():
                    shutil.copy(teacher / f, d / f)
        students[name] = str(d)
    store = WORK / "store_headtail"
    n = 300 if quick else 800
    if not (store / f"built_{n}").is_file():
        sents = synthetic_sentences(n * 6, seed=5)
        data = write_jsonl(WORK / "text.jsonl", [{"text": " ".join(sents[i : i + 6])} for i in range(0, n * 6, 6)])
        cache(str(teacher), str(data), str(store), backend="hf", progress=False, overwrite=True)
        (store / f"built_{n}").write_text("")
    return {"teacher": str(teacher), "students": students, "store": str(store)}


def train_cmd(paths: dict, student: str, out: Path, steps: int, batch_tokens: int, extra: list[str]) -> list[str]:
    return [sys.executable, "-m", "kdship", "train", paths["store"], "--init-from-config", paths["students"][student], "--out", str(out),
            "--max-steps", str(steps), "--batch-tokens", str(batch_tokens), "--eval-every", "0", "--ckpt-every", "0", "--heldout-fraction", "0",
            "--no-progress", "--overwrite", "--log-every", "1", *extra]


def run_train(cmd: list[str], pythonpath: Path, label: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(pythonpath), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count() or 2)),
           "TOKENIZERS_PARALLELISM": "false"}
    p = subprocess.run(cmd, cwd=str(pythonpath), capture_output=True, text=True, env=env, timeout=3600)
    if p.returncode:
        raise SystemExit(f"{label} failed ({p.returncode}):\n$ {' '.join(cmd)}\n{p.stderr[-4000:]}")


def tokens_per_s(run_dir: Path, warmup: int) -> float:
    """Steady-state tokens/s of a run: the tokens and seconds of its steps after ``warmup``."""
    recs = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if '"loss"' in x]
    a, b = recs[warmup - 1], recs[-1]
    return (b["tokens"] - a["tokens"]) / (b["elapsed_s"] - a["elapsed_s"])


def baseline_tree(ref: str) -> tuple[Path, str]:
    sha = subprocess.run(["git", "rev-parse", "--short", ref], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    tree = WORK / f"baseline_{sha}"
    if not (tree / "kdship").is_dir():
        shutil.rmtree(tree, ignore_errors=True)
        subprocess.run(["git", "worktree", "prune"], cwd=ROOT, check=True)
        subprocess.run(["git", "worktree", "add", "--detach", str(tree), sha], cwd=ROOT, check=True, capture_output=True)
    return tree, sha


def head_label() -> str:
    sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    # the code that runs: kdship/ (results files written by benches do not make a tree "dirty")
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "kdship"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    return sha + ("-dirty" if dirty else "")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--baseline", default=None, help="git ref to compare tokens/s against (a worktree of it runs the same command)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--warmup", type=int, default=3, help="steps left out of the A/B tokens/s")
    ap.add_argument("--steps", type=int, default=6, help="timed steps per A/B run, and profiled steps")
    ap.add_argument("--quick", action="store_true")
    a = ap.parse_args()
    from run_all import combine_area, machine_with_load, merge

    paths = prepare(a.quick)
    configs = [("smollm2_6l", 2048), ("tiny_2l", 2048)]
    machine = machine_with_load()
    profiles = {}
    for student, bt in configs:
        out = WORK / f"profile_{student}"
        run_train(train_cmd(paths, student, out, 2 + a.steps, bt, ["--profile-steps", str(a.steps)]), ROOT, f"profile {student}")
        profiles[student] = json.loads((out / "profile" / "profile.json").read_text())
        print(student, json.dumps(profiles[student]["phases_ms"]), flush=True)
    ab = {}
    if a.baseline:
        tree, sha = baseline_tree(a.baseline)
        here = head_label()
        for student, bt in configs:
            best = {"baseline": 0.0, "this": 0.0}
            for r in range(a.rounds):
                for label, src in (("baseline", tree), ("this", ROOT)):
                    out = WORK / f"ab_{student}_{label}"
                    run_train(train_cmd(paths, student, out, a.warmup + a.steps, bt, []), src, f"{label} {student}")
                    best[label] = max(best[label], tokens_per_s(out, a.warmup))
                    print(student, label, r, round(best[label]), flush=True)
            ab[student] = {"baseline_ref": sha, "this_ref": here, **best, "ratio": best["this"] / best["baseline"]}
    write_results(profiles, ab, configs, a, machine)
    combine_area("train")
    merge()


def write_results(profiles: dict, ab: dict, configs, a, machine: str) -> None:
    from kdship.train.profile import PHASE_TITLES, PHASES

    lines = [
        "# kdship train: where the step's time goes",
        "",
        f"Machine: {machine}. By `bench/train_profile.py` (`kdship train --profile-steps {a.steps}` after 2 warm-up steps; "
        "docs/train.md says how to read a profile).",
        "Students with fresh weights on one headtail store (hf backend, tiny local teacher, tokenizer of 512 tokens): "
        "smollm2_6l = SmolLM2-135M's shape at 6 layers with its 49,152-row lm_head; tiny_2l = hidden 256, 2 layers, vocab 512.",
        "",
        "| phase | " + " | ".join(f"{s} ({bt} tokens/step), ms" for s, bt in configs) + " |",
        "|---|" + "---:|" * len(configs),
    ]
    for p in PHASES:
        if all(profiles[s]["phases_ms"][p] < 0.05 for s, _ in configs):
            continue
        lines.append(f"| {PHASE_TITLES[p]} | " + " | ".join(f"{profiles[s]['phases_ms'][p]:,.1f} ({profiles[s]['phases_ms'][p] / profiles[s]['step_ms'] * 100:.0f} %)" for s, _ in configs) + " |")
    lines.append("| **step** | " + " | ".join(f"**{profiles[s]['step_ms']:,.1f}**" for s, _ in configs) + " |")
    lines.append("| tokens/s (profiled) | " + " | ".join(f"{profiles[s]['tokens_per_s']:,.0f}" for s, _ in configs) + " |")
    # each one at least a kernel launch on a GPU: what makes a small student's step launch-bound there
    lines.append("| aten operators dispatched per step | " + " | ".join(f"{profiles[s].get('aten_ops_per_step') or 0:,.0f}" for s, _ in configs) + " |")
    lines.append("| loader capacity ÷ the step's consumption | " + " | ".join(
        f"{profiles[s].get('loader', {}).get('capacity_over_consumption', float('nan')):,.0f}x" for s, _ in configs) + " |")
    for s, _ in configs:
        ops = profiles[s]["top_ops"][:6]
        lines += ["", f"Top operators, {s} (self ms/step): " + ", ".join(f"`{o['op']}` {o['self_ms_per_step']:,.1f}" for o in ops) + "."]
    if ab:
        lines += [
            "",
            f"## Before / after: tokens/s, side by side ({a.rounds} alternating rounds, best round each, {a.steps} steps after {a.warmup} warm-up)",
            "",
            "| student | baseline | tokens/s | this tree | tokens/s | this ÷ baseline |",
            "|---|---|---:|---|---:|---:|",
        ]
        for s, _ in configs:
            r = ab[s]
            lines.append(f"| {s} | {r['baseline_ref']} | {r['baseline']:,.0f} | {r['this_ref']} | {r['this']:,.0f} | **{r['ratio']:.2f}** |")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "train_profile.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()

"""The default recipe on the demo's budget: KD from the default (headtail) store, with and without CE on the
data tokens, against plain fine-tuning (SFT) on the same tokens; two seeds.

Run: .venv/bin/python bench/train_recipe_demo.py [--ce 0,0.25,0.5 --seeds 0,1]
Writes bench/results/train_recipe_demo.md (and refreshes bench/results/train.md).

The question: with the demo's teacher (SmolLM2-135M-Instruct), data (chitchat), student (the 6-of-30 depth-
pruned copy) and budget (2 epochs of the demo's score store), which `--ce-weight` gives the student that
beats SFT on held-out perplexity, KL to the teacher and out-of-distribution perplexity? The answer sets
`kdship train`'s default `ce_weight`, which the demo uses.
  * store, student and data: the demo's own stages (`kdship.demo.pipeline.run_demo(stages=...)`), in
    WORK/demo: the same store (`kdship cache` defaults, real vLLM engine) and pruned student as `make demo`
  * every variant: the demo's training settings (epochs, batch tokens, lr); a seed fixes the batch order,
    so all variants of a seed see the same batches
  * held-out: `kdship eval` (task lm) on the demo's held-out chats and Shakespeare (OOD), perplexity and
    the full-vocabulary KL to the live teacher, all models in one run (the teacher loaded once)
Partial results are kept in WORK/recipe_<settings>.json; a rerun with the same settings continues.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / ".kdship" / "bench" / "train_recipe_demo"
RESULTS = ROOT / "bench" / "results"

sys.path.insert(0, str(ROOT))
from kdship.demo.pipeline import env_defaults  # noqa: E402  (vLLM in-process, all cores: before vLLM/torch load)

env_defaults()

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_fidelity_smollm2 import _machine  # noqa: E402  (one description of the machine for the train benches)


# the demo sizes that shape the store, the student and its training (the runs' identity)
RUN_SIZES = ("train_conversations", "heldout_conversations", "ood_passages", "max_turns", "max_length", "keep_layers", "calibration_tokens",
             "epochs", "batch_tokens", "lr", "seed")


def variant_name(ce: float | None) -> str:
    return "SFT (CE only)" if ce is None else f"KD, ce_weight {ce:g}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--ce", default="0,0.5", help="KD variants' --ce-weight values")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--eval-items", type=int, default=40, help="held-out and OOD items evaluated")
    ap.add_argument("--md-only", action="store_true")
    a = ap.parse_args()
    ces = [float(x) for x in a.ce.split(",")]
    seeds = [int(x) for x in a.seeds.split(",")]
    from kdship.demo.pipeline import DemoSizes, run_demo
    from demo_budget import train_variant
    from kdship.train.trainer import DEFAULTS as TRAIN_DEFAULTS

    # the depth-only 6-of-30 student these results were measured on (the demo's student until 2026-12-04, when it
    # moved to 8 layers at 2/3 width); pinned so that a rerun measures the same student and reuses its runs
    sizes = DemoSizes(keep_layers=6, width=1.0)
    # runs are keyed by variant and seed, so the grid (--ce, --seeds) can grow without redoing finished runs
    settings = dict(v=1, items=a.eval_items, sizes={k: getattr(sizes, k) for k in RUN_SIZES})
    tag = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:10]
    WORK.mkdir(parents=True, exist_ok=True)
    state_file = WORK / f"recipe_{tag}.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {"settings": settings, "runs": {}, "eval": None}
    state["settings"] = dict(settings, ces=ces, seeds=seeds)
    t_all = time.time()
    if not a.md_only:
        demo = run_demo(out=WORK / "demo", sizes=sizes, stages=("assets", "cache_score", "prune"), progress=False)
        res = demo["results"]
        store, student0, assets = res["cache_score"]["store"], res["prune"]["dir"], res["assets"]
        from kdship.cache.inspect import inspect_store

        info = inspect_store(store, verify=False)  # the store's own figures (a resumed cache run reports only what it wrote)
        state["store"] = {k: info.get(k) for k in ("positions", "targeted_positions", "targets", "top_k", "bytes_per_position")}
        variants = [(variant_name(ce), ce, sd) for sd in seeds for ce in [None] + ces]
        for name, ce, sd in variants:
            loss = dict(loss="sft") if ce is None else dict(loss="fkl", ce_weight=ce)
            train_variant(state, f"{name} | seed {sd}", WORK / "runs" / f"{tag}_{'sft' if ce is None else f'kd_ce{ce:g}'}_s{sd}",
                          lambda: state_file.write_text(json.dumps(state, indent=1)), {"name": name, "ce": ce, "seed": sd}, store, student0, sizes, seed=sd, **loss)
        wanted = {f"{n} | seed {sd}" for n, _, sd in variants}
        if state.get("eval") is None or set(state["eval"]["models"]) != wanted:
            from demo_budget import eval_lm

            models = {k: v["final"] for k, v in state["runs"].items() if k in wanted}
            state["eval"] = eval_lm(models, assets, WORK / "eval", a.eval_items, keys=("perplexity", "kl_to_teacher", "tokens"))
        state["wall_s"] = state.get("wall_s", 0.0) + time.time() - t_all
        state_file.write_text(json.dumps(state, indent=1))
    if a.md_only and (WORK / "demo" / "stores" / "score").is_dir():
        from kdship.cache.inspect import inspect_store

        info = inspect_store(str(WORK / "demo" / "stores" / "score"), verify=False)
        state["store"] = {k: info.get(k) for k in ("positions", "targeted_positions", "targets", "top_k", "bytes_per_position")}
    write_md(state, sizes, ces, seeds, TRAIN_DEFAULTS)


def write_md(state, sizes, ces, seeds, train_defaults) -> None:
    ev = state["eval"]
    names = [variant_name(None)] + [variant_name(c) for c in ces]
    lines = [
        "# kdship train: the default recipe on the demo's budget (KD with CE mixes vs SFT)",
        "",
        f"Machine: {_machine()}. Written by bench/train_recipe_demo.py.",
        f"Teacher SmolLM2-135M-Instruct; the demo's score store ({state['store']}) and its depth-pruned student "
        f"({sizes.keep_layers} of 30 layers); {sizes.epochs} epochs, {sizes.batch_tokens} tokens/step, lr {sizes.lr}; seeds {', '.join(map(str, seeds))} "
        "(a seed fixes the batch order, the same for every variant). KD: `--loss fkl` on the store's targets, "
        "loss = (1 - w) KD + w CE on the data tokens; SFT: CE only, the same tokens and steps.",
        f"Held-out: `kdship eval --task lm`, the demo's held-out chats (in-distribution) and Shakespeare (OOD), {state['settings']['items']} items each; "
        "KL = full-vocabulary KL(teacher || student) per scored token, the live teacher.",
        "",
        "| variant | held-out perplexity (seeds) | mean | held-out KL to teacher (seeds) | mean | OOD perplexity (seeds) | mean |",
        "|---|---|---|---|---|---|---|",
    ]
    means: dict[str, dict[str, float]] = {}
    for n in names:
        keys = [f"{n} | seed {s}" for s in seeds]
        if not ev or not all(k in ev["splits"]["id"] for k in keys):
            continue
        cells = []
        means[n] = {}
        for sp, metric, fmt in (("id", "perplexity", "{:.1f}"), ("id", "kl_to_teacher", "{:.3f}"), ("ood", "perplexity", "{:.0f}")):
            vals = [ev["splits"][sp][k][metric] for k in keys]
            m = sum(vals) / len(vals)
            means[n][f"{sp}_{metric}"] = m
            cells += [" / ".join(fmt.format(v) for v in vals), fmt.format(m)]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    if ev and "teacher" in ev["splits"]["id"]:
        t = ev["splits"]
        lines.append(f"| teacher | {t['id']['teacher']['perplexity']:.1f} | | 0 | | {t['ood']['teacher']['perplexity']:.0f} | |")
    lines.append("")
    sft = means.get(variant_name(None))
    if sft:
        better = [n for n in names[1:] if n in means and all(means[n][k] < sft[k] for k in sft)]
        lines.append("KD variants better than SFT on all three means: " + (", ".join(better) if better else "none") + ".")
        if better:
            best = min(better, key=lambda n: means[n]["id_perplexity"])
            lines.append(f"Lowest held-out perplexity among them: {best}. `kdship train`'s default ce_weight is {train_defaults['ce_weight']:g}.")
    runs = [r for r in state["runs"].values() if r["seed"] in seeds and (r["ce"] is None or r["ce"] in ces)]
    lines.append(f"\nTraining: {sum(r['train_s'] for r in runs) / max(1, len(runs)):.0f} s per student on average; whole script {state.get('wall_s', 0) / 60:.0f} min.")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "train_recipe_demo.md").write_text("\n".join(lines) + "\n")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from run_all import combine_area

    combine_area("train")
    print("\n".join(lines), flush=True)


if __name__ == "__main__":
    main()

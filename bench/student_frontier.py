"""Students worth serving: the speed/quality frontier of `kdship student` shapes, and vLLM vs ONNX Runtime.

Run: .venv/bin/python bench/student_frontier.py [--shapes 6x576,8x384,12x192 --bases pca,channels --seeds 0,1]
Writes bench/results/student_frontier.md and student_frontier.png (and merges bench/RESULTS.md).

The question (issue 13): which pruned shapes of SmolLM2-135M-Instruct serve >= 4x the teacher's output
tokens/s at their best concurrency and >= 3x per token at concurrency 1, and what held-out KL do they keep
after the demo's KD budget, next to the demo's depth-only student (6 of 30 layers, full width)?
  * teacher, data, store: the demo's own stages (`run_demo(stages=...)`) in WORK/demo (real vLLM cache)
  * each shape: `kdship student` (depth by block importance, then width by activation importance,
    calibrated on the store; a narrower hidden size in each --hidden-basis: the residual stream's principal
    components or its most active channels), `kdship train` with the demo's KD settings (the trainer's defaults, the
    demo's epochs/batch/lr), `kdship eval --task lm` (held-out chats and Shakespeare, the live teacher)
  * speed: `kdship export` (ONNX with KV cache, HF) of every trained student and the teacher, then one
    `kdship profile` run over all of them served by `kdship serve --backend onnx`, plus the teacher and
    one student served by vLLM (`--backend vllm`): the same prompts, one after the other, one machine
Partial results are kept in WORK/frontier_<settings>.json; a rerun continues where it stopped.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / ".kdship" / "bench" / "student_frontier"
RESULTS = ROOT / "bench" / "results"

sys.path.insert(0, str(ROOT))
from kdship.demo.pipeline import env_defaults  # noqa: E402  (vLLM in-process, all cores: before vLLM/torch load)

env_defaults()

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run_all import machine_with_load  # noqa: E402

# name -> (layers, hidden, intermediate, query heads); None = the teacher's (30 layers, 576, 1536, 9 heads / 3 KV heads)
SHAPES = {
    "6x576": (6, None, None, None),  # the demo's depth-only student: the quality reference
    "8x384": (8, 384, 1024, 6),
    "6x384": (6, 384, 1024, 6),
    "12x192": (12, 192, 768, 3),  # (transformers wants hidden divisible by the query heads: 3, 6 or 9 here)
}
REFERENCE = "6x576"
BASES = ("pca", "channels")  # `kdship student --hidden-basis` for shapes that narrow the hidden size


def students_of(shapes: list[str], bases: list[str]) -> list[tuple[str, str, str | None]]:
    """(student name, shape, hidden basis): one student per basis for shapes that narrow the hidden size."""
    return [(sh if SHAPES[sh][1] is None else f"{sh} {b}", sh, None if SHAPES[sh][1] is None else b) for sh in shapes for b in (bases if SHAPES[sh][1] else bases[:1])]
SERVE = dict(concurrency=(1, 4, 16, 64), requests=16, output_tokens=32, prompt_tokens=32, max_seconds=45.0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--shapes", default="6x576,8x384,12x192")
    ap.add_argument("--bases", default=",".join(BASES))
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--vllm-student", default="8x384", help="the student also served by vLLM (next to the vLLM teacher)")
    ap.add_argument("--eval-items", type=int, default=40)
    ap.add_argument("--skip-profile", action="store_true", help="prune, train, eval and export only (e.g. while the machine is busy)")
    ap.add_argument("--md-only", action="store_true")
    a = ap.parse_args()
    shapes = a.shapes.split(",")
    unknown = [s for s in shapes if s not in SHAPES]
    if unknown:
        sys.exit(f"--shapes: unknown {unknown}; known: {sorted(SHAPES)}")
    seeds = [int(x) for x in a.seeds.split(",")]
    students = students_of(shapes, a.bases.split(","))
    from kdship.demo.pipeline import DemoSizes, kd_settings, run_demo

    sizes = DemoSizes()
    settings = dict(v=1, items=a.eval_items, sizes={k: getattr(sizes, k) for k in ("train_conversations", "max_turns", "max_length", "epochs", "batch_tokens", "lr")})
    tag = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:10]
    WORK.mkdir(parents=True, exist_ok=True)
    state_file = WORK / f"frontier_{tag}.json"
    state = json.loads(state_file.read_text()) if state_file.is_file() else {"settings": settings, "students": {}, "runs": {}, "eval": None, "exports": {}, "profile": None}

    def save() -> None:
        state_file.write_text(json.dumps(state, indent=1))

    t_all = time.time()
    if not a.md_only:
        demo = run_demo(out=WORK / "demo", sizes=sizes, stages=("assets", "cache_score"), progress=False)
        res = demo["results"]
        store, assets = res["cache_score"]["store"], res["assets"]
        teacher = assets["teacher"]
        from kdship.student.run import student

        for name, shape, basis in students:  # 1. prune
            d = WORK / "students" / name.replace(" ", "_")
            if name in state["students"] and Path(state["students"][name]["dir"], "config.json").is_file():
                continue
            layers, hidden, inter, heads = SHAPES[shape]
            t0 = time.time()
            info = student(teacher, out=d, layers=layers, hidden=hidden, intermediate=inter, heads=heads, calibration=store, hidden_basis=basis or "channels",
                           calibration_tokens=sizes.calibration_tokens, overwrite=True, progress=False)
            state["students"][name] = {"dir": str(d), "shape_name": shape, "basis": basis, "params": info["student_params"], "teacher_params": info["teacher_params"], "shape": info["shape"], "prune_s": round(time.time() - t0, 1)}
            save()
            print("student", name, state["students"][name], flush=True)
        from demo_budget import train_variant

        for name, shape, _ in students:  # 2. train: the demo's KD recipe and budget
            for sd in seeds:
                train_variant(state, f"{name} | seed {sd}", WORK / "runs" / f"{name.replace(' ', '_')}_s{sd}", save, {"shape": shape, "seed": sd},
                              store, state["students"][name]["dir"], sizes, seed=sd, **kd_settings(sizes))
        wanted = sorted(f"{n} | seed {sd}" for n, _, _ in students for sd in seeds)
        if state.get("eval") is None or state["eval"]["models"] != wanted:  # 3. held-out quality, one eval run
            from demo_budget import eval_lm

            state["eval"] = eval_lm({k: state["runs"][k]["final"] for k in wanted}, assets, WORK / "eval", a.eval_items)
            save()
        from kdship.export.run import export

        for name in ["teacher"] + shapes:  # 4. export: speed depends on the shape only, so one student per shape (its first basis, first seed)
            d = WORK / "export" / name
            if name in state["exports"] and (d / "onnx").is_dir():
                continue
            shutil.rmtree(d, ignore_errors=True)
            first = next(n for n, sh, _ in students if sh == name) if name != "teacher" else None
            src = teacher if name == "teacher" else state["runs"][f"{first} | seed {seeds[0]}"]["final"]
            rep = export(src, str(d), formats=("hf", "onnx"), verify=True, prompts=4, new_tokens=8, vllm=False)
            state["exports"][name] = {"dir": str(d), "verified": rep.get("passed")}
            save()
        want_targets = ["teacher-onnx"] + [f"{n}-onnx" for n in shapes] + ["teacher-vllm", f"{a.vllm_student}-vllm"]
        prof = state.get("profile") or {}
        if not a.skip_profile and (not set(want_targets) <= set(prof.get("targets", {})) or prof.get("config") != json.loads(json.dumps(SERVE))):  # 5. speed, one run
            from kdship.profile.run import profile

            targets = [{"name": t, "model": state["exports"][t.rsplit("-", 1)[0]]["dir"], "backend": t.rsplit("-", 1)[1]} for t in want_targets]
            rep = profile(targets, concurrency=SERVE["concurrency"], requests=SERVE["requests"], output_tokens=SERVE["output_tokens"],
                          prompt_tokens=SERVE["prompt_tokens"], max_seconds=SERVE["max_seconds"], out=str(WORK / "profile"), seed=0, show_progress=False)
            state["profile"] = {"targets": {n: [{k: lv[k] for k in ("concurrency", "completed", "requests", "output_tokens_per_s", "ttft_s", "itl_s")} for lv in t["levels"]]
                                            for n, t in rep["targets"].items()}, "machine": machine_with_load(), "config": SERVE}
            save()
        state["wall_s"] = state.get("wall_s", 0.0) + time.time() - t_all
        save()
    write_md(state, students, seeds, sizes, a.vllm_student)


def speed(state, target: str) -> dict | None:
    levels = (state.get("profile") or {}).get("targets", {}).get(target)
    if not levels:
        return None
    best = max(levels, key=lambda lv: lv["output_tokens_per_s"] or 0)
    c1 = next(lv for lv in levels if lv["concurrency"] == 1)
    return {"best_tps": best["output_tokens_per_s"], "best_c": best["concurrency"], "c1_tps": c1["output_tokens_per_s"], "c1_itl_p50": c1["itl_s"]["p50"], "levels": levels}


def write_md(state, students, seeds, sizes, vllm_student) -> None:
    ev = state.get("eval") or {"splits": {"id": {}, "ood": {}}}
    t = speed(state, "teacher-onnx")
    serve = (state.get("profile") or {}).get("config") or SERVE  # what the recorded speed run used
    lines = [
        "# kdship student: the speed/quality frontier of pruned students (bench/student_frontier.py)",
        "",
        f"Machine: {(state.get('profile') or {}).get('machine') or machine_with_load()}.",
        "Teacher SmolLM2-135M-Instruct (30 layers, hidden 576, MLP 1536, 9 query / 3 KV heads). Each student: `kdship student` "
        "(depth by block importance, then width by activation importance, calibrated on the demo's store; a narrower hidden size in the residual "
        "stream's principal components (`--hidden-basis pca`, the default: rotated first, lm_head untied, so more parameters for the same compute) "
        "or its most active channels (`channels`)), then `kdship train` "
        f"with the demo's KD recipe and budget ({sizes.epochs} epochs of the demo's score store, {sizes.batch_tokens} tokens/step, lr {sizes.lr}, "
        f"the trainer's default loss), seeds {', '.join(map(str, seeds))}. Held-out: `kdship eval --task lm`, {state['settings']['items']} held-out chats "
        "(KL = full-vocabulary KL(teacher || student) per token, the live teacher) and Shakespeare (OOD perplexity).",
        f"Speed: `kdship export` (ONNX with KV cache, fp32) served by `kdship serve --backend onnx`, one `kdship profile` run over every "
        f"model (concurrency {', '.join(map(str, serve['concurrency']))}; {serve['requests']} requests per level, {serve['prompt_tokens']}-word prompts, "
        f"{serve['output_tokens']} output tokens, greedy); speed depends on the shape only (one export per shape). Per token at c=1: the teacher's median inter-token latency ÷ the student's.",
        "",
        "| student (layers x hidden, basis) | parameters | held-out KL (seeds) | held-out perplexity | OOD perplexity | best output tok/s (c) | ÷ teacher | per token at c=1 ÷ teacher | goals (>= 4x, >= 3x, KL <= 6x576's) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    ref_kl = None
    rows = []
    for name, shape, _ in students:
        st = state["students"].get(name)
        keys = [f"{name} | seed {sd}" for sd in seeds]
        if not st or not all(k in ev["splits"]["id"] for k in keys):
            continue
        kls = [ev["splits"]["id"][k]["kl_to_teacher"] for k in keys]
        kl = sum(kls) / len(kls)
        ppl = sum(ev["splits"]["id"][k]["perplexity"] for k in keys) / len(keys)
        ood = sum(ev["splits"]["ood"][k]["perplexity"] for k in keys) / len(keys)
        if name == REFERENCE:
            ref_kl = kl
        s = speed(state, f"{shape}-onnx")
        rows.append((name, st, kls, kl, ppl, ood, s))
    for name, st, kls, kl, ppl, ood, s in rows:
        if s and t:
            r_best, r_tok = s["best_tps"] / t["best_tps"], t["c1_itl_p50"] / s["c1_itl_p50"]
            sp = f"{s['best_tps']:.0f} ({s['best_c']}) | {r_best:.2f}x | {r_tok:.2f}x"
            goals = ", ".join(("yes" if ok else "no") for ok in (r_best >= 4, r_tok >= 3, ref_kl is not None and kl <= ref_kl))
        else:
            sp, goals = "- | - | -", "-"
        untied = " incl. an untied lm_head" if st.get("basis") == "pca" else ""
        lines.append(f"| {name} | {st['params'] / 1e6:.1f} M ({st['teacher_params'] / st['params']:.1f}x smaller{untied}) | {' / '.join(f'{x:.3f}' for x in kls)} (mean {kl:.4f}) | {ppl:.1f} | {ood:.0f} | {sp} | {goals} |")
    if t:
        tkl = ev["splits"]["id"].get("teacher", {})
        lines.append(f"| teacher 30x576 | {rows[0][1]['teacher_params'] / 1e6:.1f} M | 0 | {tkl.get('perplexity', float('nan')):.1f} | "
                     f"{ev['splits']['ood'].get('teacher', {}).get('perplexity', float('nan')):.0f} | {t['best_tps']:.0f} ({t['best_c']}) | 1 | 1 | |")
    prof = (state.get("profile") or {}).get("targets", {})
    if prof:
        lines += ["", f"Serving runtimes side by side (same run, same prompts): output tokens/s per concurrency, TTFT and inter-token latency (p50) at c=1.", "",
                  "| served model | runtime | " + " | ".join(f"tok/s c={c}" for c in serve["concurrency"]) + " | TTFT p50 c=1 (ms) | ITL p50 c=1 (ms) |",
                  "|---|---|" + "---|" * (len(serve["concurrency"]) + 2)]
        for who in ["teacher", vllm_student]:
            for rt in ("onnx", "vllm"):
                lv = prof.get(f"{who}-{rt}")
                if not lv:
                    continue
                c1 = next(x for x in lv if x["concurrency"] == 1)
                lines.append(f"| {who} | {'ONNX Runtime' if rt == 'onnx' else 'vLLM'} | " + " | ".join(f"{x['output_tokens_per_s']:.0f}" + ("" if x["completed"] == x["requests"] else f" ({x['completed']}/{x['requests']})") for x in lv)
                             + f" | {1000 * c1['ttft_s']['p50']:.0f} | {1000 * c1['itl_s']['p50']:.1f} |")
    if rows and t:
        plot(rows, t, ref_kl)
        lines += ["", "![frontier](student_frontier.png)"]
    runs = list(state["runs"].values())
    if runs:
        lines.append(f"\nTraining: {sum(r['train_s'] for r in runs) / len(runs):.0f} s per student on average ({runs[0]['steps']} steps); whole script {state.get('wall_s', 0) / 60:.0f} min.")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "student_frontier.md").write_text("\n".join(lines) + "\n")
    from run_all import merge

    merge()
    print("\n".join(lines), flush=True)


def plot(rows, t, ref_kl) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, title in ((axes[0], "best", "best output tokens/s ÷ teacher"), (axes[1], "c1", "per token at c=1 ÷ teacher")):
        for name, st, kls, kl, ppl, ood, s in rows:
            if not s:
                continue
            x = s["best_tps"] / t["best_tps"] if key == "best" else t["c1_itl_p50"] / s["c1_itl_p50"]
            ax.scatter([x], [kl])
            ax.annotate(name, (x, kl), textcoords="offset points", xytext=(4, 4))
        ax.axvline(4 if key == "best" else 3, ls="--", c="grey", lw=1)
        if ref_kl is not None:
            ax.axhline(ref_kl, ls=":", c="grey", lw=1)
        ax.set_xlabel(title)
        ax.set_ylabel("held-out KL to teacher (nat/token)")
        ax.grid(alpha=0.3)
    fig.suptitle("pruned SmolLM2-135M students after the demo's KD budget (ONNX Runtime, CPU)")
    fig.tight_layout()
    fig.savefig(RESULTS / "student_frontier.png", dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()

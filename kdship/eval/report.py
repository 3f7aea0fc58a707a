"""report.md (one table to read at a glance, then details) and report.png for ``kdship eval``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from kdship.eval.metrics import HIGHER_IS_BETTER

SPLIT_TITLES = {"id": "in-distribution", "ood": "OOD", "typo": "typo", "swap": "word swap", "distractor": "distractor"}


def _fmt(v: Any, pct: bool = False) -> str:
    if v is None:
        return "–"
    if isinstance(v, float):
        if pct:
            return f"{100 * v:.0f}%"
        return f"{v:.4g}" if abs(v) < 1e4 else f"{v:.3e}"
    return str(v)


def summary_table(report: dict[str, Any]) -> list[str]:
    """Rows = models; per split the primary metric with retention in brackets; ASR per perturbation."""
    metric = report["primary_metric"]
    splits = list(report["splits"])
    perts = [s for s in splits if s in report["perturbations"]]
    has_asr = report["task"] != "lm" and perts
    direction = "higher is better" if HIGHER_IS_BETTER[metric] else "lower is better"
    head = ["model"] + [f"{metric} {SPLIT_TITLES.get(s, s)}" for s in splits]
    has_kl = report["task"] == "lm" and any("kl_to_teacher" in m for m in report["splits"]["id"]["metrics"].values())
    if has_kl:
        head.append("KL to teacher (id)")
    judged = any("teacher_nll" in m for m in report["splits"]["id"]["metrics"].values())
    if judged:
        head += ["teacher NLL of own generations (id)", "ROUGE-L F1 vs teacher's answer (id)", "repeated 4-grams (id)"]
    if has_asr:
        head += [f"ASR {SPLIT_TITLES.get(s, s)}" for s in perts]
    intro = f"**{metric}** ({direction})"
    if report["reference_model"]:
        intro += f"; in brackets: retention vs `{report['reference_model']}` (oriented: 100% = the teacher's level, higher is better)"
    else:
        intro += "; no reference model, so no retention (give --teacher DIR or a model named teacher)"
    if has_kl:
        intro += "; KL to teacher in nats per scored token (lower is better)"
    if judged:
        intro += ("; teacher NLL = the teacher's nats per token of the model's own greedy output given the prompt "
                  "(lower = the teacher would have written it; read it with the repeated 4-gram share: a loop is cheap to predict)")
    if has_asr:
        intro += ". ASR = attack success rate (share of items right before the perturbation and wrong after; lower is better)"
    lines = [
        intro + ".",
        "",
        "| " + " | ".join(head) + " |",
        "|" + "|".join(["---"] + ["---:"] * (len(head) - 1)) + "|",
    ]
    for name in report["models"]:
        cells = [f"`{name}`"]
        for s in splits:
            v = report["splits"][s]["metrics"][name].get(metric)
            r = report["retention"].get(s, {}).get(name, {}).get(metric, {}).get("retention")
            cells.append(_fmt(v) + (f" ({_fmt(r, pct=True)})" if r is not None else ""))
        if has_kl:
            cells.append(_fmt(report["splits"]["id"]["metrics"][name].get("kl_to_teacher")))
        if judged:
            cells += [_fmt(report["splits"]["id"]["metrics"][name].get(k)) for k in ("teacher_nll", "rouge_l_f1_vs_teacher", "repeated_4gram_share")]
        if has_asr:
            for s in perts:
                cells.append(_fmt(report["splits"][s]["metrics"][name].get("attack_success_rate"), pct=True))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def write_markdown(report: dict[str, Any], path: str | Path) -> None:
    lines = [f"# kdship eval: {report['task']} task", ""]
    lines += summary_table(report)
    lines += ["", "## Setup", ""]
    lines.append(f"- data: `{report['data']}`" + (f"; OOD: `{report['ood']}`" if report["ood"] else ""))
    lines.append("- models: " + ", ".join(f"`{n}` = `{m['path']}` ({m['runtime']}, {m['device']})" for n, m in report["models"].items()))
    if report.get("teacher_store"):
        lines.append(f"- teacher store: `{report['teacher_store']}` (KL: {report['kl_source']})")
    elif report.get("kl_source"):
        lines.append(f"- KL to teacher: {report['kl_source']}")
    if report["perturbations"]:
        lines.append(f"- perturbations: {', '.join(report['perturbations'])} (seed {report['seed']}, rate {report['perturb_rate']})")
    if report.get("perturbations_skipped"):
        lines.append(f"- {report['perturbations_skipped']}")
    lines.append(f"- {report['retention_note']}")
    lines += ["", "## All metrics", ""]
    for s, blk in report["splits"].items():
        names = list(blk["metrics"])
        keys = [k for k in blk["metrics"][names[0]] if k != "items"]
        lines += [f"### {SPLIT_TITLES.get(s, s)} ({blk['items']} items)", "", "| model | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
        for n in names:
            lines.append(f"| `{n}` | " + " | ".join(_fmt(blk["metrics"][n].get(k)) for k in keys) + " |")
        lines.append("")
    if report["retention"]:
        lines += ["## Retention (raw student / teacher values, ratio, oriented retention)", ""]
        lines += ["| split | model | metric | direction | student | teacher | ratio s/t | retention |", "|---|---|---|---|---:|---:|---:|---:|"]
        for s, per in report["retention"].items():
            for n, mets in per.items():
                for m, r in mets.items():
                    d = "higher better" if r["higher_is_better"] else "lower better"
                    lines.append(f"| {s} | `{n}` | {m} | {d} | {_fmt(r['student'])} | {_fmt(r['teacher'])} | {_fmt(r['ratio'])} | {_fmt(r['retention'])} |")
        lines.append("")
    lines.append(f"Per-item results: `items.jsonl`. Plot: `report.png`. Took {report['seconds']} s.")
    Path(path).write_text("\n".join(lines) + "\n", encoding="utf-8")


def write_plot(report: dict[str, Any], path: str | Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    metric = report["primary_metric"]
    splits = list(report["splits"])
    models = list(report["models"])
    with_ret = bool(report["retention"])
    fig, axes = plt.subplots(1, 2 if with_ret else 1, figsize=(11 if with_ret else 6, 4), squeeze=False)
    x = np.arange(len(splits))
    w = 0.8 / max(1, len(models))
    ax = axes[0][0]
    allv: list[float] = []
    for j, n in enumerate(models):
        vals = [report["splits"][s]["metrics"][n].get(metric) for s in splits]
        ax.bar(x + j * w - 0.4 + w / 2, [v if v is not None else 0 for v in vals], w, label=n, color=f"C{j}")
        allv += [v for v in vals if v]
    if allv and min(allv) > 0 and max(allv) / min(allv) > 20:
        ax.set_yscale("log")  # perplexities of very different models
    ax.set_xticks(x, [SPLIT_TITLES.get(s, s) for s in splits])
    ax.set_ylabel(f"{metric} ({'higher' if HIGHER_IS_BETTER[metric] else 'lower'} is better)")
    ax.set_title(f"{report['task']} task: {metric} per split")
    ax.legend(fontsize=8)
    if with_ret:
        ax = axes[0][1]
        students = [n for n in models if n != report["reference_model"]]
        w2 = 0.8 / max(1, len(students))
        for j, n in enumerate(students):
            vals = [report["retention"].get(s, {}).get(n, {}).get(metric, {}).get("retention") for s in splits]
            ax.bar(x + j * w2 - 0.4 + w2 / 2, [v if v is not None else 0 for v in vals], w2, label=n, color=f"C{models.index(n)}")
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_xticks(x, [SPLIT_TITLES.get(s, s) for s in splits])
        ax.set_ylabel(f"retention of {metric} (1 = teacher)")
        ax.set_title(f"retention vs {report['reference_model']}")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)

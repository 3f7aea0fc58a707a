"""`kdship eval`: a thin typer wrapper of ``kdship.eval.run.evaluate`` (heavy imports inside)."""

from __future__ import annotations

import json
from typing import List, Optional

import typer

DEFAULTS = {
    "data": None,
    "teacher": None,
    "ood": None,
    "perturb": "typo,swap,distractor",
    "out": "eval_report",
    "task": None,
    "reference": None,
    "batch_size": 8,
    "max_new_tokens": 64,
    "seed": 0,
    "perturb_rate": 0.1,
    "limit": None,
    "device": None,
    "dtype": "float32",
    "rouge_threshold": 0.5,
    "models": [],
}


def eval_command(
    model_args: Optional[List[str]] = typer.Argument(None, metavar="[NAME=]MODEL...", help="Models to evaluate: HF folders, `kdship train` runs, or kdship ONNX exports; NAME=PATH names them (default: the folder name)."),
    model: Optional[List[str]] = typer.Option(None, "--model", "-m", help="Another model, NAME=PATH (repeatable)."),
    data: Optional[str] = typer.Option(None, "--data", help="In-distribution data: JSONL / Parquet / datasets folder, or a kdship store (lm task on its sequences)."),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="Teacher: a model folder (evaluated too, and the retention reference) or a kdship store (KL from its top-k)."),
    ood: Optional[str] = typer.Option(None, "--ood", help="Out-of-distribution data of the same task."),
    perturb: Optional[str] = typer.Option(None, "--perturb", help="Seeded adversarial copies of the data: comma list of typo,swap,distractor; 'none' for none (default all three)."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Report folder (report.json, report.md, report.png, items.jsonl). Default eval_report."),
    task: Optional[str] = typer.Option(None, "--task", help="lm | answer | choice | generation (default: detected from the rows)."),
    reference: Optional[str] = typer.Option(None, "--reference", help="Model name that retention divides by (default: 'teacher')."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help="Sequences per forward / generate call (default 8)."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help="Greedy generation length for answer/generation tasks (default 64)."),
    seed: Optional[int] = typer.Option(None, "--seed", help="Perturbation seed (default 0)."),
    perturb_rate: Optional[float] = typer.Option(None, "--perturb-rate", help="Share of words edited by typo/swap (default 0.1, at least one)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Evaluate only the first N rows of each split."),
    device: Optional[str] = typer.Option(None, "--device", help="cuda | cpu (default cuda when available)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="float32 (default) | bfloat16 | float16."),
    rouge_threshold: Optional[float] = typer.Option(None, "--rouge-threshold", help="generation task: ROUGE-L F1 counted as 'right' for attack success (default 0.5)."),
    config: Optional[str] = typer.Option(None, "--config", help="YAML file of these options (flags override it); `models:` may list NAME=PATH."),
    no_progress: bool = typer.Option(False, "--no-progress", help="No progress bars."),
    as_json: bool = typer.Option(False, "--json", help="Print report.json to stdout."),
) -> None:
    """Score models on a task (perplexity/KL, exact match, choice accuracy, ROUGE-L), their retention of the
    teacher, and robustness on an OOD split and seeded typo/swap/distractor copies (attack success rate)."""
    from kdship.config import ConfigError, resolve

    flags = dict(
        data=data, teacher=teacher, ood=ood, perturb=perturb, out=out, task=task, reference=reference, batch_size=batch_size,
        max_new_tokens=max_new_tokens, seed=seed, perturb_rate=perturb_rate, limit=limit, device=device, dtype=dtype,
        rouge_threshold=rouge_threshold,
    )
    try:
        cfg = resolve(dict(DEFAULTS), config, flags)
    except ConfigError as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    specs = list(cfg.pop("models") or []) + list(model_args or []) + list(model or [])
    if cfg["data"] is None:
        typer.echo("error: --data is required (JSONL / Parquet / datasets folder / kdship store)", err=True)
        raise typer.Exit(2)
    if str(cfg["perturb"]).strip().lower() in ("none", ""):
        cfg["perturb"] = None

    from kdship.data import DataError
    from kdship.eval.run import EvalError, evaluate, parse_model_specs
    from kdship.eval.tasks import TaskError

    try:
        models = parse_model_specs(specs)
        report = evaluate(models, progress=not no_progress, **cfg)
    except (EvalError, TaskError, DataError, ValueError) as e:
        typer.echo(f"error: {e}", err=True)
        raise typer.Exit(2)
    if as_json:
        typer.echo(json.dumps(report, indent=1, default=str))
        return
    from kdship.eval.report import summary_table

    typer.echo("\n".join(summary_table(report)))
    typer.echo(f"\nwrote {report['files']['markdown']}, {report['files']['json']}, {report['files']['plot']}, {report['files']['items']}")

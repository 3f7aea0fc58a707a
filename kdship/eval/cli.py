"""`kdship eval`: a thin typer wrapper of ``kdship.eval.run.evaluate`` (heavy imports inside)."""

from __future__ import annotations

import json
from typing import List, Optional

import typer

from kdship.config import signature_defaults, with_default
from kdship.eval.run import evaluate

DEFAULTS = {"models": [], "data": None, **signature_defaults(evaluate, exclude=("models", "data", "progress"))}


def eval_command(
    model_args: Optional[List[str]] = typer.Argument(None, metavar="[NAME=]MODEL...", help="Models to evaluate: HF folders, `kdship train` runs, or kdship ONNX exports; NAME=PATH names them (default: the folder name)."),
    model: Optional[List[str]] = typer.Option(None, "--model", "-m", help="Another model, NAME=PATH (repeatable)."),
    data: Optional[str] = typer.Option(None, "--data", help="In-distribution data: JSONL / Parquet / datasets folder, or a kdship store (lm task on its sequences)."),
    teacher: Optional[str] = typer.Option(None, "--teacher", help="Teacher: a model folder (evaluated too, and the retention reference) or a kdship store (KL from its top-k)."),
    ood: Optional[str] = typer.Option(None, "--ood", help="Out-of-distribution data of the same task."),
    perturb: Optional[str] = typer.Option(None, "--perturb", help=with_default("Seeded adversarial copies of the data: comma list of typo,swap,distractor; 'none' for none.", DEFAULTS, "perturb")),
    out: Optional[str] = typer.Option(None, "--out", "-o", help=with_default("Report folder (report.json, report.md, report.png, items.jsonl).", DEFAULTS, "out")),
    task: Optional[str] = typer.Option(None, "--task", help="lm | answer | choice | generation (default: detected from the rows)."),
    reference: Optional[str] = typer.Option(None, "--reference", help="Model name that retention divides by (default: 'teacher')."),
    batch_size: Optional[int] = typer.Option(None, "--batch-size", help=with_default("Sequences per forward / generate call.", DEFAULTS, "batch_size")),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help=with_default("Greedy generation length for answer/generation tasks.", DEFAULTS, "max_new_tokens")),
    seed: Optional[int] = typer.Option(None, "--seed", help=with_default("Perturbation seed.", DEFAULTS, "seed")),
    perturb_rate: Optional[float] = typer.Option(None, "--perturb-rate", help=with_default("Share of words edited by typo/swap (at least one).", DEFAULTS, "perturb_rate")),
    limit: Optional[int] = typer.Option(None, "--limit", help="Evaluate only the first N rows of each split."),
    device: Optional[str] = typer.Option(None, "--device", help="cuda | cpu (default cuda when available)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help=with_default("float32 | bfloat16 | float16.", DEFAULTS, "dtype")),
    rouge_threshold: Optional[float] = typer.Option(None, "--rouge-threshold", help=with_default("generation task: ROUGE-L F1 counted as 'right' for attack success.", DEFAULTS, "rouge_threshold")),
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

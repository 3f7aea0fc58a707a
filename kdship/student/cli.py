"""`kdship student TEACHER --out DIR --layers N [...]`: a thin typer wrapper of ``kdship.student.run.student``."""

from __future__ import annotations

from typing import Optional

import typer

from kdship.config import with_default
from kdship.student.run import DEFAULTS


def student_command(
    teacher: str = typer.Argument(..., help="The teacher: a local HF causal-LM directory (Llama family for width pruning)."),
    out: Optional[str] = typer.Option(None, "--out", help="Output HF directory (config, safetensors, tokenizer, kdship_prune.json). Required."),
    layers: Optional[int] = typer.Option(None, "--layers", help="Decoder layers the student keeps (1 to the teacher's; all = no depth pruning). Required."),
    hidden: Optional[int] = typer.Option(None, "--hidden", help="Hidden size (a multiple of the teacher's head_dim). Default: the teacher's."),
    intermediate: Optional[int] = typer.Option(None, "--intermediate", help="MLP width. Default: the teacher's."),
    heads: Optional[int] = typer.Option(None, "--heads", help="Attention (query) heads: a multiple of the teacher's KV heads keeps every KV group, a multiple of the group size drops whole groups. Default: the teacher's."),
    calibration: Optional[str] = typer.Option(None, "--calibration", help="Text the importance is measured on: a data file `kdship cache` reads (JSONL/Parquet) or a kdship store. Required: pruning should rank on text like the student's."),
    hidden_basis: Optional[str] = typer.Option(None, "--hidden-basis", help=with_default("With a smaller --hidden: pca keeps the residual stream's principal components (rotated first, SliceGPT style; the lm_head is untied), channels keeps its most active channels.", DEFAULTS, "hidden_basis")),
    calibration_tokens: Optional[int] = typer.Option(None, "--calibration-tokens", help=with_default("Calibration tokens read.", DEFAULTS, "calibration_tokens")),
    max_length: Optional[int] = typer.Option(None, "--max-length", help=with_default("Longest calibration sequence (tokens; longer ones are cut).", DEFAULTS, "max_length")),
    overwrite: Optional[bool] = typer.Option(None, "--overwrite/--no-overwrite", help=with_default("Replace a model already in --out.", DEFAULTS, "overwrite")),
    progress: Optional[bool] = typer.Option(None, "--progress/--no-progress", help=with_default("Progress bar for the calibration forward.", DEFAULTS, "progress")),
    config: Optional[str] = typer.Option(None, "--config", help="YAML file of these options (flags override it)."),
) -> None:
    """Initialise a student from the teacher by pruning, Minitron style (docs/student.md).

    Depth: keeps --layers layers chosen by Block Influence and calibration loss. Width: keeps the hidden
    channels, MLP neurons and attention heads with the largest activations on the calibration text,
    embeddings and lm_head narrowed along. The output directory is what `kdship train --student` takes.
    """
    import json
    import logging

    from kdship.config import ConfigError
    from kdship.data import DataError
    from kdship.store import StoreError
    from kdship.student.run import student
    from kdship.student.width import StudentError

    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    flags = dict(
        out=out, layers=layers, hidden=hidden, intermediate=intermediate, heads=heads, calibration=calibration, hidden_basis=hidden_basis,
        calibration_tokens=calibration_tokens, max_length=max_length, overwrite=overwrite, progress=progress,
    )  # fmt: skip
    try:
        info = student(teacher, config=config, **flags)
    except (StudentError, ConfigError, DataError, StoreError) as e:
        typer.echo(f"kdship student: error: {e}", err=True)
        raise typer.Exit(2)
    typer.echo(json.dumps({k: info[k] for k in ("kept_layers", "strategy", "shape", "teacher_params", "student_params")}, indent=1))

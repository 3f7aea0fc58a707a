"""`kdship export` command line: a thin wrapper over :func:`kdship.export.run.export`."""

from __future__ import annotations

import os
from typing import Optional

import typer

from kdship.config import signature_defaults, with_default
from kdship.export.run import export

DEFAULTS = {"out": None, **signature_defaults(export, exclude=("out", "strict", "show"), rename={"formats": "format"})}


def export_command(
    run_dir: str = typer.Argument(..., help="A `kdship train` run folder (student in RUN_DIR/final/) or any HF causal-LM folder."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Output folder, e.g. export/NAME (gets hf/, onnx/, export_report.json)."),
    format: Optional[str] = typer.Option(None, "--format", help=with_default("Comma-separated formats: hf, onnx.", DEFAULTS, "format")),
    quantize: Optional[str] = typer.Option(None, "--quantize", help="int8: also write onnx/model.int8.onnx (dynamic int8 weights)."),
    verify: Optional[bool] = typer.Option(None, "--verify/--no-verify", help=with_default("Compare the exports with PyTorch.", DEFAULTS, "verify")),
    store: Optional[str] = typer.Option(None, "--store", help="A teacher store: also report KL(teacher||model) on held-out positions per format (default: the run's own store, from RUN_DIR/kdship_run.json)."),
    prompts: Optional[int] = typer.Option(None, "--prompts", help=with_default("Fixed prompts for the logit/greedy checks.", DEFAULTS, "prompts")),
    new_tokens: Optional[int] = typer.Option(None, "--new-tokens", help=with_default("Greedy tokens per prompt compared.", DEFAULTS, "new_tokens")),
    atol: Optional[float] = typer.Option(None, "--atol", help=with_default("Max |logit diff| allowed for fp32 ONNX vs PyTorch.", DEFAULTS, "atol")),
    kl_positions: Optional[int] = typer.Option(None, "--kl-positions", help=with_default("Held-out store positions for the KL.", DEFAULTS, "kl_positions")),
    heldout_fraction: Optional[float] = typer.Option(None, "--heldout-fraction", help="Held-out share of the store (default: the run's, from its manifest; else 0.02)."),
    vllm: Optional[bool] = typer.Option(None, "--vllm/--no-vllm", help=with_default("Load the hf export in vLLM during --verify.", DEFAULTS, "vllm")),
    config: Optional[str] = typer.Option(None, "--config", help="YAML file with these options (flags override it)."),
) -> None:
    """Export a trained student to HF (transformers/vLLM) and ONNX (KV cache, optional int8); verify it."""
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # in-process vLLM for the check: seconds
    os.environ.setdefault("VLLM_LOGGING_STREAM", "ext://sys.stderr")
    from kdship.config import ConfigError, resolve

    flags = dict(
        out=out, format=format, quantize=quantize, verify=verify, store=store, prompts=prompts, new_tokens=new_tokens,
        atol=atol, kl_positions=kl_positions, heldout_fraction=heldout_fraction, vllm=vllm,
    )  # fmt: skip
    try:
        cfg = resolve(dict(DEFAULTS), config, flags)
    except ConfigError as e:
        typer.echo(f"kdship export: {e}", err=True)
        raise typer.Exit(2)
    if not cfg["out"]:
        typer.echo("kdship export: --out is required (e.g. --out export/my-student)", err=True)
        raise typer.Exit(2)
    from kdship.export.onnx import ExportError
    from kdship.export.verify import VerificationError

    try:
        export(
            run_dir, cfg["out"], formats=cfg["format"], quantize=cfg["quantize"], verify=cfg["verify"], store=cfg["store"],
            prompts=cfg["prompts"], new_tokens=cfg["new_tokens"], atol=cfg["atol"], kl_positions=cfg["kl_positions"],
            heldout_fraction=cfg["heldout_fraction"], vllm=cfg["vllm"], show=True,
        )  # fmt: skip
    except ExportError as e:
        typer.echo(f"kdship export: {e}", err=True)
        raise typer.Exit(2)
    except VerificationError as e:
        typer.echo(f"kdship export: verification failed: {e}", err=True)
        raise typer.Exit(1)

"""`kdship export` command line: a thin wrapper over :func:`kdship.export.run.export`."""

from __future__ import annotations

import os
from typing import Optional

import typer

DEFAULTS = {
    "out": None,
    "format": "hf,onnx",
    "quantize": None,
    "verify": True,
    "store": None,
    "prompts": 8,
    "new_tokens": 16,
    "atol": 1e-3,
    "kl_positions": 2048,
    "heldout_fraction": None,
    "vllm": True,
}


def export_command(
    run_dir: str = typer.Argument(..., help="A `kdship train` run folder (student in RUN_DIR/final/) or any HF causal-LM folder."),
    out: Optional[str] = typer.Option(None, "--out", "-o", help="Output folder, e.g. export/NAME (gets hf/, onnx/, export_report.json)."),
    format: Optional[str] = typer.Option(None, "--format", help="Comma-separated formats: hf, onnx (default hf,onnx)."),
    quantize: Optional[str] = typer.Option(None, "--quantize", help="int8: also write onnx/model.int8.onnx (dynamic int8 weights)."),
    verify: Optional[bool] = typer.Option(None, "--verify/--no-verify", help="Compare the exports with PyTorch (default on)."),
    store: Optional[str] = typer.Option(None, "--store", help="A teacher store: also report KL(teacher||model) on held-out positions per format (default: the run's own store, from RUN_DIR/kdship_run.json)."),
    prompts: Optional[int] = typer.Option(None, "--prompts", help="Fixed prompts for the logit/greedy checks (default 8)."),
    new_tokens: Optional[int] = typer.Option(None, "--new-tokens", help="Greedy tokens per prompt compared (default 16)."),
    atol: Optional[float] = typer.Option(None, "--atol", help="Max |logit diff| allowed for fp32 ONNX vs PyTorch (default 1e-3)."),
    kl_positions: Optional[int] = typer.Option(None, "--kl-positions", help="Held-out store positions for the KL (default 2048)."),
    heldout_fraction: Optional[float] = typer.Option(None, "--heldout-fraction", help="Held-out share of the store (default: the run's, from its manifest; else 0.02)."),
    vllm: Optional[bool] = typer.Option(None, "--vllm/--no-vllm", help="Load the hf export in vLLM during --verify (default on)."),
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
    from kdship.export.run import export
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

"""`kdship serve` command line: a thin wrapper over :func:`kdship.serve.server.serve`."""

from __future__ import annotations

from typing import Optional

import typer

from kdship.serve.engine import DEFAULT_MAX_BATCH, DEFAULT_MAX_QUEUE
from kdship.serve.guard import DEFAULT_MAX_BODY_BYTES

DEFAULTS = {
    "backend": "onnx",
    "host": "127.0.0.1",
    "port": 8000,
    "api_key": None,
    "api_key_file": None,
    "insecure_no_auth": False,
    "max_body_bytes": None,
    "max_batch": None,
    "max_queue": None,
    "int8": False,
    "max_model_len": None,
    "served_model_name": None,
    "log_level": "info",
    "threads": None,
    "spin": True,
}


def serve_command(
    model_dir: str = typer.Argument(..., help="A `kdship export` folder (uses OUT/hf or OUT/onnx), or an HF model directory for --backend vllm."),
    backend: Optional[str] = typer.Option(None, "--backend", help="vllm (vLLM's OpenAI server) or onnx (ONNX Runtime + continuous batching). Default onnx."),
    host: Optional[str] = typer.Option(None, "--host", help="Interface to bind. Default 127.0.0.1 (loopback only); any other needs an API key or --insecure-no-auth."),
    port: Optional[int] = typer.Option(None, "--port", help="TCP port. Default 8000."),
    api_key: Optional[str] = typer.Option(None, "--api-key", help="Require 'Authorization: Bearer KEY' on /v1/*. Shows in `ps`: prefer env KDSHIP_API_KEY or --api-key-file."),
    api_key_file: Optional[str] = typer.Option(None, "--api-key-file", help="Read the API key from the first line of this file."),
    insecure_no_auth: Optional[bool] = typer.Option(None, "--insecure-no-auth", is_flag=True, help="Allow a --host beyond loopback without an API key."),
    max_body_bytes: Optional[int] = typer.Option(None, "--max-body-bytes", help=f"Larger request bodies get 413 (onnx; default {DEFAULT_MAX_BODY_BYTES})."),
    max_batch: Optional[int] = typer.Option(None, "--max-batch", help=f"Most sequences decoded together (onnx default {DEFAULT_MAX_BATCH}; vllm --max-num-seqs)."),
    max_queue: Optional[int] = typer.Option(None, "--max-queue", help=f"Requests waiting for a batch slot before 429 (onnx; default {DEFAULT_MAX_QUEUE})."),
    int8: Optional[bool] = typer.Option(None, "--int8/--fp32", help="Serve the int8 ONNX model (onnx backend; export with --quantize int8)."),
    max_model_len: Optional[int] = typer.Option(None, "--max-model-len", help="Context limit, prompt + output tokens (default: the model's, at most 2048 for vllm)."),
    served_model_name: Optional[str] = typer.Option(None, "--served-model-name", help="Model id clients send. Default: the export folder's name."),
    log_level: Optional[str] = typer.Option(None, "--log-level", help="debug, info, warning, error."),
    threads: Optional[int] = typer.Option(None, "--threads", help="ONNX Runtime intra-op threads (onnx; default one per core)."),
    spin: Optional[bool] = typer.Option(None, "--spin/--no-spin", help="ONNX Runtime idle threads busy-wait (default, lowest latency); --no-spin on shared CPUs."),
    config: Optional[str] = typer.Option(None, "--config", help="YAML file with these options (flags override it)."),
) -> None:
    """Serve an exported student as an OpenAI-compatible HTTP endpoint (Ctrl-C / SIGTERM drains and stops)."""
    from kdship.config import ConfigError, resolve
    from kdship.runtime.server_process import ServeError
    from kdship.serve.server import serve

    flags = dict(
        backend=backend, host=host, port=port, api_key=api_key, api_key_file=api_key_file, insecure_no_auth=insecure_no_auth,
        max_body_bytes=max_body_bytes, max_batch=max_batch, max_queue=max_queue, int8=int8,
        max_model_len=max_model_len, served_model_name=served_model_name, log_level=log_level, threads=threads,
        spin=spin,
    )  # fmt: skip
    if api_key:
        typer.echo("kdship serve: warning: --api-key shows the key to anyone who can run `ps`; prefer env KDSHIP_API_KEY or --api-key-file", err=True)
    try:
        cfg = resolve(DEFAULTS, config, flags)
        code = serve(model_dir, **cfg)
    except (ConfigError, ServeError) as e:
        typer.echo(f"kdship serve: {e}", err=True)
        raise typer.Exit(2)
    raise typer.Exit(code)

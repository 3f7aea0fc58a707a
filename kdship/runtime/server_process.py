"""A `kdship serve` server in a child process, and where an export folder keeps what a backend serves.

``launch(...)`` starts ``kdship serve`` in a child process and returns a :class:`ServerHandle`
(``.url``, ``.stop()``) once ``/health`` answers: for `kdship profile`, the demo, benches and tests.
``resolve_model_dir`` finds the backend's format inside an export folder (``hf/`` for vLLM, ``onnx/``
for ONNX Runtime); `kdship serve` uses the same function, so both refuse a folder for the same reason.
"""

from __future__ import annotations

import contextlib
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
    max_body_bytes: int | None = None,
    insecure_no_auth: bool = False,
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
    if max_body_bytes is not None:
        cmd += ["--max-body-bytes", str(max_body_bytes)]
    if insecure_no_auth:
        cmd += ["--insecure-no-auth"]
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
    # A wildcard address is not one to connect to: probe it on loopback.
    url_host = {"0.0.0.0": "127.0.0.1", "::": "[::1]"}.get(host, f"[{host}]" if ":" in host else host)
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

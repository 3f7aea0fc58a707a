"""Test helper: a real S3-compatible server (moto's server mode) on 127.0.0.1 for stores on s3://,
and shard-by-shard comparison of two stores' arrays. conftest.py registers the ``s3`` fixture."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request

import numpy as np
import pytest

from kdship.store import StoreReader

BUCKET = "kdship-test"


def start_moto_server(log_path) -> tuple[subprocess.Popen, str]:
    """moto's S3 server in its own process on a free loopback port, answering; (process, endpoint URL).

    Its own process: moto's server is a Flask app, and Flask's context proxies in a process's modules
    break vLLM's engine start-up there (its Triton-kernel rebinding touches every module attribute,
    and a proxy raises "Working outside of application context"). bench/store_writers_s3.py uses it too."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with open(log_path, "wb") as fh:
        server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)], stdout=fh, stderr=subprocess.STDOUT)
    endpoint = f"http://127.0.0.1:{port}"
    deadline = time.time() + 60
    while True:
        try:
            urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2)
            return server, endpoint
        except OSError:
            if server.poll() is not None or time.time() > deadline:
                server.kill()
                raise RuntimeError(f"moto server did not start on {endpoint}:\n{open(log_path).read()[-2000:]}") from None
            time.sleep(0.2)


S3_ENV = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on a free loopback port (start_moto_server); env for this process and the writers it starts."""
    import fsspec.config

    try:
        server, endpoint = start_moto_server(tmp_path_factory.mktemp("moto") / "server.log")
    except RuntimeError as e:
        pytest.fail(str(e))
    env = {**S3_ENV, "FSSPEC_S3_ENDPOINT_URL": endpoint}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    fsspec.config.conf.setdefault("s3", {})["endpoint_url"] = endpoint  # fsspec read the environment at import
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(endpoint_url=endpoint)
    fs.mkdir(BUCKET)
    yield {"fs": fs, "env": {**os.environ, **env}, "s3_env": env}
    server.terminate()
    server.wait(30)
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    fsspec.config.conf.get("s3", {}).pop("endpoint_url", None)


def store_arrays(url):
    """Every committed shard's arrays, by shard path (checksums verified on read)."""
    r = StoreReader(str(url))
    return {p: r.read_shard(p) for p in r.shard_paths}


# the shard arrays two stores of the same rows must hold identically
COMPARED_ARRAYS = ("tokens", "offsets", "loss_mask", "target_ids", "target_logprobs", "target_counts", "rest_logmass", "token_logprob")


def cache_cmd(teacher, data, url, *extra) -> list[str]:
    """`kdship cache` of ``data`` into ``url``, one shard per row, hf backend, as its own process."""
    return [sys.executable, "-m", "kdship", "cache", str(teacher), str(data), "--out", str(url), "--backend", "hf", "--shard-size", "1", "--no-progress", *extra]


def assert_same_arrays(a, b):
    assert list(a) == list(b)
    for p in a:
        for name in COMPARED_ARRAYS:
            np.testing.assert_array_equal(getattr(a[p], name), getattr(b[p], name), err_msg=f"{p}/{name}")

"""Test helper: a real S3-compatible server (moto's server mode) on 127.0.0.1 for stores on s3://,
and shard-by-shard comparison of two stores' arrays. conftest.py registers the ``s3`` fixture."""

from __future__ import annotations

import os
import socket

import numpy as np
import pytest

from kdship.store import StoreReader

BUCKET = "kdship-test"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on a free loopback port; env for this process and the writers it starts."""
    import fsspec.config
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1", "FSSPEC_S3_ENDPOINT_URL": endpoint}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    fsspec.config.conf.setdefault("s3", {})["endpoint_url"] = endpoint  # fsspec read the environment at import
    import s3fs

    s3fs.S3FileSystem.clear_instance_cache()
    fs = s3fs.S3FileSystem(endpoint_url=endpoint)
    fs.mkdir(BUCKET)
    yield {"fs": fs, "env": {**os.environ, **env}, "s3_env": env}
    server.stop()
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


def assert_same_arrays(a, b):
    assert list(a) == list(b)
    for p in a:
        for name in ("tokens", "offsets", "loss_mask", "target_ids", "target_logprobs", "target_counts", "rest_logmass", "token_logprob"):
            np.testing.assert_array_equal(getattr(a[p], name), getattr(b[p], name), err_msg=f"{p}/{name}")

"""`kdship serve` facing the network: binding beyond loopback, keys, body limits, internal errors, and
the incremental detokeniser the streams rely on.

One real server on 0.0.0.0 (key from the environment, a 4 KiB body limit, a served name of its own,
and a chat template that fails at render time: a server-side fault whose detail must stay in the log).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import httpx
import numpy as np
import pytest

from serve_helpers import API_KEY, exported_student_dir, raw_http


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, tiny_student):
    return exported_student_dir(tmp_path_factory, tiny_student)


@pytest.fixture(scope="module")
def tokenizer(export_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(export_dir / "onnx"))


@pytest.fixture(scope="module")
def public_server(export_dir, tmp_path_factory):
    from kdship.runtime.server_process import launch

    broken = tmp_path_factory.mktemp("broken_template") / "student"
    shutil.copytree(export_dir / "onnx", broken / "onnx")
    (broken / "onnx" / "chat_template.jinja").write_text("{{ 1 / 0 }}")  # ZeroDivisionError when rendered
    h = launch(broken, backend="onnx", host="0.0.0.0", api_key=API_KEY, served_model_name="kd-student", max_model_len=64, max_body_bytes=4096)
    yield h
    h.stop()


def test_public_bind_without_a_key_is_refused_before_loading(export_dir):
    from kdship.runtime.server_process import API_KEY_ENV, free_port

    env = {k: v for k, v in os.environ.items() if k != API_KEY_ENV}
    cmd = [sys.executable, "-m", "kdship", "serve", str(export_dir), "--host", "0.0.0.0", "--port", str(free_port())]
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2, p.stderr
    for named in ("refusing to bind 0.0.0.0", API_KEY_ENV, "--api-key-file", "--insecure-no-auth"):
        assert named in p.stderr
    assert "ready" not in p.stderr  # refused before the model was loaded


def test_public_server_takes_its_key_from_the_environment(public_server):
    h = public_server
    assert h.url.startswith("http://127.0.0.1:")  # bound to 0.0.0.0, reached over loopback
    with open(f"/proc/{h.pid}/cmdline", "rb") as f:
        assert API_KEY.encode() not in f.read()  # nothing for `ps` to show
    assert httpx.get(h.url + "/v1/models").status_code == 401
    wrong = httpx.get(h.url + "/v1/models", headers={"Authorization": "Bearer sk-wrong"})
    assert wrong.status_code == 401 and wrong.json()["error"]["type"] == "authentication_error"
    models = httpx.get(h.url + "/v1/models", headers=h.headers())
    assert models.status_code == 200
    card = models.json()["data"][0]
    assert card["id"] == "kd-student" and card["root"] == "kd-student"
    assert not any("/" in str(v) for v in card.values()), card  # no server paths


def test_api_key_file_and_precedence(tmp_path, monkeypatch):
    from kdship.runtime.server_process import API_KEY_ENV, ServeError
    from kdship.serve.server import check_bind, resolve_api_key

    monkeypatch.setenv(API_KEY_ENV, "from-env")
    key_file = tmp_path / "key"
    key_file.write_text("from-file\n")
    assert resolve_api_key(None, key_file) == "from-file"
    assert resolve_api_key(None, None) == "from-env"
    assert resolve_api_key("from-flag", None) == "from-flag"
    with pytest.raises(ServeError, match="not both"):
        resolve_api_key("from-flag", key_file)
    key_file.write_text("\n")
    with pytest.raises(ServeError, match="first line is empty"):
        resolve_api_key(None, key_file)
    with pytest.raises(ServeError, match="cannot read"):
        resolve_api_key(None, tmp_path / "missing")
    check_bind("127.0.0.1", None, False)
    check_bind("::1", None, False)
    check_bind("0.0.0.0", None, insecure_no_auth=True)
    check_bind("0.0.0.0", "k", False)
    with pytest.raises(ServeError, match="--insecure-no-auth"):
        check_bind("192.0.2.7", None, False)


def test_body_limit_counts_a_chunked_body_as_it_arrives(public_server):
    h = public_server
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode()
    # No Content-Length to check up front: 4097 bytes in chunks, and the final chunk never sent.
    chunks = tuple(f"{n:x}\r\n".encode() + b"x" * n + b"\r\n" for n in (1024, 1024, 1024, 1025))
    status, body = raw_http(h.url, head, chunks, timeout=30)
    assert status == 413
    assert "4096 bytes" in json.loads(body)["error"]["message"]
    # Under the limit the request goes through to validation as usual.
    small = httpx.post(h.url + "/v1/completions", json={"prompt": "the cat " * 100, "max_tokens": 2}, headers=h.headers())
    assert small.status_code == 400 and small.json()["error"]["param"] == "prompt"  # over the 64-token context
    big = httpx.post(h.url + "/v1/completions", json={"prompt": "the cat " * 600, "max_tokens": 2}, headers=h.headers())
    assert big.status_code == 413


def test_oversized_body_is_drained_so_http_client_reads_the_413(public_server):
    """http.client (and so `requests`) writes the whole body before reading: had the server closed
    while 10 MB were still arriving, the client would see a broken pipe, never the 413."""
    import http.client
    from urllib.parse import urlsplit

    h = public_server
    u = urlsplit(h.url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=60)
    try:
        conn.request("POST", "/v1/completions", body=b"x" * (10 << 20), headers={**h.headers(), "Content-Type": "application/json"})
        r = conn.getresponse()
        assert r.status == 413
        assert r.getheader("Connection") == "close"
        err = json.loads(r.read())["error"]
        assert err["code"] == 413 and "4096 bytes" in err["message"] and "--max-body-bytes" in err["message"]
    finally:
        conn.close()
    ok = httpx.post(h.url + "/v1/completions", json={"prompt": "the cat", "max_tokens": 2}, headers=h.headers())
    assert ok.status_code == 200  # and the server keeps serving


def test_internal_error_shows_a_request_id_not_its_text(public_server):
    h = public_server
    r = httpx.post(h.url + "/v1/chat/completions", json={"messages": [{"role": "user", "content": "hi"}]}, headers=h.headers(), timeout=60)
    assert r.status_code == 500
    err = r.json()["error"]
    assert err["type"] == "server_error" and "request id req-" in err["message"]
    assert "ZeroDivision" not in r.text and "division" not in r.text and "/" not in err["message"]
    request_id = err["message"].split("request id ")[1].split(")")[0]
    log = h.log_tail(200)
    assert request_id in log and "ZeroDivisionError" in log and "Traceback" in log  # the detail, server-side
    ok = httpx.post(h.url + "/v1/completions", json={"prompt": "the cat", "max_tokens": 2}, headers=h.headers())
    assert ok.status_code == 200  # and the server keeps serving


# --------------------------------------------------------------------------- incremental detokenisation
def _pieces(tokenizer, ids: list[int]) -> tuple[list[str], int]:
    from kdship.serve.detok import IncrementalDetokenizer

    d = IncrementalDetokenizer(tokenizer)
    pieces = [d.push(t) for t in ids]
    pieces.append(d.flush())
    return pieces, d.decoded_tokens


def test_detokenizer_never_splits_a_character(tokenizer):
    text = "héllo wörld, 日本語 and 🙂🙂 naïve café"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert len(ids) > len(text.encode("utf-8")) // 2  # byte-level: the non-ASCII characters span several tokens
    pieces, _ = _pieces(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)


def test_detokenizer_matches_a_full_decode_on_random_tokens_in_linear_time(tokenizer):
    rng = np.random.default_rng(0)
    ids = [int(t) for t in rng.integers(0, len(tokenizer), size=2000)]  # invalid UTF-8 runs, special tokens
    pieces, decoded = _pieces(tokenizer, ids)
    assert "".join(pieces) == tokenizer.decode(ids, skip_special_tokens=True)
    # Re-decoding the whole output at every token would decode ~2,000,000 tokens.
    assert decoded < 20 * len(ids), decoded


def test_draining_server_answers_503_and_finishes_its_streams(export_dir):
    """What the lifespan does on SIGTERM (draining on, the engine stops taking requests and finishes
    the ones it has), triggered directly on a live server: a new request gets 503 and /health 503,
    while a stream already running ends with all its tokens. (After a real SIGTERM uvicorn stops
    accepting connections first, so a client cannot reach this state from outside.)"""
    import threading
    import time

    import uvicorn

    from kdship.runtime.server_process import free_port
    from kdship.serve.server import build_onnx_app

    app = build_onnx_app(export_dir / "onnx", max_batch=2, max_queue=8, max_model_len=128)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    serving = threading.Thread(target=server.run, daemon=True)
    serving.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(url + "/health", timeout=2).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        assert time.monotonic() < deadline, "server did not come up"
        time.sleep(0.1)
    state = app.state.kd
    tokens, started = [], threading.Event()

    def stream():
        body = {"prompt": "the cat", "max_tokens": 60, "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data: {"):
                    ev = json.loads(line[6:])
                    if ev.get("usage"):
                        tokens.append(ev["usage"]["completion_tokens"])
                    started.set()

    streamer = threading.Thread(target=stream)
    streamer.start()
    try:
        assert started.wait(60), "the stream never started"
        state.draining = True  # as the lifespan does after SIGTERM
        drainer = threading.Thread(target=state.engine.shutdown, args=(True, 60.0))
        drainer.start()
        late = httpx.post(url + "/v1/completions", json={"prompt": "too late", "max_tokens": 2}, timeout=30)
        assert late.status_code == 503 and late.json()["error"]["type"] == "server_error", late.text
        assert httpx.get(url + "/health", timeout=10).status_code == 503
        streamer.join(120)
        drainer.join(60)
        assert tokens == [60]  # the running stream was finished, not cut
    finally:
        server.should_exit = True
        serving.join(60)

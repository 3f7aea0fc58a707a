"""`kdship serve --backend onnx`: the real server in a child process on 127.0.0.1, a real HTTP client.

Outputs are checked against ONNX Runtime run directly (OnnxCausalLM.generate) on the same export, so a
batching or KV-cache merge bug shows up as different tokens.
"""

from __future__ import annotations

import concurrent.futures as cf
import json
import re
import signal
import statistics
import threading
import time

import httpx
import pytest

from serve_helpers import API_KEY, exported_student_dir, raw_http, sse_events


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory, tiny_student):
    return exported_student_dir(tmp_path_factory, tiny_student)


@pytest.fixture(scope="module")
def ort_model(export_dir):
    from kdship.runtime.onnx import OnnxCausalLM

    return OnnxCausalLM(export_dir / "onnx")


@pytest.fixture(scope="module")
def server(export_dir):
    from kdship.runtime.server_process import launch

    h = launch(export_dir, backend="onnx", api_key=API_KEY, max_batch=8, max_queue=64, max_model_len=256)
    yield h
    h.stop()


@pytest.fixture(scope="module")
def client(server):
    with httpx.Client(base_url=server.url, headers=server.headers(), timeout=60) as c:
        yield c


def _greedy_text(ort_model, prompt: str, n: int) -> tuple[str, list[int]]:
    ids = ort_model.tokenizer(prompt).input_ids
    out = ort_model.generate([ids], n, temperature=0.0, stop_token_ids=[])[0]
    return ort_model.tokenizer.decode(out, skip_special_tokens=True), out


def test_binds_loopback_health_models_metrics(server, client):
    assert server.url.startswith("http://127.0.0.1:")
    assert httpx.get(server.url + "/health").json()["status"] == "ok"  # no key needed for probes
    models = client.get("/v1/models").json()
    assert [m["id"] for m in models["data"]] == ["student"]
    assert models["data"][0]["max_model_len"] == 256
    card = models["data"][0]
    assert card["model_file"] == "model.onnx"  # which file, never where it lives
    assert not any("/" in str(v) for v in card.values()), card
    metrics = httpx.get(server.url + "/metrics")
    assert metrics.status_code == 200 and metrics.headers["content-type"].startswith("text/plain")
    for name in ("kdship_requests_total", "kdship_queue_depth", "kdship_decode_batch_size_bucket", "kdship_time_to_first_token_seconds_bucket"):
        assert name in metrics.text


def test_api_key_required_on_v1(server):
    body = {"prompt": "the cat", "max_tokens": 2}
    assert httpx.post(server.url + "/v1/completions", json=body).status_code == 401
    r = httpx.post(server.url + "/v1/completions", json=body, headers={"Authorization": "Bearer wrong"})
    assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    assert httpx.get(server.url + "/v1/models").status_code == 401


def test_completion_equals_onnx_runtime_greedy(client, ort_model):
    prompt = "The quick dog runs over the hill"
    r = client.post("/v1/completions", json={"model": "student", "prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200, r.text
    j = r.json()
    expected, ids = _greedy_text(ort_model, prompt, 12)
    assert j["object"] == "text_completion"
    assert j["choices"][0]["text"] == expected
    assert j["choices"][0]["finish_reason"] == "length"
    assert j["usage"] == {"prompt_tokens": len(ort_model.tokenizer(prompt).input_ids), "completion_tokens": 12, "total_tokens": j["usage"]["prompt_tokens"] + 12}
    # Token-id prompts are accepted too.
    r2 = client.post("/v1/completions", json={"prompt": ort_model.tokenizer(prompt).input_ids, "max_tokens": 12, "temperature": 0, "ignore_eos": True})
    assert r2.json()["choices"][0]["text"] == expected


def test_streaming_completion_and_chat(client, ort_model):
    prompt = "Two red birds"
    full = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 10, "temperature": 0, "ignore_eos": True}).json()
    ev = sse_events(client, "/v1/completions", {"prompt": prompt, "max_tokens": 10, "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}})
    assert ev[-1] == "[DONE]"
    chunks = [e for e in ev[:-1] if e["choices"]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == full["choices"][0]["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert len(chunks) >= 3  # streamed in pieces, not one blob
    assert ev[-2]["usage"]["completion_tokens"] == 10

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the red cat?"}]
    chat = client.post("/v1/chat/completions", json={"messages": messages, "max_tokens": 8, "temperature": 0, "ignore_eos": True}).json()
    assert chat["object"] == "chat.completion" and chat["choices"][0]["message"]["role"] == "assistant"
    # The chat template comes from the tokenizer: the same prompt sent as text gives the same answer.
    templated = ort_model.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    ids = ort_model.tokenizer(templated, add_special_tokens=False).input_ids
    assert chat["usage"]["prompt_tokens"] == len(ids)
    out = ort_model.generate([ids], 8, stop_token_ids=[])[0]
    assert chat["choices"][0]["message"]["content"] == ort_model.tokenizer.decode(out, skip_special_tokens=True)
    cev = sse_events(client, "/v1/chat/completions", {"messages": messages, "max_tokens": 8, "temperature": 0, "ignore_eos": True, "stream": True})
    assert cev[0]["choices"][0]["delta"] == {"role": "assistant"} and cev[0]["object"] == "chat.completion.chunk"
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in cev[:-1]) == chat["choices"][0]["message"]["content"]


def test_stop_strings_and_seeded_sampling(client, ort_model):
    prompt = "Some good old trees"
    text, _ = _greedy_text(ort_model, prompt, 24)
    # A stop string from the middle of the greedy answer (plain ASCII: a random model also emits
    # partial UTF-8 bytes, which decode to U+FFFD until complete).
    stop = next(text[i : i + 3] for i in range(4, len(text) - 3) if all(c.isascii() and c.isalnum() for c in text[i : i + 3]))
    r = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 24, "temperature": 0, "ignore_eos": True, "stop": [stop]}).json()
    assert r["choices"][0]["finish_reason"] == "stop"
    assert r["choices"][0]["text"] == text[: text.index(stop)]
    ev = sse_events(client, "/v1/completions", {"prompt": prompt, "max_tokens": 24, "temperature": 0, "ignore_eos": True, "stop": stop, "stream": True})
    assert "".join(e["choices"][0]["text"] for e in ev[:-1]) == text[: text.index(stop)]  # held-back text never leaks

    body = {"prompt": prompt, "max_tokens": 16, "temperature": 1.0, "top_p": 0.9, "seed": 1234, "ignore_eos": True}
    a = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    b = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
    others = {client.post("/v1/completions", json={**body, "seed": s}).json()["choices"][0]["text"] for s in range(5)}
    assert a == b
    assert len(others | {a}) > 1  # sampling really samples


@pytest.mark.parametrize(
    "path, body, status, param",
    [
        ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
        ("/v1/completions", {"prompt": "x", "temperature": -1}, 400, "temperature"),
        ("/v1/completions", {"prompt": "x", "top_p": 1.5}, 400, "top_p"),
        ("/v1/completions", {"prompt": "x", "n": 2}, 400, "n"),
        ("/v1/completions", {"prompt": "x", "max_tokens": "many"}, 400, "max_tokens"),
        ("/v1/completions", {"prompt": "x", "frobnicate": True}, 400, "frobnicate"),
        ("/v1/completions", {"prompt": ""}, 400, "prompt"),
        ("/v1/completions", {"max_tokens": 3}, 400, "prompt"),
        ("/v1/completions", {"prompt": [1, 2, 10**9]}, 400, "prompt"),
        ("/v1/completions", {"prompt": "the cat " * 200}, 400, "prompt"),  # over the 256-token context
        ("/v1/completions", {"prompt": "the cat", "max_tokens": 1000}, 400, "max_tokens"),
        ("/v1/completions", {"prompt": "x", "model": "someone-else"}, 404, "model"),
        ("/v1/chat/completions", {"messages": []}, 400, "messages"),
        ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
    ],
)
def test_bad_requests_get_json_errors_and_server_survives(client, path, body, status, param):
    r = client.post(path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["message"]
    assert client.get("/health").status_code == 200


def test_malformed_json_and_unknown_route(client):
    r = client.post("/v1/completions", content=b'{"prompt": "x", ', headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    assert client.get("/v1/nothing-here").status_code == 404
    assert client.post("/v1/completions", json={"prompt": "ok", "max_tokens": 2}).status_code == 200


def _metric(text: str, name: str) -> float:
    m = re.search(rf"^{re.escape(name)} ([0-9.e+-]+)$", text, re.M)
    return float(m.group(1)) if m else 0.0


def test_concurrent_requests_are_batched_and_correct(server, client, ort_model):
    prompts = [f"{w} dog sees the {v} river" for w in ("one", "two", "three", "red", "blue", "old") for v in ("green", "small", "happy", "new")]
    lengths = [6 + (i % 5) * 3 for i in range(len(prompts))]  # sequences join and leave the batch at different steps
    expected = [_greedy_text(ort_model, p, n)[0] for p, n in zip(prompts, lengths)]
    before = httpx.get(server.url + "/metrics").text

    def ask(i):
        r = client.post("/v1/completions", json={"prompt": prompts[i], "max_tokens": lengths[i], "temperature": 0, "ignore_eos": True})
        return r.status_code, r.json()["choices"][0]["text"]

    with cf.ThreadPoolExecutor(len(prompts)) as pool:
        got = list(pool.map(ask, range(len(prompts))))
    assert [s for s, _ in got] == [200] * len(prompts)
    assert [t for _, t in got] == expected
    after = httpx.get(server.url + "/metrics").text
    steps = _metric(after, "kdship_decode_batch_size_count") - _metric(before, "kdship_decode_batch_size_count")
    tokens = _metric(after, "kdship_generation_tokens_total") - _metric(before, "kdship_generation_tokens_total")
    assert tokens == sum(lengths)
    assert steps < tokens - len(prompts)  # fewer decode passes than one-at-a-time would need: batched
    single = _metric(after, 'kdship_decode_batch_size_bucket{le="1.0"}') - _metric(before, 'kdship_decode_batch_size_bucket{le="1.0"}')
    assert single < steps


def test_int8_server_queue_full_429_then_sigterm_drains(export_dir):
    from kdship.runtime.server_process import launch

    h = launch(export_dir, backend="onnx", max_batch=1, max_queue=4, int8=True)
    try:
        assert httpx.get(h.url + "/v1/models").json()["data"][0]["model_file"] == "model.int8.onnx"
        body = {"prompt": "the old river", "max_tokens": 480, "temperature": 0, "ignore_eos": True}
        with cf.ThreadPoolExecutor(12) as pool:
            rs = list(pool.map(lambda _: httpx.post(h.url + "/v1/completions", json=body, timeout=300), range(12)))
        codes = sorted(r.status_code for r in rs)
        assert 429 in codes and set(codes) <= {200, 429}, codes
        assert codes.count(200) >= 5  # one running + four queued always fit
        assert all(r.json()["error"]["type"] == "rate_limit_error" for r in rs if r.status_code == 429)
        assert httpx.get(h.url + "/health").status_code == 200

        # SIGTERM while one request streams and four wait in the queue: all five finish in full.
        results: dict[int, object] = {}
        started = threading.Event()

        def stream_one():
            with httpx.Client(timeout=300) as c:
                results[0] = sse_events_after(c, h.url, started)

        def queued(i):
            results[i] = httpx.post(h.url + "/v1/completions", json=body, timeout=300)

        t0 = threading.Thread(target=stream_one)
        t0.start()
        assert started.wait(60)
        waiters = [threading.Thread(target=queued, args=(i,)) for i in (1, 2, 3, 4)]
        for t in waiters:
            t.start()
        deadline = time.monotonic() + 60
        while httpx.get(h.url + "/health").json()["queue_depth"] < 4:  # all four accepted and waiting
            assert time.monotonic() < deadline, "the four requests never sat in the queue together"
            time.sleep(0.005)
        h.process.send_signal(signal.SIGTERM)
        for t in [t0, *waiters]:
            t.join(300)
        code = h.process.wait(60)
        text0, finish0 = results[0]
        assert finish0 == "length" and text0  # the in-flight stream ran to max_tokens
        for i in (1, 2, 3, 4):
            assert results[i].status_code == 200 and results[i].json()["usage"]["completion_tokens"] == 480
        assert code in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after its graceful shutdown
        assert "Application shutdown complete" in h.log_tail(20)
        with pytest.raises(httpx.ConnectError):
            httpx.get(h.url + "/health", timeout=2)
    finally:
        h.stop()


def sse_events_after(c: httpx.Client, url: str, started: threading.Event):
    import json

    text, finish = "", None
    body = {"prompt": "a long story", "max_tokens": 480, "temperature": 0, "ignore_eos": True, "stream": True}
    with c.stream("POST", url + "/v1/completions", json=body) as r:
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            ch = json.loads(line[6:])["choices"][0]
            text += ch["text"]
            finish = ch["finish_reason"] or finish
            started.set()
    return text, finish


def test_body_over_the_limit_refused_before_it_is_sent(server, client):
    # Content-Length says 10 MiB and no body byte is ever sent: the answer must come from the header alone.
    head = (
        f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {API_KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {10 << 20}\r\n\r\n"
    ).encode()
    status, body = raw_http(server.url, head, timeout=30)
    assert status == 413
    err = json.loads(body)["error"]
    assert err["code"] == 413 and "1048576 bytes" in err["message"] and err["type"] == "invalid_request_error"
    assert client.post("/v1/completions", json={"prompt": "ok", "max_tokens": 2}).status_code == 200


def test_huge_prompt_is_refused_from_its_prefix_and_another_stream_keeps_flowing(server, client, ort_model):
    """A ~1 MB prompt (under the 1 MiB body limit, far over the 256-token context) is refused after
    tokenising a prefix only: in less time than tokenising it whole takes here, and another client's
    stream keeps flowing meanwhile (prompts are tokenised on a worker thread, never on the event loop)."""
    huge = "the old dog runs over the hill " * 32000
    t0 = time.perf_counter()
    n_tokens = len(ort_model.tokenizer(huge).input_ids)
    tokenize_s = time.perf_counter() - t0
    arrivals: list[float] = []  # chunk arrival times; -1 separates one stream from the next
    stop = threading.Event()

    def stream_until_stopped():
        body = {"prompt": "a long story", "max_tokens": 200, "temperature": 0, "ignore_eos": True, "stream": True}
        with httpx.Client(base_url=server.url, headers=server.headers(), timeout=120) as c:
            while not stop.is_set():
                with c.stream("POST", "/v1/completions", json=body) as r:
                    arrivals.extend(time.perf_counter() for line in r.iter_lines() if line.startswith("data: {"))
                arrivals.append(-1.0)

    streamer = threading.Thread(target=stream_until_stopped)
    streamer.start()
    try:
        deadline = time.monotonic() + 60
        while len(arrivals) < 30:
            assert time.monotonic() < deadline, "the stream never got going"
            time.sleep(0.01)
        start = time.perf_counter()
        r = client.post("/v1/completions", json={"prompt": huge, "max_tokens": 1})
        end = time.perf_counter()
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
        msg = r.json()["error"]["message"]
        assert "at least" in msg and f"{len(huge):,} characters" in msg
        assert 256 <= int(msg.split("at least ")[1].split(" ")[0]) <= n_tokens  # a true lower bound
        assert end - start < 0.8 * tokenize_s, f"refused in {end - start:.3f} s; tokenising it whole takes {tokenize_s:.3f} s"
    finally:
        stop.set()
        streamer.join(120)
    gaps = [(a, b) for a, b in zip(arrivals, arrivals[1:]) if a > 0 and b > 0]
    during = [b - a for a, b in gaps if b > start and a < end]
    before = [b - a for a, b in gaps if b <= start]
    bound = max(0.5 * tokenize_s, 20 * statistics.median(before))
    assert not during or max(during) < bound, f"longest gap {max(during):.3f} s (tokenise {tokenize_s:.3f} s, median gap {statistics.median(before):.4f} s)"


def test_client_disconnect_mid_stream_frees_its_slot(server, client, ort_model):
    before = httpx.get(server.url + "/metrics").text
    body = {"prompt": "the old river", "max_tokens": 240, "temperature": 0, "ignore_eos": True, "stream": True}
    with httpx.Client(base_url=server.url, headers=server.headers(), timeout=60) as c:
        with c.stream("POST", "/v1/completions", json=body) as r:
            got = 0
            for line in r.iter_lines():
                got += line.startswith("data: {")
                if got == 3:
                    break  # leaving both blocks closes the connection mid-stream
    cancelled = 'kdship_finished_requests_total{finish_reason="cancelled"}'
    deadline = time.monotonic() + 30
    while True:
        after = httpx.get(server.url + "/metrics").text
        health = httpx.get(server.url + "/health").json()
        if _metric(after, cancelled) > _metric(before, cancelled) and health["running"] == 0:
            break
        assert time.monotonic() < deadline, f"the slot was not freed: {health}"
        time.sleep(0.02)
    assert _metric(after, "kdship_running_sequences") == 0
    generated = _metric(after, "kdship_generation_tokens_total") - _metric(before, "kdship_generation_tokens_total")
    assert 3 <= generated < 240  # stopped early, not run to max_tokens
    expected, _ = _greedy_text(ort_model, "the old river", 6)
    r = client.post("/v1/completions", json={"prompt": "the old river", "max_tokens": 6, "temperature": 0, "ignore_eos": True})
    assert r.status_code == 200 and r.json()["choices"][0]["text"] == expected


def test_streamed_pieces_join_to_the_full_text_with_multibyte_characters(client, ort_model):
    # The random student emits byte-level tokens that split UTF-8 characters; pick a prompt whose greedy
    # answer has non-ASCII text, so a piece cut inside a character would show.
    for prompt in ("Two red birds", "The quick dog", "Some good old trees", "a long story", "the cat", "Where is the fish"):
        expected, ids = _greedy_text(ort_model, prompt, 48)
        if any(not c.isascii() for c in expected):
            break
    else:
        pytest.skip("no prompt gave non-ASCII output")
    ev = sse_events(client, "/v1/completions", {"prompt": prompt, "max_tokens": 48, "temperature": 0, "ignore_eos": True, "stream": True})
    pieces = [e["choices"][0]["text"] for e in ev[:-1]]
    assert "".join(pieces) == expected
    full = client.post("/v1/completions", json={"prompt": prompt, "max_tokens": 48, "temperature": 0, "ignore_eos": True}).json()
    assert full["choices"][0]["text"] == expected
    # A piece ends inside a character only where the whole text has an invalid byte there too.
    pos = 0
    for p in pieces[:-1]:
        pos += len(p)
        if p.endswith("\ufffd"):
            assert expected[pos - 1] == "\ufffd"

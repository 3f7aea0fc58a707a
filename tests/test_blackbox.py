"""Black-box / chain-of-thought distillation: generation filters, and the OpenAI-compatible teacher
backend end to end against vLLM's real OpenAI server on 127.0.0.1 (one server for this module).

The server's logprobs are checked against a plain transformers forward pass of the same weights;
retries are exercised through a real fault-injecting HTTP proxy in front of the real server.
"""

from __future__ import annotations

import http.server
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import numpy as np
import pytest

from kdship.cache.backends import Generation
from kdship.cache.filters import FilterError, filter_generations, reference_answer
from kdship.data import validate_record

# --------------------------------------------------------------------------------------------------
# Filters (no server)


def _gen(ids, finish="stop"):
    return Generation(token_ids=list(ids), topk_ids=np.zeros((len(ids), 1), np.int32), topk_logprobs=np.zeros((len(ids), 1), np.float32), finish_reason=finish)


def test_answer_match_keeps_matching_and_rejects_the_rest_with_reasons():
    row = {"prompt": "Tom has 3 apples and buys 4. How many?", "answer": "3 + 4 = 7\n#### 7"}
    texts = ["3+4=7 so #### 7", "The answer is 7.", "He has 8 apples.", "no idea", "3 + 4 = 7.0 apples\n#### 7.0"]
    gens = [_gen([1, 2, 3]), _gen([4, 5]), _gen([6]), _gen([7, 8]), _gen([9, 9, 9])]
    res = filter_generations(row, gens, texts, row_index=5, answer_match=True, dedupe=True)
    assert res.kept_indices == [0, 1, 4]
    assert [r["reason"] for r in res.rejects] == ["answer_mismatch", "no_answer"]
    assert [r["sample"] for r in res.rejects] == [2, 3]
    assert all(r["row"] == 5 for r in res.rejects)
    assert "'8'" in res.rejects[0]["detail"] and "'7'" in res.rejects[0]["detail"]
    assert res.counts == {"kept": 3, "answer_mismatch": 1, "no_answer": 1}


def test_length_bounds_duplicates_and_unfinished():
    gens = [_gen([1, 2, 3]), _gen([1]), _gen([1, 2, 3]), _gen(list(range(10))), _gen([5, 6, 7], finish="length"), _gen([4, 4, 4])]
    res = filter_generations({"prompt": "x"}, gens, None, row_index=0, min_new_tokens=2, max_new_tokens=5, dedupe=True, require_finished=True)
    assert res.kept_indices == [0, 5]
    assert {r["sample"]: r["reason"] for r in res.rejects} == {1: "too_short", 2: "duplicate", 3: "too_long", 4: "unfinished"}
    # without dedupe the duplicate is kept; nothing else changes
    res2 = filter_generations({"prompt": "x"}, gens, None, min_new_tokens=2, max_new_tokens=5, dedupe=False, require_finished=True)
    assert res2.kept_indices == [0, 2, 5]


def test_reference_answer_sources_and_missing_reference_is_an_error():
    assert reference_answer({"prompt": "q", "answer": "#### 1,234"}) == "1234"
    assert reference_answer({"prompt": "q", "final_answer": 12}) == "12"
    assert reference_answer({"prompt": "q", "response": "so the answer is 42."}) == "42"
    row = validate_record({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "It is 5 + 5 = 10"}]})
    assert reference_answer(row) == "10"
    with pytest.raises(FilterError, match="row 3"):
        filter_generations({"prompt": "no answer here"}, [_gen([1])], ["#### 1"], row_index=3, answer_match=True)


# --------------------------------------------------------------------------------------------------
# A real vLLM OpenAI server on loopback


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def vllm_server(tiny_teacher, tmp_path_factory):
    port = _free_port()
    log = tmp_path_factory.mktemp("vllm_server") / "server.log"
    env = dict(os.environ, VLLM_ENABLE_V1_MULTIPROCESSING="0", VLLM_CPU_KVCACHE_SPACE="1", VLLM_CPU_NUM_OF_RESERVED_CPU="0", OMP_NUM_THREADS="2")
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(tiny_teacher), "--host", "127.0.0.1",
           "--port", str(port), "--dtype", "float32", "--max-model-len", "256", "--enforce-eager", "--seed", "0"]
    with open(log, "wb") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 240
    try:
        while True:
            if proc.poll() is not None:
                pytest.fail(f"vLLM server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
            try:
                urllib.request.urlopen(f"{url}/health", timeout=2)
                break
            except OSError:
                if time.time() > deadline:
                    pytest.fail(f"vLLM server not healthy after 240 s:\n{log.read_text()[-3000:]}")
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


@pytest.fixture(scope="module")
def hf_teacher(tiny_teacher):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(tiny_teacher, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(tiny_teacher)


def _hf_logprobs(model, ids: list[int]) -> np.ndarray:
    import torch

    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0]
    return torch.log_softmax(logits.double(), -1).numpy()  # row j predicts token j+1


def test_generate_returns_token_ids_and_teacher_topk(vllm_server, tiny_teacher, hf_teacher):
    from kdship.cache.openai_backend import OpenAIBackend

    model, tok = hf_teacher
    be = OpenAIBackend(vllm_server, tokenizer=tiny_teacher, top_logprobs=8)
    assert be.vocab_size() == len(tok)
    assert be.effective_top_k(32) == 8 and be.effective_top_k(4) == 4
    prompts = [tok("The quick dog runs")["input_ids"], tok("Two red birds")["input_ids"]]
    gens = be.generate(prompts, top_k=32, samples=2, temperature=1.0, top_p=1.0, max_new_tokens=6, seeds=[11, 12])
    assert len(gens) == 2 and all(len(g) == 2 for g in gens)
    for p, row in zip(prompts, gens):
        for g in row:
            G = len(g.token_ids)
            assert 1 <= G <= 6 and g.topk_ids.shape == (G, 8) and g.topk_logprobs.dtype == np.float32
            ref = _hf_logprobs(model, p + g.token_ids)
            for j in range(G):
                want = ref[len(p) - 1 + j]
                order = np.argsort(-want)[:8]
                # top-1 ids agree; all logprobs agree with transformers to 1e-4 nat
                assert g.topk_ids[j, 0] == order[0]
                np.testing.assert_allclose(g.topk_logprobs[j], want[g.topk_ids[j]], atol=1e-4)
                assert np.all(np.diff(g.topk_logprobs[j]) <= 0)
    # same seed, same draws (reproducible through the API)
    again = be.generate(prompts[:1], top_k=8, samples=2, temperature=1.0, top_p=1.0, max_new_tokens=6, seeds=[11])
    assert [g.token_ids for g in again[0]] == [g.token_ids for g in gens[0]]
    assert be.stats["key_collisions"] == 0 and be.stats["unmapped_keys"] == 0
    be.close()


def test_score_prompt_logprobs_by_token_id_match_transformers(vllm_server, tiny_teacher, hf_teacher):
    from kdship.cache.openai_backend import OpenAIBackend

    model, tok = hf_teacher
    be = OpenAIBackend(vllm_server, tokenizer=tiny_teacher)  # server cap: vLLM's default max_logprobs 20
    seq = tok("Many small cats see the river near the old city.")["input_ids"]
    [(ids, lps)] = be.score([seq], top_k=be.effective_top_k(32))
    assert ids.shape == (len(seq), 20)
    assert ids[0, 0] == -1 and np.isneginf(lps[0]).all()  # row 0 has no target
    ref = _hf_logprobs(model, seq)
    for j in range(1, len(seq)):
        want = ref[j - 1]
        np.testing.assert_array_equal(ids[j, :3], np.argsort(-want)[:3])
        np.testing.assert_allclose(lps[j], want[ids[j]], atol=1e-4)
    be.close()


def test_server_refusal_is_a_clear_error(vllm_server, tiny_teacher):
    from kdship.cache.openai_backend import OpenAIBackend, OpenAIBackendError

    be = OpenAIBackend(vllm_server, tokenizer=tiny_teacher, top_logprobs=64, max_retries=0)  # above the server's cap of 20
    with pytest.raises(OpenAIBackendError, match="logprobs"):
        be.generate([[5, 6, 7]], top_k=64, samples=1, temperature=1.0, top_p=1.0, max_new_tokens=2, seeds=[0])
    be.close()


class _FlakyProxy(http.server.ThreadingHTTPServer):
    """Forwards to the real server, but answers the first ``fail`` POSTs with 429 (Retry-After: 0) / 503 alternately."""

    def __init__(self, target: str, fail: int):
        self.target, self.fail, self.seen = target, fail, []
        super().__init__(("127.0.0.1", 0), _ProxyHandler)


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def _forward(self, method: str):
        srv: _FlakyProxy = self.server  # type: ignore[assignment]
        body = self.rfile.read(int(self.headers.get("content-length") or 0)) if method == "POST" else None
        if method == "POST" and srv.fail > 0:
            srv.fail -= 1
            code = 503 if srv.fail % 2 else 429
            srv.seen.append(code)
            self.send_response(code)
            if code == 429:
                self.send_header("Retry-After", "0")
            self.end_headers()
            self.wfile.write(b'{"error": "injected"}')
            return
        req = urllib.request.Request(srv.target + self.path, data=body, method=method, headers={"content-type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            data, code = r.read(), r.status
        srv.seen.append(code)
        self.send_response(code)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        self._forward("GET")

    def do_POST(self):
        self._forward("POST")


def test_retries_with_backoff_through_injected_429_and_503(vllm_server, tiny_teacher):
    from kdship.cache.openai_backend import OpenAIBackend, OpenAIBackendError

    proxy = _FlakyProxy(vllm_server, fail=3)
    threading.Thread(target=proxy.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{proxy.server_address[1]}"
        be = OpenAIBackend(url, tokenizer=tiny_teacher, top_logprobs=4, max_retries=4, backoff_base=0.05, max_concurrency=1)
        gens = be.generate([[5, 6, 7]], top_k=4, samples=1, temperature=0.0, top_p=1.0, max_new_tokens=3, seeds=[0])
        assert len(gens[0][0].token_ids) >= 1
        assert be.stats["retries"] == 3 and be.stats["http_errors"] == {"429": 2, "503": 1}
        assert proxy.seen[0] == 200 and proxy.seen[1:4] == [429, 503, 429]  # GET /models, then the POSTs and proxy.seen[-1] == 200
        # more failures than retries: a clear error naming the attempts
        proxy.fail = 10
        be2 = OpenAIBackend(url, model=be.model, tokenizer=tiny_teacher, top_logprobs=4, max_retries=2, backoff_base=0.01, max_concurrency=1)
        with pytest.raises(OpenAIBackendError, match="after 3 attempts"):
            be2.generate([[5, 6]], top_k=4, samples=1, temperature=0.0, top_p=1.0, max_new_tokens=2, seeds=[0])
        be.close()
        be2.close()
    finally:
        proxy.shutdown()
        proxy.server_close()
    # connection refused (nothing listens): retried, then the same clear error
    dead = OpenAIBackend(f"http://127.0.0.1:{_free_port()}", model="m", max_retries=1, backoff_base=0.01)
    with pytest.raises(OpenAIBackendError, match="ConnectError"):
        dead.score([[1, 2]], top_k=4)


def test_client_side_rate_limit_spaces_requests(vllm_server, tiny_teacher):
    from kdship.cache.openai_backend import OpenAIBackend

    be = OpenAIBackend(vllm_server, tokenizer=tiny_teacher, top_logprobs=2, rate_limit=5.0, max_concurrency=1)
    t0 = time.monotonic()
    be.score([[5, 6, 7]] * 6, top_k=2)
    # a bucket of 1 at 5 requests/s: 6 requests need at least 5 refills of 0.2 s
    assert time.monotonic() - t0 >= 1.0 - 0.05
    be.close()


def test_cache_generate_through_openai_backend_with_filters(vllm_server, tiny_teacher, tmp_path):
    """kdship cache --mode generate --backend openai: k recorded honestly, rejects written and counted."""
    from kdship.cache.openai_backend import OpenAIBackend
    from kdship.cache.run import cache
    from kdship.answers import extract_answer
    from kdship.store import StoreReader
    from kdship.tiny import synthetic_sentences, write_jsonl
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    be = OpenAIBackend(vllm_server, tokenizer=tiny_teacher)
    prompts = synthetic_sentences(16, seed=21)
    greedy = be.generate([tok(p)["input_ids"] for p in prompts], top_k=1, samples=1, temperature=0.0, top_p=1.0, max_new_tokens=24, seeds=[0] * 16)
    answers = [extract_answer(tok.decode(g[0].token_ids, skip_special_tokens=True)) for g in greedy]
    with_answer = [i for i, a in enumerate(answers) if a is not None]
    assert with_answer, "the tiny teacher's greedy outputs hold no number at all; pick other prompts"
    good = with_answer[0]
    rows = [
        {"prompt": prompts[good], "answer": f"#### {answers[good]}"},  # the teacher will match this
        {"prompt": prompts[good], "answer": "#### 987654321"},  # and never this
    ]
    data = write_jsonl(tmp_path / "cot.jsonl", rows)
    out = tmp_path / "bb.zarr"
    summary = cache(str(tiny_teacher), str(data), str(out), mode="generate", backend="openai", teacher_url=vllm_server, top_k=32,
                    samples=3, temperature=0.0, max_new_tokens=24, filter="answer-match", dedupe=True, progress=False)
    r = StoreReader(str(out))
    assert r.top_k == 20  # asked 32; the server returns at most 20 -> the store says 20
    samples = list(r.iter_samples())
    assert [s["sample_index"] for s in samples] == [0]  # row 0: one kept, two greedy duplicates rejected
    s = samples[0]
    gen_ids = s["tokens"][s["loss_mask"]].tolist()
    assert gen_ids == greedy[good][0].token_ids
    assert (s["topk_ids"][s["loss_mask"]][:, 0] >= 0).all()
    rejects = [json.loads(line) for line in (out / "rejects.jsonl").read_text().splitlines()]
    reasons = sorted((x["row"], x["reason"]) for x in rejects)
    assert reasons == [(0, "duplicate"), (0, "duplicate"), (1, "answer_mismatch"), (1, "answer_mismatch"), (1, "answer_mismatch")]
    assert summary["samples"] == 1


def test_string_keyed_top_logprobs_map_through_the_tokenizer_and_count_losses(tiny_teacher):
    """Servers without return_tokens_as_token_ids key top_logprobs by decoded text: map, count, pad."""
    from transformers import AutoTokenizer

    from kdship.cache.openai_backend import OpenAIBackend

    tok = AutoTokenizer.from_pretrained(tiny_teacher)
    one = next(t for t in ("the", " the", "cat", " cat") if len(tok.encode(t, add_special_tokens=False)) == 1)
    tid = tok.encode(one, add_special_tokens=False)[0]
    be = OpenAIBackend("http://127.0.0.1:9", model="m", tokenizer=tiny_teacher)  # no request is made
    row = {one: -0.5, "token_id:7": -1.0, "token_id:x": -2.0, "the quick brown fox": -3.0, f"token_id:{tid}": -4.0}
    ids, lps = be._row_from_dict(row, k=4, by_id=False)
    assert ids.tolist() == [tid, 7, -1, -1]  # two kept; padding, never invented entries
    assert lps[:2].tolist() == [-0.5, -1.0] and np.isneginf(lps[2:]).all()
    assert be.stats["unmapped_keys"] == 2 and be.stats["key_collisions"] == 1
    be.close()


def test_cache_score_through_openai_backend_identity_without_credentials(vllm_server, tiny_teacher, corpus_dir, tmp_path):
    """kdship cache --mode score --backend openai: targets for every trained row; the header identifies
    the teacher by the model id the server lists (another model behind the same URL is refused on
    resume) and keeps no credentials of the URL."""
    import zarr

    from kdship.cache.run import StoreMismatch, cache
    from kdship.store import HEADER_ATTR, StoreReader

    host = vllm_server.split("://", 1)[1]
    url = f"http://kd-user:s3cret-token@{host}/v1"
    out = tmp_path / "score.zarr"
    kw = dict(mode="score", backend="openai", teacher_url=url, top_k=8, targets="topk", shard_size=4, progress=False)
    summary = cache(str(tiny_teacher), str(corpus_dir / "pairs.jsonl"), str(out), **kw)
    assert summary["complete"] and summary["samples"] == 20
    r = StoreReader(str(out))
    teacher = r.header["teacher"]
    assert teacher["served_model"] == str(tiny_teacher)  # vLLM lists the --model it serves
    assert "s3cret" not in json.dumps(r.header) and teacher["url"] == f"http://{host}/v1"
    s = next(r.iter_samples())
    assert (s["topk_ids"][s["loss_mask"]][:, 0] >= 0).all()
    # the same store as if another model had answered behind this URL: resume is refused
    root = zarr.open_group(str(out), mode="r+")
    hdr = dict(root.attrs[HEADER_ATTR])
    hdr["teacher"] = dict(hdr["teacher"], served_model="another-model")
    root.attrs[HEADER_ATTR] = hdr
    with pytest.raises(StoreMismatch, match="teacher"):
        cache(str(tiny_teacher), str(corpus_dir / "pairs.jsonl"), str(out), **kw)

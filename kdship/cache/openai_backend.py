"""A teacher behind an OpenAI-compatible HTTP API (``kdship cache --backend openai --teacher-url URL``).

How the cache calls it::

    from kdship.cache.openai_backend import OpenAIBackend
    backend = OpenAIBackend("http://127.0.0.1:8000/v1", api_key=None, model=None,   # model: first of /v1/models
                            tokenizer=TEACHER_TOKENIZER_DIR,   # ids <-> text, vocab_size(); optional
                            top_logprobs=20, max_retries=6, rate_limit=None, max_concurrency=4)
    k = backend.effective_top_k(args.top_k)    # the k the store may honestly claim (header top_k)
    gens = backend.generate(prompt_ids, top_k=k, samples=N, temperature=..., top_p=..., max_new_tokens=..., seeds=[...])
    rows = backend.score(sequences, top_k=k)   # teacher-forced, vLLM servers only (prompt_logprobs)
    backend.stats   # requests, retries, http errors by code, unmapped / colliding top-logprob keys

What the API gives, and the limits (documented in docs/eval.md too):
- Requests go to ``POST {url}/completions`` with the prompt as a list of token ids (vLLM and the
  OpenAI legacy API accept that), ``logprobs=k``, ``n=samples`` and ``seed`` (at temperature 0 vLLM
  refuses n > 1, so greedy samples are asked one request each).
- Token identity. Plain OpenAI-style ``top_logprobs`` are keyed by the *decoded string*, so distinct
  tokens that decode alike collide (one is lost) and a string must be mapped back to an id. We ask
  for ``return_tokens_as_token_ids`` (vLLM: keys become ``"token_id:123"``) and ``return_token_ids``;
  a server that ignores them falls back to string keys mapped through ``tokenizer`` (a string that is
  not exactly one token is dropped). Both fallbacks are counted in ``stats`` (``unmapped_keys``,
  ``key_collisions``); a store built from string keys can hold fewer than k valid entries in a row,
  padded with id -1 / -inf as the format says.
- k: OpenAI caps top logprobs at 20, vLLM servers at their ``--max-logprobs`` (default 20). The
  backend never pads a row beyond what came back: ``effective_top_k(asked) = min(asked,
  top_logprobs)``, which the cache writes as the store's ``top_k``. A server refusing k answers
  400, turned into ``OpenAIBackendError`` saying which limit to raise.
- Teacher-forced scoring needs per-position prompt logprobs by token id: vLLM's extra field
  ``"prompt_logprobs": k`` (keyed by id, no collisions). Servers without it (OpenAI itself) can
  only generate; ``score`` then raises a clear error.
- Logprobs: vLLM reports raw log-softmax at temperature 1 by default (``logprobs_mode``), clamped
  at -9999 in JSON; we keep them as they come.
- Retries: 429, 5xx and connection / timeout errors are retried with exponential backoff (0.5 s
  doubling, capped at 30 s, jittered, ``Retry-After`` honoured) up to ``max_retries``; other 4xx are
  fatal at once with the server's message. ``rate_limit`` requests/s is a client-side token bucket
  shared by the worker threads. Resume is the cache's (shard-level): nothing is kept here.
"""

from __future__ import annotations

import json
import random
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from kdship.cache.backends import Generation, TeacherBackend, pad_topk

RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}
TOKEN_ID_PREFIX = "token_id:"


class OpenAIBackendError(RuntimeError):
    """The API refused or failed a request for good; the message holds the URL, status and body."""


class _RateLimiter:
    """Token bucket: at most ``rate`` requests per second on average, bursts of ``burst``."""

    def __init__(self, rate: float | None, burst: int = 1):
        self.rate = rate
        self.capacity = float(max(1, burst))
        self.tokens = self.capacity
        self.last = time.monotonic()
        self.lock = threading.Lock()

    def acquire(self) -> None:
        if not self.rate:
            return
        while True:
            with self.lock:
                now = time.monotonic()
                self.tokens = min(self.capacity, self.tokens + (now - self.last) * self.rate)
                self.last = now
                if self.tokens >= 1.0:
                    self.tokens -= 1.0
                    return
                wait = (1.0 - self.tokens) / self.rate
            time.sleep(wait)


class OpenAIBackend(TeacherBackend):
    name = "openai"

    def __init__(
        self,
        url: str,
        api_key: str | None = None,
        model: str | None = None,
        tokenizer: Any = None,
        top_logprobs: int = 20,
        max_retries: int = 6,
        rate_limit: float | None = None,
        max_concurrency: int = 4,
        timeout: float = 120.0,
        backoff_base: float = 0.5,
        backoff_max: float = 30.0,
    ):
        import httpx

        url = url.rstrip("/")
        if not url.endswith("/v1"):
            url = url + "/v1"
        self.url = url
        self.top_logprobs = int(top_logprobs)
        self.max_retries = int(max_retries)
        self.backoff_base, self.backoff_max = backoff_base, backoff_max
        self.max_concurrency = max(1, int(max_concurrency))
        self.limiter = _RateLimiter(rate_limit, burst=self.max_concurrency)
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.Client(headers=headers, timeout=timeout)
        self.stats: dict[str, Any] = {"requests": 0, "retries": 0, "http_errors": {}, "unmapped_keys": 0, "key_collisions": 0}
        self._stats_lock = threading.Lock()
        if isinstance(tokenizer, (str,)) or hasattr(tokenizer, "__fspath__"):
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
        self.tokenizer = tokenizer
        self.model = model or self._first_model()

    # -- HTTP ----------------------------------------------------------------------------------------
    def _count(self, key: str, n: int = 1, sub: str | None = None) -> None:
        with self._stats_lock:
            if sub is None:
                self.stats[key] = self.stats.get(key, 0) + n
            else:
                self.stats[key][sub] = self.stats[key].get(sub, 0) + n

    def _request(self, method: str, path: str, body: dict | None = None) -> dict:
        import httpx

        url = f"{self.url}{path}"
        for attempt in range(self.max_retries + 1):
            self.limiter.acquire()
            self._count("requests")
            retry_after = None
            try:
                r = self.client.request(method, url, json=body)
            except (httpx.TransportError, httpx.TimeoutException) as e:
                err = f"{type(e).__name__}: {e}"
                self._count("http_errors", sub=type(e).__name__)
            else:
                if r.status_code == 200:
                    try:
                        return r.json()
                    except json.JSONDecodeError as e:
                        raise OpenAIBackendError(f"{redact_url(url)}: answered 200 with a body that is not JSON: {r.text[:200]!r}") from e
                self._count("http_errors", sub=str(r.status_code))
                err = f"HTTP {r.status_code}: {r.text[:500]}"
                if r.status_code not in RETRY_STATUS:
                    hint = ""
                    if r.status_code == 400 and "logprobs" in r.text:
                        hint = (
                            f" (asked for {self.top_logprobs} logprobs: lower --top-k / top_logprobs, or start the "
                            "server with a larger --max-logprobs)"
                        )
                    raise OpenAIBackendError(f"{method} {redact_url(url)} failed: {err}{hint}")
                ra = r.headers.get("retry-after")
                try:
                    retry_after = float(ra) if ra is not None else None
                except ValueError:
                    retry_after = None
            if attempt == self.max_retries:
                raise OpenAIBackendError(f"{method} {redact_url(url)} failed after {self.max_retries + 1} attempts; last error: {err}")
            delay = min(self.backoff_max, self.backoff_base * (2**attempt)) * (0.5 + random.random() / 2)
            if retry_after is not None:
                delay = max(delay, min(retry_after, self.backoff_max))
            self._count("retries")
            time.sleep(delay)
        raise AssertionError("unreachable")

    def _first_model(self) -> str:
        data = self._request("GET", "/models")
        models = [m.get("id") for m in data.get("data", []) if m.get("id")]
        if not models:
            raise OpenAIBackendError(f"{redact_url(self.url)}/models lists no model; pass model=")
        return models[0]

    # -- TeacherBackend ------------------------------------------------------------------------------
    def vocab_size(self) -> int:
        if self.tokenizer is None:
            raise OpenAIBackendError(
                "the OpenAI API does not report the vocabulary size; pass the teacher's tokenizer (tokenizer=DIR)"
            )
        return len(self.tokenizer)

    def effective_top_k(self, top_k: int) -> int:
        """The k this backend can honestly fill per row: min(asked, the API's top_logprobs cap)."""
        return max(1, min(int(top_k), self.top_logprobs))

    def _key_to_id(self, key: str) -> int | None:
        if key.startswith(TOKEN_ID_PREFIX):
            try:
                return int(key[len(TOKEN_ID_PREFIX) :])
            except ValueError:
                return None
        if self.tokenizer is None:
            return None
        ids = self.tokenizer.encode(key, add_special_tokens=False)
        return int(ids[0]) if len(ids) == 1 else None

    def _row_from_dict(self, d: dict[str, Any] | None, k: int, by_id: bool) -> tuple[np.ndarray, np.ndarray]:
        if not d:
            return np.full(k, -1, np.int32), np.full(k, -np.inf, np.float32)
        ids: list[int] = []
        lps: list[float] = []
        seen: set[int] = set()
        for key, val in d.items():
            lp = val["logprob"] if isinstance(val, dict) else val
            tid = int(key) if by_id else self._key_to_id(str(key))
            if tid is None:
                self._count("unmapped_keys")
                continue
            if tid in seen:
                self._count("key_collisions")
                continue
            seen.add(tid)
            ids.append(tid)
            lps.append(float(lp))
        return pad_topk(ids, lps, k)

    def generate(
        self,
        prompts: list[list[int]],
        top_k: int,
        samples: int,
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        seeds: list[int],
    ) -> list[list[Generation]]:
        k = self.effective_top_k(top_k)

        def one(i: int) -> list[Generation]:
            body = {
                "model": self.model,
                "prompt": [int(t) for t in prompts[i]],
                "max_tokens": int(max_new_tokens),
                "temperature": float(temperature),
                "top_p": float(top_p),
                "n": int(samples),
                "seed": int(seeds[i]),
                "logprobs": k,
                "return_tokens_as_token_ids": True,
                "return_token_ids": True,
            }
            if temperature == 0.0 and samples > 1:
                # vLLM refuses n > 1 with greedy decoding: ask once per sample (the draws are equal;
                # --dedupe then keeps one), so the store still has what was asked for
                body["n"] = 1
                choices = []
                for _ in range(samples):
                    choices += self._request("POST", "/completions", body).get("choices", [])
            else:
                data = self._request("POST", "/completions", body)
                choices = sorted(data.get("choices", []), key=lambda c: c.get("index", 0))
            if len(choices) != samples:
                raise OpenAIBackendError(f"{redact_url(self.url)}/completions returned {len(choices)} choices for n={samples} (prompt {i})")
            return [self._generation(c, k, i) for c in choices]

        with ThreadPoolExecutor(self.max_concurrency) as pool:
            return list(pool.map(one, range(len(prompts))))

    def _generation(self, choice: dict[str, Any], k: int, prompt_i: int) -> Generation:
        lp = choice.get("logprobs") or {}
        tokens = lp.get("tokens") or []
        top = lp.get("top_logprobs") or []
        token_ids = choice.get("token_ids")
        if token_ids is None:
            token_ids = [self._key_to_id(t) for t in tokens]
            if any(t is None for t in token_ids):
                raise OpenAIBackendError(
                    f"prompt {prompt_i}: the server returned generated tokens as strings that do not map to single "
                    "token ids (no return_tokens_as_token_ids / return_token_ids support); pass the teacher's tokenizer"
                )
        token_ids = [int(t) for t in token_ids]
        if top and len(top) != len(token_ids):
            raise OpenAIBackendError(f"prompt {prompt_i}: {len(token_ids)} generated tokens but {len(top)} logprob rows")
        rows = [self._row_from_dict(top[j] if top else None, k, by_id=False) for j in range(len(token_ids))]
        ids = np.stack([r[0] for r in rows]) if rows else np.zeros((0, k), np.int32)
        lps = np.stack([r[1] for r in rows]) if rows else np.zeros((0, k), np.float32)
        return Generation(token_ids=token_ids, topk_ids=ids, topk_logprobs=lps, finish_reason=choice.get("finish_reason") or "length")

    def score(self, sequences: list[list[int]], top_k: int) -> list[tuple[np.ndarray, np.ndarray]]:
        k = self.effective_top_k(top_k)

        def one(i: int) -> tuple[np.ndarray, np.ndarray]:
            body = {
                "model": self.model,
                "prompt": [int(t) for t in sequences[i]],
                "max_tokens": 1,
                "temperature": 0.0,
                "prompt_logprobs": k,
                "add_special_tokens": False,
            }
            data = self._request("POST", "/completions", body)
            choices = data.get("choices") or [{}]
            plp = choices[0].get("prompt_logprobs")
            if plp is None:
                plp = data.get("prompt_logprobs")
            if plp is None:
                raise OpenAIBackendError(
                    f"{redact_url(self.url)}/completions returned no prompt_logprobs: teacher-forced scoring needs a vLLM-style "
                    "server; use --mode generate with this teacher"
                )
            if len(plp) != len(sequences[i]):
                raise OpenAIBackendError(f"sequence {i}: {len(sequences[i])} tokens but {len(plp)} prompt logprob rows")
            rows = [self._row_from_dict(d, k, by_id=True) for d in plp]
            return np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])

        with ThreadPoolExecutor(self.max_concurrency) as pool:
            return list(pool.map(one, range(len(sequences))))

    def close(self) -> None:
        self.client.close()


def redact_url(url: str) -> str:
    """``url`` without what may hold credentials (user:password@, query string, fragment): what a
    store header or a log line may keep."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url)
    host = parts.hostname or ""
    netloc = f"[{host}]" if ":" in host else host
    if parts.port:
        netloc += f":{parts.port}"
    return urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def served_model_id(url: str, api_key: str | None = None) -> str:
    """The first model id the server lists at /v1/models: with the tokenizer, what identifies an HTTP
    teacher (a URL alone does not: another model may be behind it on resume)."""
    be = OpenAIBackend(url, api_key=api_key, max_retries=2)
    try:
        return be.model
    finally:
        be.close()

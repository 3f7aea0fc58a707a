"""The ONNX backend's HTTP layer: an OpenAI-compatible FastAPI app over :class:`ContinuousBatchingEngine`.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with ``"stream": true`` as
server-sent events), ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text).
``/v1/*`` needs ``Authorization: Bearer KEY`` when the server has an API key; ``/health`` and
``/metrics`` stay open for probes and scrapers. Errors are JSON ``{"error": {"message", "type",
"param", "code"}}``: 400 bad parameters / prompt too long, 401 bad key, 404 unknown model,
413 body over ``max_body_bytes``, 429 queue full, 500 internal (a generic message with a request id;
the detail goes to the server log), 503 shutting down.

Prompts are tokenised (and chat templates rendered) on a worker thread with a tokenizer of its own,
never on the event loop and never under a lock the scheduler takes: a 1 MB prompt costs about a
second of tokenisation, which must not pause other clients' streams.
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kdship.serve.engine import DEFAULT_MAX_BATCH, DEFAULT_MAX_QUEUE, ContinuousBatchingEngine, EngineStopped, Event, GenerationRequest, QueueFull, SamplingParams
from kdship.serve.guard import DEFAULT_MAX_BODY_BYTES, RequestGuard, error_response
from kdship.serve.metrics import CONTENT_TYPE, ServerMetrics
from kdship.serve.protocol import ChatCompletionRequest, CompletionRequest

log = logging.getLogger("kdship.serve")


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.type = status, message, param, type_


class EventPump:
    """Hands scheduler-thread events to the event loop in bulk: one loop wake-up per burst (a decode
    step emits one event per running sequence) instead of one ``call_soon_threadsafe`` per token."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.pending: list = []
        self.lock = threading.Lock()
        self.scheduled = False

    def push(self, queue: asyncio.Queue, ev: Event) -> None:
        with self.lock:
            self.pending.append((queue, ev))
            if self.scheduled:
                return
            self.scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._flush)
        except RuntimeError:  # loop closed: nobody is listening any more
            pass

    def _flush(self) -> None:
        with self.lock:
            items, self.pending, self.scheduled = self.pending, [], False
        for queue, ev in items:
            queue.put_nowait(ev)


class ServerState:
    """What the endpoints share: the engine, the prompt tokenizer and its thread, limits and metrics."""

    def __init__(self, model: Any, model_name: str, max_model_len: int, api_key: str | None, max_body_bytes: int, engine: ContinuousBatchingEngine, metrics: ServerMetrics):
        # A copy: the engine's tokenizer belongs to the scheduler thread (detokenising), this one to
        # the single tokenising thread, so neither ever waits for the other.
        self.tokenizer = copy.deepcopy(model.tokenizer)
        self.tokenize_pool = ThreadPoolExecutor(1, thread_name_prefix="kdship-tokenize")
        self.vocab_size = len(self.tokenizer)
        self.model_name = model_name
        self.model_file = Path(str(getattr(model, "model_path", ""))).name  # the file name, never its path
        self.max_model_len = max_model_len
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.engine = engine
        self.metrics = metrics
        self.created = int(time.time())
        self.draining = False
        self._pump: EventPump | None = None

    def pump_for(self, loop: asyncio.AbstractEventLoop) -> EventPump:
        if self._pump is None or self._pump.loop is not loop:
            self._pump = EventPump(loop)
        return self._pump

    async def on_tokenize_thread(self, fn, *args):
        return await asyncio.get_running_loop().run_in_executor(self.tokenize_pool, fn, *args)


def build_app(
    model: Any,
    model_name: str,
    max_model_len: int,
    api_key: str | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_queue: int = DEFAULT_MAX_QUEUE,
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
) -> FastAPI:
    """The app; the engine thread starts with the app's lifespan and drains when it ends (SIGTERM)."""
    metrics = ServerMetrics()
    engine = ContinuousBatchingEngine(model, max_batch=max_batch, max_queue=max_queue, stats=metrics)
    state = ServerState(model, model_name, max_model_len, api_key, max_body_bytes, engine, metrics)
    app = FastAPI(title="kdship ONNX server", lifespan=_lifespan(state), docs_url=None, redoc_url=None)
    app.state.kd = state
    _add_error_handlers(app)
    app.add_middleware(RequestGuard, api_key=api_key, max_body_bytes=max_body_bytes, count=lambda endpoint, status: metrics.requests.labels(endpoint, str(status)).inc())
    _add_probe_routes(app, state)
    _add_generation_routes(app, state)
    return app


def _lifespan(state: ServerState):
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine = state.engine
        engine.start()
        log.info("kdship onnx server ready: model %s, max_batch %d, max_queue %d", state.model_name, engine.max_batch, engine.max_queue)
        yield
        # uvicorn has already stopped accepting and waited for in-flight requests; drain the rest.
        state.draining = True
        await asyncio.get_running_loop().run_in_executor(None, engine.shutdown, True, 60.0)
        state.tokenize_pool.shutdown(wait=False, cancel_futures=True)
        log.info("kdship onnx server stopped after %d decode steps", engine.steps)

    return lifespan


def _add_error_handlers(app: FastAPI) -> None:
    """Expected errors as OpenAI-style JSON; anything else reaches :class:`RequestGuard` (generic 500)."""

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        if first.get("type") == "json_invalid":
            msg, param = "request body is not valid JSON", None
        elif first.get("type") == "extra_forbidden":
            msg = f"unknown field '{param}'"
        else:
            text = str(first.get("msg", "invalid value")).removeprefix("Value error, ")
            msg = f"{param}: {text}" if param else text
        return error_response(400, msg, param)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return error_response(exc.status, exc.message, exc.param, exc.type)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return error_response(exc.status_code, str(exc.detail), None, "not_found_error" if exc.status_code == 404 else "invalid_request_error")


def _add_probe_routes(app: FastAPI, state: ServerState) -> None:
    engine = state.engine

    @app.get("/health")
    async def health():
        if state.draining or not engine.alive:
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return {"status": "ok", "queue_depth": engine.queue_depth(), "running": engine.running()}

    @app.get("/metrics")
    async def prometheus():
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models():
        card = {
            "id": state.model_name, "object": "model", "created": state.created, "owned_by": "kdship",
            "root": state.model_name, "model_file": state.model_file, "max_model_len": state.max_model_len,
        }  # fmt: skip
        return {"object": "list", "data": [card]}


# ----------------------------------------------------------------- prompts (on the tokenising thread)
# A prompt much longer than the context is refused from a prefix: tokenising 1 MB of text costs the
# tokenising thread (and, on a small machine, the decode loop's cores) about a second, and a prefix of
# this many characters per context token that already overflows the context proves the whole does.
PREFIX_CHARS_PER_TOKEN = 32


def _prompt_ids(tokenizer, text: str, max_model_len: int, field: str, add_special_tokens: bool = True) -> list[int]:
    """``text``'s token ids, or a 400 as soon as a prefix of it already overflows the context."""
    limit = max_model_len * PREFIX_CHARS_PER_TOKEN
    if len(text) > limit:
        # cut before a space where there is one near the end (whole words tokenise as in the full text),
        # and allow one token of slack for a cut inside a word
        space = text.rfind(" ", limit // 2, limit)
        cut = space if space > 0 else limit
        n = len(tokenizer(text[:cut], add_special_tokens=add_special_tokens).input_ids) - 1
        if n >= max_model_len:
            raise APIError(400, f"{field}: at least {n} tokens in its first {cut:,} of {len(text):,} characters, "
                                f"no room in the context of {max_model_len} tokens", field)  # fmt: skip
    return tokenizer(text, add_special_tokens=add_special_tokens).input_ids


def _completion_prompt_ids(tokenizer, prompt: str, max_model_len: int) -> list[int]:
    return _prompt_ids(tokenizer, prompt, max_model_len, "prompt")


def _chat_prompt_ids(tokenizer, messages: list[dict], add_generation_prompt: bool, max_model_len: int) -> list[int]:
    from jinja2.exceptions import TemplateError

    try:
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    except TemplateError as e:  # the template's own raise_exception(...): e.g. roles that must alternate
        raise APIError(400, f"messages: the model's chat template refuses them: {e}", "messages")
    return _prompt_ids(tokenizer, text, max_model_len, "messages", add_special_tokens=False)


def _add_generation_routes(app: FastAPI, state: ServerState) -> None:
    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        _check_model(state, body.model)
        if isinstance(body.prompt, str):
            prompt_ids = await state.on_tokenize_thread(_completion_prompt_ids, state.tokenizer, body.prompt, state.max_model_len)
        else:
            prompt_ids = list(body.prompt)
            bad = [t for t in prompt_ids if not (0 <= t < state.vocab_size)]
            if bad:
                raise APIError(400, f"prompt: token id {bad[0]} outside the vocabulary [0, {state.vocab_size})", "prompt")
        return await _generate(state, body, prompt_ids, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request):
        _check_model(state, body.model)
        if not getattr(state.tokenizer, "chat_template", None):
            raise APIError(400, "this model's tokenizer has no chat template; use /v1/completions", "messages")
        msgs = [{"role": m.role, "content": m.text()} for m in body.messages]
        prompt_ids = await state.on_tokenize_thread(_chat_prompt_ids, state.tokenizer, msgs, body.add_generation_prompt, state.max_model_len)
        return await _generate(state, body, prompt_ids, chat=True)


def _check_model(state: ServerState, name: str | None) -> None:
    if name is not None and name != state.model_name:
        raise APIError(404, f"model '{name}' does not exist; this server serves '{state.model_name}'", "model", "not_found_error")


# ----------------------------------------------------------------- generation
def _sampling_params(state: ServerState, body, n_prompt: int, chat: bool) -> SamplingParams:
    """The request's sampling parameters, or a 400 when prompt + max_tokens do not fit the context."""
    room = state.max_model_len - n_prompt
    if room < 1:
        field = "messages" if chat else "prompt"
        raise APIError(400, f"{field}: {n_prompt} tokens leave no room in the context of {state.max_model_len} tokens", field)
    max_tokens = body.max_tokens if body.max_tokens is not None else (room if chat else min(16, room))
    if n_prompt + max_tokens > state.max_model_len:
        raise APIError(
            400,
            f"max_tokens: prompt ({n_prompt} tokens) + max_tokens ({max_tokens}) exceeds the context of {state.max_model_len} tokens",
            "max_tokens",
        )
    return SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, seed=body.seed, stop=list(body.stop or []), ignore_eos=body.ignore_eos)


def _submit(state: ServerState, prompt_ids: list[int], params: SamplingParams) -> tuple[GenerationRequest, asyncio.Queue]:
    events: asyncio.Queue[Event] = asyncio.Queue()
    pump = state.pump_for(asyncio.get_running_loop())
    req = GenerationRequest(prompt_ids, params, lambda ev: pump.push(events, ev))
    try:
        state.engine.submit(req)
    except QueueFull as e:
        raise APIError(429, str(e), None, "rate_limit_error")
    except EngineStopped as e:
        raise APIError(503, str(e), None, "server_error")
    return req, events


class _Reply:
    """The response objects of one generation request (OpenAI's completion / chat.completion shapes)."""

    def __init__(self, state: ServerState, body, n_prompt: int, chat: bool):
        self.chat, self.n_prompt, self.model = chat, n_prompt, state.model_name
        self.endpoint = "/v1/chat/completions" if chat else "/v1/completions"
        self.id = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        self.created = int(time.time())
        self.include_usage = bool(body.stream_options and body.stream_options.include_usage)
        self.chunk_object = "chat.completion.chunk" if chat else "text_completion"

    def usage(self, completion_tokens: int) -> dict:
        return {"prompt_tokens": self.n_prompt, "completion_tokens": completion_tokens, "total_tokens": self.n_prompt + completion_tokens}

    def _envelope(self, obj: str, choices: list, **extra) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices, **extra}

    def failed(self, internal_message: str | None) -> str:
        """Log the engine's reason (internal detail) and return what the client may see."""
        log.error("request %s: generation failed: %s", self.id, internal_message)
        return f"generation failed (request id {self.id}); the server log has the details"

    def completion(self, text: str, finish_reason: str | None, completion_tokens: int) -> dict:
        if self.chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": finish_reason, "logprobs": None}
        else:
            choice = {"index": 0, "text": text, "finish_reason": finish_reason, "logprobs": None}
        return self._envelope("chat.completion" if self.chat else "text_completion", [choice], usage=self.usage(completion_tokens))

    def sse_chunk(self, text: str | None, finish: str | None, first: bool = False) -> str:
        if self.chat:
            delta: dict = {"role": "assistant"} if first else {}
            if text:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        extra = {"usage": None} if self.include_usage else {}
        return _sse(self._envelope(self.chunk_object, [choice], **extra))

    def sse_usage(self, completion_tokens: int) -> str:
        return _sse(self._envelope(self.chunk_object, [], usage=self.usage(completion_tokens)))


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload)}\n\n"


async def _generate(state: ServerState, body, prompt_ids: list[int], chat: bool):
    params = _sampling_params(state, body, len(prompt_ids), chat)
    req, events = _submit(state, prompt_ids, params)
    reply = _Reply(state, body, len(prompt_ids), chat)
    if body.stream:
        return StreamingResponse(_stream(state, reply, req, events), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
    return await _complete(state, reply, req, events)


async def _complete(state: ServerState, reply: _Reply, req: GenerationRequest, events: asyncio.Queue) -> dict:
    t0 = time.perf_counter()
    parts: list[str] = []
    try:
        while True:
            ev = await events.get()
            if ev.kind == "error":
                raise APIError(500, reply.failed(ev.message), None, "server_error")
            parts.append(ev.text)
            if ev.kind == "done":
                break
    except asyncio.CancelledError:
        req.cancel()
        raise
    state.metrics.latency.labels(reply.endpoint).observe(time.perf_counter() - t0)
    return reply.completion("".join(parts), ev.finish_reason, len(req.generated))


async def _stream(state: ServerState, reply: _Reply, req: GenerationRequest, events: asyncio.Queue):
    t0 = time.perf_counter()
    finished = False
    try:
        if reply.chat:
            yield reply.sse_chunk(None, None, first=True)
        while not finished:
            # One SSE event per token, but everything already queued goes out in one write
            # (fewer socket sends when the server runs ahead of the client).
            batch = [await events.get()]
            while not events.empty():
                batch.append(events.get_nowait())
            out, finished = _sse_for_events(reply, req, batch)
            if out:
                yield out
        yield "data: [DONE]\n\n"
        state.metrics.latency.labels(reply.endpoint).observe(time.perf_counter() - t0)
    finally:
        if not finished:
            req.cancel()  # client disconnected (or error): free the batch slot


def _sse_for_events(reply: _Reply, req: GenerationRequest, batch: list[Event]) -> tuple[str, bool]:
    """The SSE text for a burst of engine events, and whether the generation has ended."""
    out: list[str] = []
    for ev in batch:
        if ev.kind == "error":
            err = {"error": {"message": reply.failed(ev.message), "type": "server_error", "param": None, "code": 500}}
            out.append(_sse(err))
            return "".join(out), True
        if ev.text:  # empty while text is held back (a possible stop string); it comes later
            out.append(reply.sse_chunk(ev.text, None))
        if ev.kind == "done":
            out.append(reply.sse_chunk(None, ev.finish_reason))
            if reply.include_usage:
                out.append(reply.sse_usage(len(req.generated)))
            return "".join(out), True
    return "".join(out), False

"""The ONNX backend's HTTP layer: an OpenAI-compatible FastAPI app over :class:`ContinuousBatchingEngine`.

Endpoints: ``POST /v1/completions``, ``POST /v1/chat/completions`` (both with ``"stream": true`` as
server-sent events), ``GET /v1/models``, ``GET /health``, ``GET /metrics`` (Prometheus text).
``/v1/*`` needs ``Authorization: Bearer KEY`` when the server has an API key; ``/health`` and
``/metrics`` stay open for probes and scrapers. Errors are JSON ``{"error": {"message", "type",
"param", "code"}}``: 400 bad parameters / prompt too long, 401 bad key, 404 unknown model,
429 queue full, 503 shutting down.
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
import threading
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from kdship.serve.engine import DEFAULT_MAX_BATCH, DEFAULT_MAX_QUEUE, ContinuousBatchingEngine, EngineStopped, Event, GenerationRequest, QueueFull, SamplingParams
from kdship.serve.metrics import CONTENT_TYPE, ServerMetrics
from kdship.serve.protocol import ChatCompletionRequest, CompletionRequest

log = logging.getLogger("kdship.serve")


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.type = status, message, param, type_


def _error(status: int, message: str, param: str | None = None, type_: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": status}}, status_code=status)


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
    """What the endpoints share: the engine, the tokenizer (behind a lock), limits and metrics."""

    def __init__(self, model: Any, model_name: str, max_model_len: int, api_key: str | None, engine: ContinuousBatchingEngine, metrics: ServerMetrics):
        self.model = model
        self.tokenizer = model.tokenizer
        self.model_name = model_name
        self.max_model_len = max_model_len
        self.api_key = api_key
        self.engine = engine
        self.metrics = metrics
        self.tokenizer_lock = engine.tokenizer_lock
        self.created = int(time.time())
        self.draining = False
        self._pump: EventPump | None = None

    def pump_for(self, loop: asyncio.AbstractEventLoop) -> EventPump:
        if self._pump is None or self._pump.loop is not loop:
            self._pump = EventPump(loop)
        return self._pump


def build_app(
    model: Any,
    model_name: str,
    max_model_len: int,
    api_key: str | None = None,
    max_batch: int = DEFAULT_MAX_BATCH,
    max_queue: int = DEFAULT_MAX_QUEUE,
) -> FastAPI:
    """The app; the engine thread starts with the app's lifespan and drains when it ends (SIGTERM)."""
    metrics = ServerMetrics()
    engine = ContinuousBatchingEngine(model, max_batch=max_batch, max_queue=max_queue, stats=metrics, tokenizer_lock=threading.Lock())
    state = ServerState(model, model_name, max_model_len, api_key, engine, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        log.info("kdship onnx server ready: model %s, max_batch %d, max_queue %d", model_name, max_batch, max_queue)
        yield
        # uvicorn has already stopped accepting and waited for in-flight requests; drain the rest.
        state.draining = True
        await asyncio.get_running_loop().run_in_executor(None, engine.shutdown, True, 60.0)
        log.info("kdship onnx server stopped after %d decode steps", engine.steps)

    app = FastAPI(title="kdship ONNX server", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.kd = state

    # ----------------------------------------------------------------- errors
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
        return _error(400, msg, param)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return _error(exc.status, exc.message, exc.param, exc.type)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        return _error(exc.status_code, str(exc.detail), None, "not_found_error" if exc.status_code == 404 else "invalid_request_error")

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unhandled error on %s", request.url.path)
        return _error(500, f"internal error: {type(exc).__name__}", None, "server_error")

    @app.middleware("http")
    async def _auth_and_count(request: Request, call_next):
        path = request.url.path
        if state.api_key is not None and path.startswith("/v1/"):
            given = request.headers.get("authorization", "")
            token = given[7:] if given.lower().startswith("bearer ") else ""
            if not secrets.compare_digest(token.encode(), state.api_key.encode()):
                metrics.requests.labels(path if path in _KNOWN else "other", "401").inc()
                return _error(401, "missing or wrong API key (send 'Authorization: Bearer KEY')", None, "authentication_error")
        response = await call_next(request)
        if path != "/metrics":
            metrics.requests.labels(path if path in _KNOWN else "other", str(response.status_code)).inc()
        return response

    # ----------------------------------------------------------------- plain endpoints
    @app.get("/health")
    async def health():
        if state.draining or not engine.alive:
            return JSONResponse({"status": "unavailable"}, status_code=503)
        return {"status": "ok", "queue_depth": engine.queue_depth(), "running": engine.running()}

    @app.get("/metrics")
    async def prometheus():
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [
                {
                    "id": model_name, "object": "model", "created": state.created, "owned_by": "kdship",
                    "root": str(getattr(model, "model_path", "")), "max_model_len": max_model_len,
                }
            ],  # fmt: skip
        }

    # ----------------------------------------------------------------- generation
    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        _check_model(state, body.model)
        if isinstance(body.prompt, str):
            with state.tokenizer_lock:
                prompt_ids = state.tokenizer(body.prompt).input_ids
        else:
            prompt_ids = list(body.prompt)
            bad = [t for t in prompt_ids if not (0 <= t < len(state.tokenizer))]
            if bad:
                raise APIError(400, f"prompt: token id {bad[0]} outside the vocabulary [0, {len(state.tokenizer)})", "prompt")
        return await _generate(state, request, body, prompt_ids, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, request: Request):
        _check_model(state, body.model)
        if not getattr(state.tokenizer, "chat_template", None):
            raise APIError(400, "this model's tokenizer has no chat template; use /v1/completions", "messages")
        msgs = [{"role": m.role, "content": m.text()} for m in body.messages]
        with state.tokenizer_lock:
            text = state.tokenizer.apply_chat_template(msgs, add_generation_prompt=body.add_generation_prompt, tokenize=False)
            prompt_ids = state.tokenizer(text, add_special_tokens=False).input_ids
        return await _generate(state, request, body, prompt_ids, chat=True)

    return app


_KNOWN = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health"}


def _check_model(state: ServerState, name: str | None) -> None:
    if name is not None and name != state.model_name:
        raise APIError(404, f"model '{name}' does not exist; this server serves '{state.model_name}'", "model", "not_found_error")


async def _generate(state: ServerState, request: Request, body, prompt_ids: list[int], chat: bool):
    n_prompt = len(prompt_ids)
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
    params = SamplingParams(max_tokens=max_tokens, temperature=body.temperature, top_p=body.top_p, seed=body.seed, stop=list(body.stop or []), ignore_eos=body.ignore_eos)
    events: asyncio.Queue[Event] = asyncio.Queue()
    pump = state.pump_for(asyncio.get_running_loop())
    req = GenerationRequest(prompt_ids, params, lambda ev: pump.push(events, ev))
    try:
        state.engine.submit(req)
    except QueueFull as e:
        raise APIError(429, str(e), None, "rate_limit_error")
    except EngineStopped as e:
        raise APIError(503, str(e), None, "server_error")

    endpoint = "/v1/chat/completions" if chat else "/v1/completions"
    rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
    created = int(time.time())
    model = state.model_name
    t0 = time.perf_counter()

    def usage(completion_tokens: int) -> dict:
        return {"prompt_tokens": n_prompt, "completion_tokens": completion_tokens, "total_tokens": n_prompt + completion_tokens}

    if not body.stream:
        parts: list[str] = []
        try:
            while True:
                ev = await events.get()
                if ev.kind == "error":
                    raise APIError(500, ev.message or "generation failed", None, "server_error")
                parts.append(ev.text)
                if ev.kind == "done":
                    break
        except asyncio.CancelledError:
            req.cancel()
            raise
        state.metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)
        text = "".join(parts)
        if chat:
            choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": ev.finish_reason, "logprobs": None}
            obj = "chat.completion"
        else:
            choice = {"index": 0, "text": text, "finish_reason": ev.finish_reason, "logprobs": None}
            obj = "text_completion"
        return {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice], "usage": usage(len(req.generated))}

    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    obj = "chat.completion.chunk" if chat else "text_completion"

    def chunk(text: str | None, finish: str | None, first: bool = False) -> str:
        if chat:
            delta: dict = {}
            if first:
                delta["role"] = "assistant"
            if text:
                delta["content"] = text
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
        else:
            choice = {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None}
        payload = {"id": rid, "object": obj, "created": created, "model": model, "choices": [choice]}
        if include_usage:
            payload["usage"] = None
        return f"data: {json.dumps(payload)}\n\n"

    async def stream():
        finished = False
        try:
            if chat:
                yield chunk(None, None, first=True)
            while not finished:
                # One SSE event per token, but everything already queued goes out in one write
                # (fewer socket sends when the server runs ahead of the client).
                batch = [await events.get()]
                while not events.empty():
                    batch.append(events.get_nowait())
                out: list[str] = []
                for ev in batch:
                    if ev.kind == "error":
                        err = {"error": {"message": ev.message, "type": "server_error", "param": None, "code": 500}}
                        out.append(f"data: {json.dumps(err)}\n\n")
                        finished = True
                        break
                    if ev.text:  # empty while text is held back (a possible stop string); it comes later
                        out.append(chunk(ev.text, None))
                    if ev.kind == "done":
                        out.append(chunk(None, ev.finish_reason))
                        if include_usage:
                            u = {"id": rid, "object": obj, "created": created, "model": model, "choices": [], "usage": usage(len(req.generated))}
                            out.append(f"data: {json.dumps(u)}\n\n")
                        finished = True
                        break
                if out:
                    yield "".join(out)
            yield "data: [DONE]\n\n"
            state.metrics.latency.labels(endpoint).observe(time.perf_counter() - t0)
        finally:
            if not finished:
                req.cancel()  # client disconnected (or error): free the batch slot

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

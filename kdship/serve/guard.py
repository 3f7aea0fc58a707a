"""The ONNX server's outermost layer: API key, request-body limit, request counting, internal errors.

Plain ASGI rather than a FastAPI ``@app.middleware("http")``: streamed responses pass straight through
(no extra queue per chunk), and a body over the limit is refused while it is still arriving.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import uuid
from typing import Any, Awaitable, Callable

log = logging.getLogger("kdship.serve")

DEFAULT_MAX_BODY_BYTES = 1 << 20  # 1 MiB: a prompt of ~250k tokens, beyond any context the server has
# Before its 413, an oversized body is read and thrown away, up to this many more bytes: clients that
# write the whole body before reading the answer (Python's http.client, so `requests`) would otherwise
# meet a closed connection (broken pipe) and never see the 413. Past it the server stops paying for
# the upload and closes; 64 MiB is a fraction of a second on a LAN.
MAX_DRAIN_BYTES = 64 << 20
# ...and only while the client keeps sending: one that pauses this long (waiting for the answer
# mid-body) gets the 413 then.
DRAIN_IDLE_SECONDS = 1.0
KNOWN_ENDPOINTS = {"/v1/completions", "/v1/chat/completions", "/v1/models", "/health"}

Message = dict[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]


def error_response(status: int, message: str, param: str | None = None, type_: str = "invalid_request_error", headers: dict | None = None) -> JSONResponse:
    """OpenAI's error shape: ``{"error": {"message", "type", "param", "code"}}``."""
    from fastapi.responses import JSONResponse  # here, so that the CLI (which reads this module's defaults) runs without the server's packages

    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": status}}, status_code=status, headers=headers)


def new_request_id() -> str:
    return "req-" + uuid.uuid4().hex[:24]


class BodyTooLarge(Exception):
    """``declared``: the Content-Length over the limit (nothing read yet); else the body was counted
    as it arrived, and ``ended`` says whether it was all read."""

    def __init__(self, declared: int | None = None, ended: bool = False):
        self.declared, self.ended = declared, ended


class ClientGone(Exception):
    pass


async def read_body(scope: dict, receive: Receive, limit: int) -> bytes:
    """The whole request body, or :class:`BodyTooLarge` as soon as it is known to exceed ``limit``
    bytes: from Content-Length before reading anything, else by counting while it arrives (chunked
    bodies, or a Content-Length the body does not keep to)."""
    for name, value in scope.get("headers", ()):
        if name == b"content-length" and value.isdigit() and int(value) > limit:
            raise BodyTooLarge(declared=int(value))
    chunks, size = [], 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGone()
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(ended=not message.get("more_body", False))
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


async def drain(scope: dict, receive: Receive, too_large: BodyTooLarge) -> None:
    """Read and discard the rest of an oversized body, within MAX_DRAIN_BYTES and DRAIN_IDLE_SECONDS."""
    if too_large.ended:
        return
    if too_large.declared is not None:
        if too_large.declared > MAX_DRAIN_BYTES:
            return  # it would be cut off anyway: close now rather than read 64 MiB in vain
        if dict(scope.get("headers", ())).get(b"expect", b"").lower() == b"100-continue":
            return  # the client sends nothing before our answer (and receive() would send "100 Continue")
    discarded = 0
    while discarded <= MAX_DRAIN_BYTES:
        try:
            message = await asyncio.wait_for(receive(), DRAIN_IDLE_SECONDS)
        except asyncio.TimeoutError:
            return
        if message["type"] == "http.disconnect":
            raise ClientGone()
        discarded += len(message.get("body", b""))
        if not message.get("more_body", False):
            return


class RequestGuard:
    """``api_key``: required as ``Authorization: Bearer KEY`` on ``/v1/*`` (None: no key).
    ``max_body_bytes``: larger request bodies get 413. ``count(endpoint, status)``: called once per
    request except ``/metrics``. An exception no handler turned into a response becomes a 500 with a
    request id and a generic message; the traceback goes to the server log under the same id."""

    def __init__(self, app, api_key: str | None, max_body_bytes: int, count: Callable[[str, int], None]):
        self.app, self.api_key, self.max_body_bytes, self.count = app, api_key, max_body_bytes, count

    async def __call__(self, scope: dict, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = 500
        response_started = False

        async def send_and_note(message: Message) -> None:
            nonlocal status, response_started
            if message["type"] == "http.response.start":
                status, response_started = message["status"], True
            await send(message)

        try:
            await self._handle(scope, receive, send_and_note)
        except ClientGone:
            status = 499  # nginx's code for "client closed the request"; nobody receives it
        except Exception:
            request_id = new_request_id()
            log.exception("internal error on %s %s, request id %s", scope.get("method"), scope["path"], request_id)
            if response_started:
                raise  # too late for an error response: the server closes the connection
            message = f"internal server error (request id {request_id}); the server log has the details"
            await error_response(500, message, None, "server_error")(scope, receive, send_and_note)
        finally:
            if scope["path"] != "/metrics":
                self.count(scope["path"] if scope["path"] in KNOWN_ENDPOINTS else "other", status)

    async def _handle(self, scope: dict, receive: Receive, send: Send) -> None:
        if self.api_key is not None and scope["path"].startswith("/v1/") and not self._key_matches(scope):
            message = "missing or wrong API key (send 'Authorization: Bearer KEY')"
            return await error_response(401, message, None, "authentication_error")(scope, receive, send)
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            return await self.app(scope, receive, send)
        try:
            body = await read_body(scope, receive, self.max_body_bytes)
        except BodyTooLarge as too_large:
            await drain(scope, receive, too_large)
            message = f"request body larger than {self.max_body_bytes} bytes (the server's --max-body-bytes)"
            # Any rest of the body left unread cannot be skipped on a kept-alive connection: close it.
            response = error_response(413, message, None, "invalid_request_error", headers={"Connection": "close"})
            return await response(scope, receive, send)
        replayed = False

        async def replay_then_receive() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # http.disconnect: a streamed response stops on it

        await self.app(scope, replay_then_receive, send)

    def _key_matches(self, scope: dict) -> bool:
        given = dict(scope.get("headers", ())).get(b"authorization", b"")
        token = given[7:] if given[:7].lower() == b"bearer " else b""
        return secrets.compare_digest(token, self.api_key.encode())

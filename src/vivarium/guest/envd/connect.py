"""The Connect protocol (JSON codec) over Starlette: what the official clients speak to envd.

- unary: `POST /pkg.Service/Method`, `application/json` body -> JSON body; errors are a non-2xx
  status with `{"code": "not_found", "message": "..."}`.
- streaming (server, client or both): `application/connect+json`; each message is an envelope
  (1 flag byte, 4-byte big-endian length, JSON); the response ends with an end-of-stream envelope
  (flag 0x02) holding `{}` or `{"error": {...}}`.

Guest code: imports only the standard library and the template's vendored packages.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from .wire import FLAG_COMPRESSED, FLAG_END_STREAM, Deframer, MessageTooLarge, frame

MAX_MESSAGE = 16 * 1024 * 1024
# Streams that stay idle longer than a proxy's read timeout get dropped by it, so every stream
# sends a keepalive at least this often, or sooner when the client asks for it.
KEEPALIVE_S = 25.0

STATUS = {
    "canceled": 499, "unknown": 500, "invalid_argument": 400, "deadline_exceeded": 504,
    "not_found": 404, "already_exists": 409, "permission_denied": 403,
    "resource_exhausted": 429, "failed_precondition": 400, "aborted": 409, "out_of_range": 400,
    "unimplemented": 501, "internal": 500, "unavailable": 503, "data_loss": 500,
    "unauthenticated": 401,
}  # fmt: skip

Message = dict[str, Any]
Unary = Callable[[Request, Message], Awaitable[Message]]
ServerStream = Callable[[Request, Message], AsyncIterator[Message]]
ClientStream = Callable[[Request, AsyncIterator[Message]], Awaitable[Message]]


class ConnectError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        assert code in STATUS, code
        self.code = code
        self.message = message

    def to_json(self) -> Message:
        return {"code": self.code, "message": self.message}


def envelope(message: Message, flags: int = 0) -> bytes:
    return frame(json.dumps(message, separators=(",", ":")).encode(), flags)


async def read_envelopes(request: Request) -> AsyncIterator[Message]:
    """Decode the enveloped messages of a streaming request as its chunks arrive."""
    deframer = Deframer(MAX_MESSAGE)
    async for chunk in request.stream():
        try:
            envelopes = deframer.feed(chunk)
        except MessageTooLarge as exc:
            raise ConnectError("resource_exhausted", str(exc)) from None
        for flags, payload in envelopes:
            if flags & FLAG_COMPRESSED:
                raise ConnectError("unimplemented", "compressed messages are not supported")
            if flags & FLAG_END_STREAM:
                return
            yield _decode(payload)
    if deframer.partial:
        raise ConnectError("invalid_argument", "request ended in the middle of a message")


def _decode(payload: bytes) -> Message:
    if not payload:
        return {}
    try:
        message = json.loads(payload)
    except ValueError as exc:
        raise ConnectError("invalid_argument", f"malformed JSON: {exc}") from None
    if not isinstance(message, dict):
        raise ConnectError("invalid_argument", "message must be a JSON object")
    return message


def _unary_error(exc: ConnectError) -> Response:
    return JSONResponse(exc.to_json(), status_code=STATUS[exc.code])


async def _unary_body(request: Request) -> Message:
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_MESSAGE:
            raise ConnectError("resource_exhausted", "request is too large")
    return _decode(bytes(body))


def _is_streaming(request: Request) -> bool:
    return request.headers.get("content-type", "").startswith("application/connect+")


def unary(handler: Unary) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        if _is_streaming(request):
            return _stream_error(ConnectError("invalid_argument", "this method is unary"))
        try:
            return JSONResponse(await handler(request, await _unary_body(request)))
        except ConnectError as exc:
            return _unary_error(exc)

    return endpoint


def _stream_error(exc: ConnectError) -> Response:
    return Response(
        envelope({"error": exc.to_json()}, FLAG_END_STREAM),
        media_type="application/connect+json",
    )


class StreamResponse(Response):
    """A streamed response (Connect here, NDJSON in the interpreter) that stops its producer as
    soon as the client leaves: a process stream must not stay subscribed for nobody, and a cell
    nobody waits for must be interrupted.

    Starlette's StreamingResponse does the same through an anyio task group; plain asyncio costs
    far fewer system calls per request, which shows under gVisor (every asyncio task lookup is a
    getpid() there)."""

    def __init__(self, body: AsyncIterator[bytes],
                 content_type: str = "application/connect+json") -> None:  # fmt: skip
        self.body_iterator = body
        self.status_code = 200
        self.background = None
        self.raw_headers = [(b"content-type", content_type.encode())]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        stream = asyncio.current_task()
        assert stream is not None
        left = False

        async def watch_disconnect() -> None:
            nonlocal left
            while (await receive())["type"] != "http.disconnect":
                pass
            left = True
            stream.cancel()

        await send({"type": "http.response.start", "status": 200, "headers": self.raw_headers})
        watcher = asyncio.get_running_loop().create_task(watch_disconnect())
        try:
            async for chunk in self.body_iterator:
                await send({"type": "http.response.body", "body": chunk, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            if not left:
                raise
            stream.uncancel()  # our own cancel: the client is gone, nothing more to do
        finally:
            watcher.cancel()
            await _close(self.body_iterator)


async def _close(body: AsyncIterator[bytes]) -> None:
    aclose = getattr(body, "aclose", None)
    if aclose is not None:
        await aclose()


async def _until_deadline(
    messages: AsyncIterator[Message], timeout: float | None
) -> AsyncIterator[Message]:
    """The messages of a stream until the client's deadline, which then ends it with
    `deadline_exceeded`, as connect-go ends envd's streams: the client reports a timeout, not
    whatever the deadline also caused (a process killed at it ends with an exit status)."""
    if not timeout:
        async for message in messages:
            yield message
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    try:
        while True:
            try:
                message = await asyncio.wait_for(anext(messages), deadline - loop.time())
            except StopAsyncIteration:
                return
            except TimeoutError:
                break
            if loop.time() >= deadline:
                break
            yield message
    finally:
        aclose = getattr(messages, "aclose", None)
        if aclose is not None:
            await aclose()
    raise ConnectError("deadline_exceeded", f"the request's deadline of {timeout:g} s passed")


def server_stream(handler: ServerStream) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        try:
            first = None
            async for message in read_envelopes(request):
                first = message
                break
            if first is None:
                raise ConnectError("invalid_argument", "missing request message")
        except ConnectError as exc:
            return _stream_error(exc)

        async def body() -> AsyncIterator[bytes]:
            try:
                async for message in _until_deadline(handler(request, first), timeout_s(request)):
                    yield envelope(message)
                yield envelope({}, FLAG_END_STREAM)
            except ConnectError as exc:
                yield envelope({"error": exc.to_json()}, FLAG_END_STREAM)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the client must always get an end of stream
                yield envelope({"error": {"code": "internal", "message": str(exc)}},
                               FLAG_END_STREAM)  # fmt: skip

        return StreamResponse(body())

    return endpoint


def client_stream(handler: ClientStream) -> Callable[[Request], Awaitable[Response]]:
    async def endpoint(request: Request) -> Response:
        try:
            reply = await handler(request, read_envelopes(request))
        except ConnectError as exc:
            return _stream_error(exc)
        return Response(
            envelope(reply) + envelope({}, FLAG_END_STREAM),
            media_type="application/connect+json",
        )

    return endpoint


def string_field(message: Message, key: str, default: str = "") -> str:
    """A string field of a request message; any other JSON type is the caller's mistake."""
    value = message.get(key, default)
    if value is None:
        return default
    if not isinstance(value, str):
        raise ConnectError("invalid_argument", f"{key} must be a string")
    return value


async def unknown_method(request: Request) -> Response:
    """Connect's answer for a procedure this server does not have."""
    error = ConnectError("unimplemented", f"{request.url.path.lstrip('/')} is not implemented")
    return JSONResponse(error.to_json(), status_code=STATUS[error.code])


def timeout_s(request: Request) -> float | None:
    """The client's deadline (`Connect-Timeout-Ms`), if it sent one."""
    raw = request.headers.get("connect-timeout-ms", "")
    return int(raw[:19]) / 1000 if raw.isascii() and raw.isdigit() else None


def keepalive_interval(request: Request) -> float:
    """Seconds between keepalives on a stream: the client's `Keepalive-Ping-Interval`, within
    1 s and KEEPALIVE_S."""
    raw = request.headers.get("keepalive-ping-interval", "")
    try:
        asked = float(raw)
    except ValueError:
        return KEEPALIVE_S
    return max(1.0, min(asked, KEEPALIVE_S))

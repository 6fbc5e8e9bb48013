"""The HTTP side of the CLI's envd client: `process.Process` over Connect with the JSON codec.

It talks to envd directly or through the sandbox proxy: the caller passes the base URL and the
headers that route and authorize the request (`E2b-Sandbox-Id`, `E2b-Sandbox-Port`,
`X-Access-Token`); the user travels as HTTP Basic `user:` like the E2B clients send it.

Hand-written on httpx rather than the `connectrpc` package: that one needs classes generated
from envd's .proto files (and its own HTTP stack), while the JSON codec of the five calls the
CLI makes is the envelope framing `wire` already holds for envd plus plain JSON.
"""

from __future__ import annotations

import contextlib
import json
import ssl
from collections.abc import Generator, Mapping
from typing import Any

import httpx

from vivarium.errors import VivariumError
from vivarium.guest.envd import PORT as ENVD_PORT
from vivarium.guest.envd.wire import FLAG_END_STREAM, Deframer, encode_bytes, frame

Message = dict[str, Any]
Verify = ssl.SSLContext | bool  # httpx's `verify`: True checks against the system's CAs

UNARY_TIMEOUT_S = 30.0
CONNECT_TIMEOUT_S = 10.0
# envd sends a keepalive on idle streams at least every 25 s (it clamps the interval we ask
# for), so a stream silent for this long has lost its connection.
STREAM_IDLE_S = 120.0
KEEPALIVE_ASK_S = 25

# What the sandbox proxy (or anything that is not envd) means by an HTTP error status.
_CODE_BY_STATUS = {
    400: "invalid_argument", 401: "unauthenticated", 403: "permission_denied",
    404: "not_found", 409: "already_exists", 413: "resource_exhausted",
    429: "resource_exhausted", 499: "canceled", 501: "unimplemented", 502: "unavailable",
    503: "unavailable", 504: "deadline_exceeded",
}  # fmt: skip


class EnvdError(VivariumError):
    """A Connect error from envd (or from the proxy in front of it); `code` is the Connect code
    (`invalid_argument`, `not_found`, `unauthenticated`, `unavailable`, `deadline_exceeded`...).
    A VivariumError, so the CLI prints it as one line."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code

    def __str__(self) -> str:
        return f"envd: {self.code}: {self.message}"


def proxy_headers(sandbox_id: str, access_token: str | None = None) -> dict[str, str]:
    """The headers that take a request through the sandbox proxy to the sandbox's envd."""
    headers = {"E2b-Sandbox-Id": sandbox_id, "E2b-Sandbox-Port": str(ENVD_PORT)}
    if access_token:
        headers["X-Access-Token"] = access_token
    return headers


def _http_error(response: httpx.Response) -> EnvdError:
    """A non-2xx answer: Connect's `{"code","message"}`, or a proxy's own error shape."""
    try:
        body = response.json()
    except ValueError:
        body = None
    message = response.text.strip() or response.reason_phrase
    code = _CODE_BY_STATUS.get(response.status_code, "unknown")
    if isinstance(body, dict):
        message = str(body.get("message") or message)
        for key in ("code", "error_code"):  # the proxy sends a numeric code + error_code
            if isinstance(body.get(key), str):
                code = body[key]
                break
    return EnvdError(code, message)


def _stream_error(message: Message) -> EnvdError | None:
    error = message.get("error")
    if not isinstance(error, dict):
        return None
    return EnvdError(str(error.get("code") or "unknown"), str(error.get("message") or ""))


class Envd:
    """One HTTP client (kept alive) for one sandbox and user; safe to share between a thread
    reading a stream and one sending input, each request taking its own pooled connection."""

    def __init__(
        self, base_url: str, headers: Mapping[str, str], user: str | None, verify: Verify = True
    ) -> None:
        self.base_url = base_url.rstrip("/")
        sent = {
            **headers,
            "Connect-Protocol-Version": "1",
            # Compression (by a proxy, say) would hold output back until a buffer fills.
            "Accept-Encoding": "identity",
        }
        if user:
            sent["Authorization"] = "Basic " + encode_bytes(f"{user}:".encode())
        self.http = httpx.Client(
            base_url=self.base_url,
            headers=sent,
            timeout=httpx.Timeout(UNARY_TIMEOUT_S, connect=CONNECT_TIMEOUT_S),
            verify=verify,
        )

    def __enter__(self) -> Envd:
        return self

    def __exit__(self, *exc: object) -> None:
        self.http.close()

    def _unreachable(self, exc: httpx.HTTPError) -> EnvdError:
        return EnvdError("unavailable", f"cannot reach envd at {self.base_url}: {exc}")

    def call(self, method: str, message: Message) -> Message:
        try:
            response = self.http.post(
                f"/process.Process/{method}",
                content=json.dumps(message).encode(),
                headers={"Content-Type": "application/json"},
            )
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from exc
        if not response.is_success:
            raise _http_error(response)
        try:
            reply = response.json()
        except ValueError:
            raise EnvdError("internal", f"{method} answered with non-JSON") from None
        return reply if isinstance(reply, dict) else {}

    def stream(
        self, method: str, message: Message, timeout: float | None
    ) -> Generator[Message, None, None]:
        """The events of a server stream as they arrive; raises EnvdError for its error."""
        headers = {
            "Content-Type": "application/connect+json",
            "Connect-Content-Encoding": "identity",
            "Connect-Accept-Encoding": "identity",
            "Keepalive-Ping-Interval": str(KEEPALIVE_ASK_S),
        }
        if timeout:
            # envd kills the process at this deadline, as it does for the E2B clients.
            headers["Connect-Timeout-Ms"] = str(max(1, round(timeout * 1000)))
        try:
            with self.http.stream(
                "POST",
                f"/process.Process/{method}",
                content=frame(json.dumps(message).encode()),
                headers=headers,
                timeout=httpx.Timeout(STREAM_IDLE_S, connect=CONNECT_TIMEOUT_S),
            ) as response:
                if not response.is_success:
                    response.read()
                    raise _http_error(response)
                deframer = Deframer()
                for chunk in response.iter_bytes():
                    for flags, payload in deframer.feed(chunk):
                        message = json.loads(payload) if payload else {}
                        if flags & FLAG_END_STREAM:
                            error = _stream_error(message)
                            if error is not None:
                                raise error
                            return
                        event = message.get("event")
                        if isinstance(event, dict):
                            yield event
        except httpx.HTTPError as exc:
            raise self._unreachable(exc) from exc
        raise EnvdError("unavailable", "the connection to envd closed in the middle of a stream")

    def kill(self, pid: int) -> None:
        """Best effort: the caller is leaving, and a process nobody watches should not linger."""
        with contextlib.suppress(EnvdError):
            self.call("SendSignal", {"process": {"pid": pid}, "signal": "SIGNAL_SIGKILL"})

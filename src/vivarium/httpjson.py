"""JSON over HTTP, the same way on every listener we serve: errors as `{code, message}` with
the right status, request bodies that must be JSON objects, and typed field access that says
which field is wrong."""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from vivarium.errors import InvalidArgument, VivariumError

log = logging.getLogger(__name__)

Handler = Callable[[Request], Awaitable[Response]]


def error_response(exc: VivariumError) -> JSONResponse:
    return JSONResponse(exc.to_json(), status_code=exc.http_status, headers=exc.headers())


def guarded(handler: Handler) -> Handler:
    """Turn our errors into JSON `{code, message}`; log and hide anything unexpected."""

    async def wrapper(request: Request) -> Response:
        try:
            return await handler(request)
        except VivariumError as exc:
            return error_response(exc)
        except Exception:
            log.exception("unexpected error in %s %s", request.method, request.url.path)
            return JSONResponse({"code": 500, "message": "internal error; see the server log"},
                                status_code=500)  # fmt: skip

    return wrapper


# The largest JSON request we take (a template build's 400 steps) is far below it; a body is
# held whole in memory to be parsed.
MAX_JSON_BODY = 1 << 20


async def small_body(request: Request, limit: int = MAX_JSON_BODY) -> bytes:
    """The request's body, read whole, refused past `limit` bytes (before it is read, when the
    client says its length)."""
    too_large = InvalidArgument(f"the request body is over {limit} bytes")
    declared = request.headers.get("content-length", "")
    if declared.isascii() and declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def parse_json(raw: bytes) -> Any:
    """A request body's JSON; InvalidArgument (not a crash) for bad or absurdly nested JSON."""
    try:
        return json.loads(raw)
    except (ValueError, RecursionError) as exc:
        raise InvalidArgument(f"request body is not valid JSON: {exc}") from None


async def json_body(request: Request) -> dict[str, Any]:
    raw = await small_body(request)
    if not raw:
        return {}
    data = parse_json(raw)
    if not isinstance(data, dict):
        raise InvalidArgument("request body must be a JSON object")
    return data


def typed(
    data: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any = None
) -> Any:
    value = data.get(key, default)
    if value is None:
        return default
    if (isinstance(value, bool) and kind in (int, float, (int, float))) or not isinstance(
        value, kind
    ):
        raise InvalidArgument(f"{key} must be {_KINDS.get(kind, 'of another type')}")
    return value


_KINDS: dict[type | tuple[type, ...], str] = {
    str: "a string", int: "a whole number", float: "a number", (int, float): "a number",
    bool: "true or false", dict: "an object", list: "a list",
}  # fmt: skip


def str_map(data: dict[str, Any], key: str) -> dict[str, str]:
    value = typed(data, key, dict, {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise InvalidArgument(f"{key} must map strings to strings")
    return dict(value)


MAX_ENV_BYTES = 64 << 10  # a sandbox's own environment; Linux allows 2 MiB for all of exec's


def env_map(data: dict[str, Any], key: str) -> dict[str, str]:
    """Environment variables: checked here, since every process the sandbox starts inherits
    them (a NUL or a huge one would make every later start fail, a name with `=` would name
    another variable)."""
    env = str_map(data, key)
    for name, value in env.items():
        if not name or "=" in name or "\0" in name or "\0" in value:
            hint = "names are not empty and hold no '=' or NUL; values hold no NUL"
            raise InvalidArgument(f"{key}: {name!r:.60} is not a valid variable", hint)
    if sum(len(k.encode()) + len(v.encode()) + 2 for k, v in env.items()) > MAX_ENV_BYTES:
        raise InvalidArgument(f"{key} is over {MAX_ENV_BYTES >> 10} KiB",
                              "pass large values as files")  # fmt: skip
    return env


def whole_number(raw: str | None, name: str, default: int, top: int = 2**63 - 1) -> int:
    """A query parameter that must be a whole number from 0 to `top` (`default` if absent).
    ASCII digits only: `str.isdigit` also takes `²`, which `int` refuses."""
    if raw is None or raw == "":
        return default
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 19 or int(raw) > top:
        raise InvalidArgument(f"{name} must be a whole number from 0 to {top}, not {raw!r:.40}")
    return int(raw)

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
    return JSONResponse(exc.to_json(), status_code=exc.http_status)


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


async def json_body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except ValueError as exc:
        raise InvalidArgument(f"request body is not valid JSON: {exc}") from None
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

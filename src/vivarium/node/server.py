"""The node's HTTP API, served on a root-only Unix socket (never on a network port).

The control plane and the CLI use it; E2B-shaped REST lives in `vivarium.api`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from vivarium.errors import InvalidArgument, VivariumError
from vivarium.node.node import CreateRequest, Node

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


def _typed(
    data: dict[str, Any], key: str, kind: type | tuple[type, ...], default: Any = None
) -> Any:
    value = data.get(key, default)
    if value is None:
        return default
    if isinstance(value, bool) and kind in (int, float, (int, float)):
        raise InvalidArgument(f"{key} must be a number")
    if not isinstance(value, kind):
        raise InvalidArgument(f"{key} has the wrong type")
    return value


def _str_map(data: dict[str, Any], key: str) -> dict[str, str]:
    value = _typed(data, key, dict, {})
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()):
        raise InvalidArgument(f"{key} must map strings to strings")
    return dict(value)


def create_app(node: Node) -> Starlette:
    @guarded
    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    @guarded
    async def info(request: Request) -> Response:
        return JSONResponse(node.info())

    @guarded
    async def create(request: Request) -> Response:
        data = await json_body(request)
        req = CreateRequest(
            template=_typed(data, "template", str, "base"),
            timeout_s=_typed(data, "timeout", int),
            metadata=_str_map(data, "metadata"),
            env_vars=_str_map(data, "env_vars"),
            allow_internet=_typed(data, "allow_internet_access", bool, True),
            memory_mb=_typed(data, "memory_mb", int),
            cpus=_typed(data, "cpus", (int, float)),
        )
        record = await node.create(req)
        return JSONResponse(record.to_json(), status_code=201)

    @guarded
    async def list_sandboxes(request: Request) -> Response:
        return JSONResponse([r.to_json() for r in node.list_sandboxes()])

    @guarded
    async def get_sandbox(request: Request) -> Response:
        return JSONResponse(node.get(request.path_params["sandbox_id"]).to_json())

    @guarded
    async def kill(request: Request) -> Response:
        await node.kill(request.path_params["sandbox_id"])
        return Response(status_code=204)

    @guarded
    async def set_timeout(request: Request) -> Response:
        data = await json_body(request)
        timeout = _typed(data, "timeout", int)
        if timeout is None:
            raise InvalidArgument("timeout is required")
        record = await node.set_timeout(request.path_params["sandbox_id"], timeout)
        return JSONResponse(record.to_json())

    @guarded
    async def exec_command(request: Request) -> Response:
        data = await json_body(request)
        cmd = _typed(data, "cmd", list)
        if not cmd:
            raise InvalidArgument("cmd is required: a non-empty list of strings")
        result = await node.exec(
            request.path_params["sandbox_id"], cmd,
            user=_typed(data, "user", str, "user"), env=_str_map(data, "env"),
            cwd=_typed(data, "cwd", str), timeout_s=_typed(data, "timeout", (int, float), 60),
        )  # fmt: skip
        return JSONResponse(
            {"exit_code": result.returncode, "stdout": result.stdout, "stderr": result.stderr}
        )

    return Starlette(
        routes=[
            Route("/health", health),
            Route("/node", info),
            Route("/sandboxes", create, methods=["POST"]),
            Route("/sandboxes", list_sandboxes, methods=["GET"]),
            Route("/sandboxes/{sandbox_id}", get_sandbox, methods=["GET"]),
            Route("/sandboxes/{sandbox_id}", kill, methods=["DELETE"]),
            Route("/sandboxes/{sandbox_id}/timeout", set_timeout, methods=["POST"]),
            Route("/sandboxes/{sandbox_id}/exec", exec_command, methods=["POST"]),
        ]
    )

"""E2B's code-interpreter HTTP API: `/execute` (NDJSON stream), `/contexts`, `/health`."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from typing import TYPE_CHECKING, Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route

from . import ENVD_PORT
from .contexts import Contexts, UnknownLanguage, check_env, normalize

# In the template, envd and the interpreter are top-level packages side by side; in this
# repository both live under vivarium.guest, which is where the type checker finds them.
if TYPE_CHECKING:
    from vivarium.guest.envd.connect import StreamResponse
else:
    from envd.connect import StreamResponse


class BadRequest(Exception):
    pass


class Unauthorized(Exception):
    pass


async def _body(request: Request) -> dict[str, Any]:
    raw = await request.body()
    if not raw:
        return {}
    try:
        data = json.loads(raw)
    except ValueError:
        raise BadRequest("the request body is not valid JSON") from None
    if not isinstance(data, dict):
        raise BadRequest("the request body must be a JSON object")
    return data


def _sandbox_env(token: str | None) -> dict[str, str]:
    """The sandbox's variables, from envd, which also decides whether the caller's token is
    right (the client sends envd's access token on /execute)."""
    request = urllib.request.Request(f"http://127.0.0.1:{ENVD_PORT}/envs",
                                     headers={"X-Access-Token": token or "",
                                              "Connection": "close"})  # fmt: skip
    try:
        with urllib.request.urlopen(request, timeout=10) as response:
            data = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        if exc.code == 401:
            raise Unauthorized("missing or wrong X-Access-Token") from None
        raise
    return {str(k): str(v) for k, v in data.items()}


class SandboxEnv:
    """The sandbox's variables, fetched from envd with the caller's token and kept for that
    token: they are set once at create (and again, unchanged, at every resume), so a cell does
    not cost a round trip to envd. Another token is checked by envd again."""

    def __init__(self) -> None:
        self._known: tuple[str | None, dict[str, str]] | None = None

    async def get(self, token: str | None) -> dict[str, str]:
        if self._known is not None and self._known[0] == token:
            return self._known[1]
        env = await asyncio.to_thread(_sandbox_env, token)
        self._known = (token, env)
        return env


def create_app(contexts: Contexts) -> Starlette:
    sandbox_env = SandboxEnv()

    async def health(request: Request) -> Response:
        return PlainTextResponse("OK")

    async def execute(request: Request) -> Response:
        body = await _body(request)
        code = body.get("code")
        if not isinstance(code, str):
            raise BadRequest("'code' must be a string")
        context_id, language = body.get("context_id"), body.get("language")
        if context_id and language:
            raise BadRequest("give 'context_id' or 'language', not both")
        env = check_env(body.get("env_vars"))
        global_env = await sandbox_env.get(request.headers.get("x-access-token"))
        if context_id:
            ctx = contexts.get(str(context_id))
            if ctx is None:
                return PlainTextResponse(f"context {context_id} not found", status_code=404)
        else:
            ctx = await contexts.default(normalize(language))
        return StreamResponse(ctx.run(code, env, global_env), "application/x-ndjson")

    async def create_context(request: Request) -> Response:
        body = await _body(request)
        cwd = body.get("cwd")
        if cwd is not None and (not isinstance(cwd, str) or not cwd.startswith("/")):
            raise BadRequest("'cwd' must be an absolute path")
        ctx = await contexts.create(normalize(body.get("language")), cwd)
        return JSONResponse(ctx.describe())

    async def list_contexts(request: Request) -> Response:
        return JSONResponse(contexts.describe())

    async def delete_context(request: Request) -> Response:
        if not await contexts.remove(request.path_params["context_id"]):
            return PlainTextResponse("context not found", status_code=404)
        return Response(status_code=204)

    async def restart_context(request: Request) -> Response:
        ctx = contexts.get(request.path_params["context_id"])
        if ctx is None:
            return PlainTextResponse("context not found", status_code=404)
        async with ctx.lock:
            await ctx.restart()
        return Response(status_code=204)

    async def bad_request(request: Request, exc: Exception) -> Response:
        return PlainTextResponse(str(exc), status_code=400)

    async def unauthorized(request: Request, exc: Exception) -> Response:
        return PlainTextResponse(str(exc), status_code=401)

    async def failed(request: Request, exc: Exception) -> Response:
        # Say what went wrong (a kernel that would not start, envd unreachable), not just 500.
        return PlainTextResponse(f"{type(exc).__name__}: {exc}", status_code=500)

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/execute", execute, methods=["POST"]),
        Route("/contexts", create_context, methods=["POST"]),
        Route("/contexts", list_contexts, methods=["GET"]),
        Route("/contexts/{context_id}", delete_context, methods=["DELETE"]),
        Route("/contexts/{context_id}/restart", restart_context, methods=["POST"]),
    ]
    handlers = {BadRequest: bad_request, ValueError: bad_request,
                UnknownLanguage: bad_request, Unauthorized: unauthorized,
                Exception: failed}  # fmt: skip
    return Starlette(routes=routes, exception_handlers=handlers)

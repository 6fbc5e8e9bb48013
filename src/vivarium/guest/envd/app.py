"""envd's HTTP app: plain endpoints (/health, /init, /envs, /metrics, /files) and the Connect
services (process.Process, filesystem.Filesystem)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import time
from collections.abc import AsyncIterator
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from . import files, filesystem, process, trust
from .auth import signature_ok, token_ok
from .connect import unknown_method
from .identity import new_machine_id
from .spawner import Spawner
from .state import EnvdState

OPEN_PATHS = ("/health", "/init")
# What a browser's script may read of a response: Connect's status headers and downloads' names.
EXPOSED = ["Grpc-Status", "Grpc-Message", "Connect-Content-Encoding", "Content-Disposition",
           "Content-Length"]  # fmt: skip


class AccessToken:
    """Once /init set a token, every other request must carry it in X-Access-Token."""

    def __init__(self, app: ASGIApp, state: EnvdState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self._rejected(scope):
            response = JSONResponse(
                {"code": "unauthenticated", "message": "missing or wrong X-Access-Token"},
                status_code=401,
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def _rejected(self, scope: Scope) -> bool:
        if scope["type"] != "http" or scope["path"] in OPEN_PATHS or not self.state.access_token:
            return False
        request = Request(scope)
        return not token_ok(request, self.state) and not signature_ok(request, self.state)


def _metrics() -> dict[str, Any]:
    meminfo = {}
    with open("/proc/meminfo") as f:
        for line in f:
            key, _, rest = line.partition(":")
            meminfo[key] = int(rest.split()[0]) * 1024
    total = meminfo.get("MemTotal", 0)
    available = meminfo.get("MemAvailable", meminfo.get("MemFree", 0))
    cache = meminfo.get("Cached", 0)
    disk = os.statvfs("/")
    cpu_count = os.cpu_count() or 1
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    return {
        "ts": int(time.time()),
        "cpu_count": cpu_count,
        "cpu_used_pct": round(min(100.0, 100.0 * load / cpu_count), 2),
        "mem_total": total,
        "mem_used": total - available,
        "mem_cache": cache,
        "mem_total_mib": total >> 20,
        "mem_used_mib": (total - available) >> 20,
        "disk_used": (disk.f_blocks - disk.f_bfree) * disk.f_frsize,
        "disk_total": disk.f_blocks * disk.f_frsize,
    }


def create_app(state: EnvdState, spawner: Spawner | None = None) -> Starlette:
    spawner = spawner or Spawner()

    async def health(request: Request) -> Response:
        return Response(status_code=204)

    async def init(request: Request) -> Response:
        try:
            body = json.loads(await request.body() or b"{}")
        except ValueError:
            return JSONResponse({"code": 400, "message": "malformed JSON"}, status_code=400)
        if not isinstance(body, dict):
            return JSONResponse({"code": 400, "message": "body must be an object"},
                                status_code=400)  # fmt: skip
        # The file writes below run on the event loop: /init comes before anything else the
        # sandbox serves, and they take a few ms where the first hop to a worker thread after a
        # restore took ~10 (measured in creates).
        sandbox_id = body.get("sandboxId")
        if state.identity and isinstance(sandbox_id, str) and sandbox_id != state.sandbox_id:
            new_machine_id()  # a new sandbox: a machine of its own
        ca_bundle = body.get("caBundle")
        if isinstance(ca_bundle, str) and ca_bundle:
            try:
                for key, value in trust.install(ca_bundle).items():
                    state.env_vars.setdefault(key, value)  # a user's own choice stays
            except ValueError as exc:
                return JSONResponse({"code": 400, "message": str(exc)}, status_code=400)
        env_vars = body.get("envVars") or {}
        if isinstance(env_vars, dict):
            state.env_vars.update({str(k): str(v) for k, v in env_vars.items()})
        if body.get("accessToken"):
            state.access_token = str(body["accessToken"])
        for key, attr in (
            ("defaultUser", "default_user"),
            ("defaultWorkdir", "default_workdir"),
            ("sandboxId", "sandbox_id"),
            ("templateId", "template_id"),
        ):
            if isinstance(body.get(key), str) and body[key]:
                setattr(state, attr, body[key])
        return Response(status_code=204)

    async def envs(request: Request) -> Response:
        return JSONResponse(state.process_env())

    async def metrics(request: Request) -> Response:
        return JSONResponse(_metrics())

    routes = [
        Route("/health", health, methods=["GET"]),
        Route("/init", init, methods=["POST"]),
        Route("/envs", envs, methods=["GET"]),
        Route("/metrics", metrics, methods=["GET"]),
        *files.routes(state),
        *process.routes(state, spawner),
        *filesystem.routes(state),
        Route("/{service}/{method}", unknown_method, methods=["POST"]),
    ]

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        spawner.ensure_started()  # with envd, so a template's checkpoint already holds it
        # The worker thread file requests run on (access.blocking), started now so that the
        # checkpoint holds it: started by a sandbox's first request, it cost that one ~30 ms.
        await asyncio.to_thread(int)
        yield
        spawner.close()

    # Any origin, as E2B's envd: browsers (the dashboard, the JS client) call it from pages of
    # their own, and it authenticates by header (X-Access-Token), never by cookie. Outside the
    # token check, so that preflights and refusals carry the headers a browser needs to read them.
    cors = Middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["*"],
                      allow_headers=["*"], expose_headers=EXPOSED, max_age=3600)  # fmt: skip
    return Starlette(routes=routes, lifespan=lifespan,
                     middleware=[cors, Middleware(AccessToken, state=state)])  # fmt: skip

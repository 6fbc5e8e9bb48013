"""The public control-plane listener (default 127.0.0.1:3000).

For now it answers `GET /health`; the E2B-compatible REST API is built on this app.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route


def create_app() -> Starlette:
    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    return Starlette(routes=[Route("/health", health)])

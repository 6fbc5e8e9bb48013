"""Plain HTTP `/files`: GET streams a file out (download.py), POST streams uploads in
(upload.py). Both act as the `username` query parameter's user (else the default user) with the
permission checks of access.Access, never hold a whole file in memory, and answer errors as envd
does (files_request.HTTPError). This module only routes; the handlers, the headers they parse
(files_headers.py) and what they share (files_request.py) each have their own.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from . import download, upload
from .state import EnvdState


def routes(state: EnvdState) -> list[Route]:
    async def get(request: Request) -> Response:
        return await download.get(request, state)

    async def post(request: Request) -> Response:
        return await upload.post(request, state)

    return [
        Route("/files", get, methods=["GET"]),
        Route("/files", post, methods=["POST"]),
    ]

"""The web dashboard's static files, at `/dashboard` on the API's own origin.

The dashboard (dashboard/, TypeScript built by Vite) is a client like any other: it calls the
public API with the key it was signed in with and reaches envd through the proxy. The server
only hands out its files, with a content security policy that lets the page talk to those two
and nothing else.
"""

from __future__ import annotations

from pathlib import Path

from starlette.responses import JSONResponse
from starlette.routing import BaseRoute, Mount
from starlette.staticfiles import StaticFiles
from starlette.types import Message, Receive, Scope, Send

from vivarium.config import Settings

BUILT = Path(__file__).resolve().parents[3] / "dashboard" / "dist"


def policy(settings: Settings) -> str:
    proxy = f"{settings.scheme}://*.{settings.sandbox_domain}"
    return ("default-src 'self'; "
            f"connect-src 'self' {proxy}; "
            "style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
            "frame-ancestors 'none'; base-uri 'none'; form-action 'none'")  # fmt: skip


class _Files(StaticFiles):
    def __init__(self, directory: Path, csp: str) -> None:
        super().__init__(directory=directory, html=True)
        self.csp = csp

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", []),
                                      (b"content-security-policy", self.csp.encode()),
                                      (b"x-content-type-options", b"nosniff"),
                                      (b"referrer-policy", b"no-referrer")]  # fmt: skip
            await send(message)

        await super().__call__(scope, receive, with_headers)


def mount(settings: Settings) -> BaseRoute:
    directory = settings.dashboard_dir or BUILT
    if (directory / "index.html").is_file():
        return Mount("/dashboard", app=_Files(directory, policy(settings)))

    message = f"the dashboard is not built in {directory}: run `make dashboard` (make run does)"
    return Mount("/dashboard", app=JSONResponse({"code": 503, "message": message}, 503))

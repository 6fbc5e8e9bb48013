"""uvicorn's server without its tick, for the guest's servers (envd and the code interpreter).

uvicorn's main loop wakes every 100 ms, to refresh the Date header and to notice a stop signal.
Inside gVisor every wakeup costs the sentry a few milliseconds: an idle envd used 45 ms of CPU
per 10 s, and fifty idle sandboxes took about two of a 2-core host's cores, which starved
everything else on it. This loop sleeps until a stop signal instead, and sends no Date header
(nothing in E2B's protocol reads it).
"""

from __future__ import annotations

import asyncio
from types import FrameType

import uvicorn
from starlette.types import ASGIApp


def config(app: ASGIApp, host: str, port: int) -> uvicorn.Config:
    """How both guest servers run: quiet logs, long keep-alives, a short graceful stop."""
    return uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False,
                          timeout_keep_alive=300, http="h11", date_header=False,
                          # Attached process streams must not hold up a stop.
                          timeout_graceful_shutdown=2)  # fmt: skip


class QuietServer(uvicorn.Server):
    _loop: asyncio.AbstractEventLoop | None = None
    _stop: asyncio.Event | None = None

    async def main_loop(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        if not await self.on_tick(0):  # sets the default headers; True if a stop came already
            await self._stop.wait()

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        super().handle_exit(sig, frame)
        if self._loop is not None and self._stop is not None:
            # Runs in a signal handler, between two bytecodes of the loop's own thread: only a
            # thread-safe call may wake it.
            self._loop.call_soon_threadsafe(self._stop.set)

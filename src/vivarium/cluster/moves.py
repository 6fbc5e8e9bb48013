"""A sandbox that moves to another node (resumed there because its node drained or was lost)
is announced on a PostgreSQL channel, so that the cluster's proxy forgets where it was at once
instead of when its cache entry ages out."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine

log = logging.getLogger(__name__)

CHANNEL = "vivarium_sandbox_moves"
RETRY_S = 2.0


async def announce(engine: AsyncEngine, sandbox_id: str) -> None:
    """Tell every listener that `sandbox_id` is now another node's (PostgreSQL only: one host
    has nobody to tell)."""
    if engine.dialect.name != "postgresql":
        return
    async with engine.begin() as conn:
        await conn.execute(text("SELECT pg_notify(:channel, :id)"),
                           {"channel": CHANNEL, "id": sandbox_id})  # fmt: skip


async def listen(engine: AsyncEngine, moved: Callable[[str], None],
                 missed: Callable[[], None]) -> None:  # fmt: skip
    """Call `moved(sandbox_id)` for each announcement, until cancelled. The connection is
    made again when it is lost, and `missed()` is called then: announcements made meanwhile
    were lost with it."""
    while True:
        try:
            async with engine.connect() as conn:
                raw = (await conn.get_raw_connection()).driver_connection
                assert raw is not None

                def heard(_conn: Any, _pid: int, _channel: str, payload: str) -> None:
                    moved(payload)

                await raw.add_listener(CHANNEL, heard)
                missed()
                while not raw.is_closed():
                    await asyncio.sleep(RETRY_S)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("not listening for sandbox moves (%s); again in %.0f s", exc, RETRY_S)
        missed()
        await asyncio.sleep(RETRY_S)

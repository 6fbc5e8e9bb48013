"""Sandboxes' lifecycle events: created, paused, resumed, killed, timed out, out of memory ...,
with who or what made them happen. Each is recorded in the catalog (readable per sandbox and
per team through the API) and, with `VIVARIUM_WEBHOOK_URL`, delivered to a webhook.

Delivery never holds up the API: events wait in a bounded queue and one sender posts them in
order, each signed (`X-Vivarium-Signature: sha256=<HMAC-SHA256 of the body with
VIVARIUM_WEBHOOK_SECRET>`), retrying a failed one with backoff before going on. A queue that
fills up (an endpoint down for long) drops the oldest undelivered events, which stay readable
through the API.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import logging
import time
from typing import Any

import httpx
from sqlalchemy.ext.asyncio import AsyncEngine

from vivarium.api import store

log = logging.getLogger(__name__)

Row = dict[str, Any]
QUEUE = 10_000
ACTOR_CHARS = 200  # the catalog's column
RETRIES = 6
BACKOFF_S = (0.5, 1, 2, 4, 8, 16)  # before each retry
TIMEOUT_S = 10.0


def shape(row: Row) -> Row:
    """An event as the API and the webhook show it."""
    from vivarium.api.shapes import rfc3339  # shapes imports the control plane, which imports us

    return {"id": row["id"], "sandboxID": row["sandbox_id"], "type": row["type"],
            "actor": row["actor"], "reason": row["reason"],
            "timestamp": rfc3339(row["at"])}  # fmt: skip


def signature(secret: str, body: bytes) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def actor(team: Row | None) -> str:
    """Who called: the API key's name, when the call came with one."""
    if team is not None and team.get("key_name"):
        return f"key:{team['key_name']}"[:ACTOR_CHARS]
    return "api"


def ended_type(reason: str) -> str:
    """The event of a sandbox that ended on its own, from the node's reason."""
    if reason == "timeout":
        return "timed_out"
    if reason.startswith("out of memory"):
        return "oom"
    return "ended"


class EventLog:
    def __init__(self, engine: AsyncEngine, webhook_url: str = "", secret: str = "") -> None:
        self.engine = engine
        self.webhook_url = webhook_url
        self.secret = secret
        self._queue: asyncio.Queue[Row] = asyncio.Queue(QUEUE)
        self._sender: asyncio.Task[None] | None = None
        self.delivered = 0

    def start(self) -> None:
        if self.webhook_url and self._sender is None:
            self._sender = asyncio.get_running_loop().create_task(self._send_all())

    async def stop(self) -> None:
        if self._sender is not None:
            self._sender.cancel()
            await asyncio.gather(self._sender, return_exceptions=True)
            self._sender = None

    async def record(self, team_id: str, sandbox_id: str, type_: str, actor: str,
                     reason: str | None = None) -> None:  # fmt: skip
        """Record the event; never raises (an event lost must not fail what it describes)."""
        row = {"team_id": team_id, "sandbox_id": sandbox_id, "type": type_, "actor": actor,
               "reason": reason, "at": time.time()}  # fmt: skip
        try:
            row = await store.add_event(self.engine, row)
        except Exception:
            log.exception("could not record event %s of sandbox %s", type_, sandbox_id)
            return
        if self.webhook_url:
            if self._queue.full():
                dropped = self._queue.get_nowait()
                log.warning("webhook queue full: event %s not delivered", dropped["id"])
            self._queue.put_nowait(row)

    async def _send_all(self) -> None:
        async with httpx.AsyncClient(timeout=TIMEOUT_S) as http:
            while True:
                row = await self._queue.get()
                await self._send(http, row)

    async def _send(self, http: httpx.AsyncClient, row: Row) -> None:
        body = json.dumps({**shape(row), "teamID": row["team_id"]}).encode()
        headers = {"Content-Type": "application/json", "X-Vivarium-Event-Id": str(row["id"]),
                   "X-Vivarium-Signature": signature(self.secret, body)}  # fmt: skip
        for attempt in range(RETRIES + 1):
            try:
                response = await http.post(self.webhook_url, content=body, headers=headers)
                if response.is_success:
                    self.delivered += 1
                    return
                failure = f"HTTP {response.status_code}"
            except httpx.HTTPError as exc:
                failure = f"{type(exc).__name__}: {exc}"
            if attempt < RETRIES:
                await asyncio.sleep(BACKOFF_S[min(attempt, len(BACKOFF_S) - 1)])
        log.warning("webhook: event %s not delivered after %d tries (%s)", row["id"],
                    RETRIES + 1, failure)  # fmt: skip

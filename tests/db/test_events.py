"""Lifecycle events (api/events.py) on SQLite and PostgreSQL: recorded in order, read per team
and per sandbox, and posted to a webhook signed, in order, retried while it fails."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from sqlalchemy.ext.asyncio import AsyncEngine

from vivarium.api import events, store

pytestmark = pytest.mark.anyio
SECRET = "a-webhook-secret-for-tests"


class Receiver(BaseHTTPRequestHandler):
    received: list[tuple[dict[str, str], bytes]] = []
    failures_left = 0

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        if Receiver.failures_left > 0:  # down for a while
            Receiver.failures_left -= 1
            self.send_response(503)
        else:
            Receiver.received.append((dict(self.headers), body))
            self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def receiver() -> Iterator[str]:
    Receiver.received, Receiver.failures_left = [], 2
    server = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}/hook"
    server.shutdown()


async def test_events_are_kept_in_order_and_posted_signed_in_order(
    engine: AsyncEngine, receiver: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(events, "BACKOFF_S", (0.05,))
    team = await store.create_team(engine, "t", 5)
    other = await store.create_team(engine, "u", 5)
    log = events.EventLog(engine, receiver, SECRET)
    log.start()
    try:
        await log.record(team["id"], "ia", "created", "key:ci", "from template base")
        await log.record(team["id"], "ib", "created", "key:ci")
        await log.record(team["id"], "ia", "paused", "timeout")
        await log.record(other["id"], "ic", "created", "key:theirs")
        await log.record(team["id"], "ia", "killed", "key:ci")
        for _ in range(200):
            if len(Receiver.received) == 5:
                break
            await asyncio.sleep(0.05)
    finally:
        await log.stop()
    mine = await store.events(engine, team["id"])
    assert [(e["sandbox_id"], e["type"]) for e in mine] == [
        ("ia", "created"), ("ib", "created"), ("ia", "paused"), ("ia", "killed")]  # fmt: skip
    assert [e["type"] for e in await store.events(engine, team["id"], "ia")] == [
        "created", "paused", "killed"]  # fmt: skip
    after = await store.events(engine, team["id"], after_id=mine[1]["id"], limit=1)
    assert [e["id"] for e in after] == [mine[2]["id"]]
    assert [e["sandbox_id"] for e in await store.events(engine, other["id"])] == ["ic"]
    # The webhook was down for two tries, then got every event once, in order, signed.
    posted = [json.loads(body) for _, body in Receiver.received]
    assert [p["id"] for p in posted] == sorted(p["id"] for p in posted)
    assert [(p["sandboxID"], p["type"], p["actor"]) for p in posted] == [
        ("ia", "created", "key:ci"), ("ib", "created", "key:ci"), ("ia", "paused", "timeout"),
        ("ic", "created", "key:theirs"), ("ia", "killed", "key:ci")]  # fmt: skip
    for headers, body in Receiver.received:
        expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(headers["X-Vivarium-Signature"], expected)


async def test_a_webhook_that_is_down_never_holds_up_recording(engine: AsyncEngine) -> None:
    team = await store.create_team(engine, "t", 5)
    log = events.EventLog(engine, "http://127.0.0.1:9/never", SECRET)  # nothing listens
    log.start()
    try:
        await asyncio.wait_for(
            asyncio.gather(
                *(log.record(team["id"], f"i{n}", "created", "key:ci") for n in range(50))
            ),
            10,
        )
    finally:
        await log.stop()
    assert len(await store.events(engine, team["id"])) == 50


def test_who_and_what() -> None:
    assert events.actor({"key_name": "ci"}) == "key:ci" and events.actor(None) == "api"
    assert events.ended_type("timeout") == "timed_out"
    assert events.ended_type("out of memory: exceeded its 512 MiB limit") == "oom"
    assert events.ended_type("stopped unexpectedly") == "ended"

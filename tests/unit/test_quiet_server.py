"""The guest's uvicorn server sleeps while idle: no timer wakes it, and a stop signal still
ends it (envd/serving.py says why this matters inside gVisor)."""

from __future__ import annotations

import asyncio
import signal

import httpx

from vivarium.guest.envd.serving import QuietServer, config


async def _app(scope, receive, send):  # type: ignore[no-untyped-def]
    if scope["type"] == "http":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})


def test_an_idle_server_has_no_timer_and_stops_on_a_signal() -> None:
    asyncio.run(_idle_then_stop())


async def _idle_then_stop() -> None:
    server = QuietServer(config(_app, "127.0.0.1", 0))
    serving = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    port = server.servers[0].sockets[0].getsockname()[1]
    async with httpx.AsyncClient() as client:
        response = await client.get(f"http://127.0.0.1:{port}/")
    assert response.text == "ok"
    assert "date" not in response.headers
    await asyncio.sleep(0.3)  # stock uvicorn would have a 100 ms sleep pending by now
    loop = asyncio.get_running_loop()
    pending = [h for h in loop._scheduled if not h.cancelled()]  # type: ignore[attr-defined]
    assert pending == []
    server.handle_exit(signal.SIGTERM, None)
    server._captured_signals.clear()  # uvicorn would raise it again in this process at the end
    await asyncio.wait_for(serving, 30)
    assert not serving.exception()

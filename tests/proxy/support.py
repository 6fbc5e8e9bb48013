"""Real servers and clients on 127.0.0.1 for the proxy tests: no mocked network.

`uvicorn_app` runs a Starlette app the way envd runs (uvicorn, h11); `raw_server` runs a raw
handler for the cases a framework hides (protocol switches, full duplex, faults).
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterable, Mapping
from typing import Any

import h11
import uvicorn
from starlette.types import ASGIApp

from vivarium.proxy import ProxyLimits, Refusal, SandboxProxy, Upstream, Waker

# Waits here detect a hang, never a speed: generous enough for a loaded 2-core machine.
HANG = 30


def run(coro: Coroutine[Any, Any, None], timeout: float = 1.5 * HANG) -> None:
    asyncio.run(asyncio.wait_for(coro, timeout))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def routing(sandbox_id: str, port: int) -> dict[str, str]:
    return {"E2b-Sandbox-Id": sandbox_id, "E2b-Sandbox-Port": str(port)}


@contextlib.asynccontextmanager
async def uvicorn_app(app: ASGIApp) -> AsyncIterator[int]:
    port = free_port()
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        log_level="warning",
        http="h11",
        ws="none",
        lifespan="off",
        proxy_headers=False,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        if task.done():
            task.result()
        await asyncio.sleep(0.005)
    try:
        yield port
    finally:
        server.should_exit = True
        server.force_exit = True
        await task


Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


@contextlib.asynccontextmanager
async def raw_server(handler: Handler) -> AsyncIterator[int]:
    async def guarded(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, asyncio.CancelledError):
            await handler(reader, writer)
        writer.transport.abort()

    server = await asyncio.start_server(guarded, "127.0.0.1", 0)
    try:
        yield int(server.sockets[0].getsockname()[1])
    finally:
        server.close()


@contextlib.asynccontextmanager
async def proxy(
    table: Mapping[str, Upstream | Refusal], domain: str | None = None,
    limits: ProxyLimits | None = None, wake: Waker | None = None,
) -> AsyncIterator[SandboxProxy]:  # fmt: skip
    p = SandboxProxy(table.get, domain=domain, limits=limits, wake=wake)
    await p.start("127.0.0.1", 0)
    try:
        yield p
    finally:
        await p.stop()


def local(sandbox_id: str) -> Upstream:
    return Upstream("127.0.0.1", sandbox_id)


class H11Peer:
    """One side of a raw HTTP/1.1 connection driven event by event."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, role: Any
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.conn = h11.Connection(role)

    @classmethod
    async def connect(cls, port: int) -> H11Peer:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        return cls(reader, writer, h11.CLIENT)

    async def send(self, *events: Any) -> None:
        for event in events:
            self.writer.write(self.conn.send(event) or b"")
        await self.writer.drain()

    async def next_event(self) -> Any:
        while True:
            event = self.conn.next_event()
            if event is not h11.NEED_DATA:
                return event
            self.conn.receive_data(await self.reader.read(65536))

    async def response(self) -> tuple[h11.Response, bytes]:
        head = await self.next_event()
        assert isinstance(head, h11.Response), head
        body = b""
        while type(event := await self.next_event()) is h11.Data:
            body += event.data
        assert type(event) is h11.EndOfMessage, event
        return head, body

    async def request(
        self, method: str, target: str, headers: Iterable[tuple[str, str]], body: bytes = b""
    ) -> tuple[h11.Response, bytes]:
        if self.conn.our_state is h11.DONE:
            self.conn.start_next_cycle()
        headers = [("Host", "proxy.test"), ("Content-Length", str(len(body))), *headers]
        await self.send(
            h11.Request(method=method, target=target, headers=headers),
            h11.Data(data=body),
            h11.EndOfMessage(),
        )
        return await self.response()

    def close(self) -> None:
        self.writer.transport.abort()


async def read_head(reader: asyncio.StreamReader) -> bytes:
    return await reader.readuntil(b"\r\n\r\n")

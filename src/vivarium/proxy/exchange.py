"""Forwarding one request to a sandbox and its response back, both streamed as they come.

Three small tasks run per exchange, coordinated by `Exchange._coordinate`:
- the request body pump (client → sandbox), only while the client is still sending a body;
- the response relay (sandbox → client);
- a watcher that reads the client once its request is complete, so a client that hangs up while
  waiting (a long server stream, a slow command) is noticed at once rather than at the next write.
The relay may start, and even finish, before the request body ends: Connect client and bidi
streams need that.
"""

from __future__ import annotations

import asyncio
from typing import Any

import h11

from vivarium.proxy.headers import request_headers, response_headers
from vivarium.proxy.pool import ConnectFailed, ConnectionPool, PoolKey, UpstreamConnection
from vivarium.proxy.stream import READ_SIZE, ClientGone, HttpStream, UpstreamCut, UpstreamFailed
from vivarium.proxy.tunnel import splice


class ProxyError(Exception):
    """Nothing reached the client yet: answer it with this status and JSON message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class Exchange:
    def __init__(
        self,
        client: HttpStream,
        request: h11.Request,
        key: PoolKey,
        pool: ConnectionPool,
        client_ip: str,
    ) -> None:
        self.client = client
        self.key = key
        self.pool = pool
        has_host = any(name == b"host" for name, _ in request.headers)
        headers, self.upgrading = request_headers(
            request.headers.raw_items(), client_ip, has_host, f"{key.host}:{key.port}".encode()
        )
        self.request = h11.Request(method=request.method, target=request.target, headers=headers)
        self.conn: UpstreamConnection | None = None
        self.keep_client = True
        self.response_started = False
        self.body_task: asyncio.Task[None] | None = None
        self.watcher: asyncio.Task[None] | None = None
        self.relay: asyncio.Task[bool] | None = None

    async def run(self) -> bool:
        """Forward the exchange; True when the client connection may carry another request.

        Raises ProxyError when the client should get a local error instead, ClientGone when the
        client connection is to be closed.
        """
        events, complete = self._buffered_request()
        try:
            await self._open(fresh=False)
            return await self._forward(events, complete)
        finally:
            tasks = [t for t in (self.body_task, self.watcher, self.relay) if t is not None]
            for task in tasks:
                task.cancel()
            # Also collects exceptions of tasks that ended while nobody was waiting for them.
            await asyncio.gather(*tasks, return_exceptions=True)
            if self.conn is not None:
                self.pool.discard(self.conn)

    def _buffered_request(self) -> tuple[list[Any], bool]:
        """The request head and the body h11 already holds; whether that is all of it."""
        events: list[Any] = [self.request]
        while True:
            try:
                event = self.client.h11.next_event()
            except h11.RemoteProtocolError:
                raise ClientGone from None
            if type(event) is h11.Data:
                events.append(h11.Data(data=event.data))
            elif type(event) is h11.EndOfMessage:
                events.append(h11.EndOfMessage())
                return events, True
            else:
                return events, False

    async def _open(self, *, fresh: bool) -> None:
        key = self.key
        try:
            self.conn = await (self.pool.connect(key) if fresh else self.pool.acquire(key))
        except ConnectFailed as e:
            # E2B's words: the clients look for "port is not open" to tell this from a
            # sandbox that is gone.
            where = f"The sandbox {key.sandbox_id} is running but port is not open: {key.port}"
            if e.reason == "refused":
                message = f"{where} refused the connection"
            elif e.reason == "timeout":
                message = f"{where} did not accept a connection in {self.pool.connect_timeout:g} s"
            else:
                message = f"{where} is not reachable ({e.reason})"
            raise ProxyError(502, message) from None

    async def _forward(self, events: list[Any], complete: bool) -> bool:
        # A complete request that fails on a reused connection before any answer is sent again
        # once, on a new connection: the sandbox may have closed the idle connection just as we
        # picked it. A request whose body is still streaming cannot be replayed.
        may_retry = complete
        while True:
            conn = self.conn
            assert conn is not None
            try:
                await self._send_upstream(conn, [conn.h11.send(e) for e in events])
                if complete:
                    if self.watcher is None:
                        self.watcher = asyncio.create_task(self._watch_client())
                else:
                    self.body_task = asyncio.create_task(self._pump_body(conn))
                self.relay = asyncio.create_task(self._relay_response(conn))
                return await self._coordinate(conn)
            except UpstreamFailed:
                if self.response_started:
                    raise UpstreamCut from None  # a cut-off response, and the client knows it
                if may_retry and conn.reused:
                    may_retry = False
                    self.pool.discard(conn)
                    self.conn = None
                    await self._open(fresh=True)
                    continue
                raise ProxyError(
                    502,
                    f"The sandbox {self.key.sandbox_id} closed the connection on port "
                    f"{self.key.port} without answering",
                ) from None

    async def _coordinate(self, conn: UpstreamConnection) -> bool:
        relay = self.relay
        assert relay is not None
        upstream_broken = False
        while True:
            running = [t for t in (self.body_task, self.watcher, relay) if t and not t.done()]
            done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            watcher, body_task = self.watcher, self.body_task
            if watcher is not None and watcher in done:
                if watcher.exception() is not None:
                    raise ClientGone
                self.watcher = None  # pipelined bytes arrived: h11 holds them for later
            if body_task is not None and body_task in done:
                error = body_task.exception()
                if isinstance(error, UpstreamFailed):
                    # The sandbox stopped reading; its answer may still come. The client's
                    # remaining body is unread, so its connection cannot be reused.
                    upstream_broken = True
                    self.keep_client = False
                elif error is not None:
                    raise error
                elif not relay.done():
                    self.watcher = asyncio.create_task(self._watch_client())
            if relay.done():  # now or in an earlier round, while the body went on
                switched = relay.result()  # raises what the relay raised
                if switched:
                    return await self._tunnel(conn)
                if self.body_task is None or self.body_task.done():
                    break
                # Response complete, request body not: wait for the client to finish it.
        if not upstream_broken and conn.h11.our_state is conn.h11.their_state is h11.DONE:
            self.conn = None
            self.pool.release(conn)
        return self.keep_client

    async def _pump_body(self, conn: UpstreamConnection) -> None:
        client = self.client
        out: list[bytes] = []
        while True:
            try:
                event = client.h11.next_event()
            except h11.RemoteProtocolError:
                raise ClientGone from None
            if event is h11.NEED_DATA:
                if out:
                    await self._send_upstream(conn, out)
                try:
                    await client.fill()
                except OSError:
                    raise ClientGone from None
            elif type(event) is h11.Data:
                out.append(self._serialize_upstream(conn, h11.Data(data=event.data)))
            elif type(event) is h11.EndOfMessage:
                out.append(self._serialize_upstream(conn, h11.EndOfMessage()))
                await self._send_upstream(conn, out)
                return
            else:
                raise ClientGone

    @staticmethod
    def _serialize_upstream(conn: UpstreamConnection, event: h11.Data | h11.EndOfMessage) -> bytes:
        try:
            return conn.h11.send(event) or b""
        except h11.LocalProtocolError:
            raise UpstreamFailed("upstream connection state") from None

    @staticmethod
    async def _send_upstream(conn: UpstreamConnection, out: list[bytes]) -> None:
        conn.writer.write(b"".join(out))
        out.clear()
        try:
            await conn.writer.drain()
        except OSError:
            raise UpstreamFailed("write failed") from None

    async def _relay_response(self, conn: UpstreamConnection) -> bool:
        """Copy the response to the client; True when the sandbox switched protocols (101)."""
        client = self.client
        out: list[bytes] = []
        while True:
            try:
                event = conn.h11.next_event()
            except h11.RemoteProtocolError as e:
                raise UpstreamFailed(str(e)) from None
            if event is h11.NEED_DATA:
                if out:
                    await self._send_client(out)
                try:
                    await conn.fill()
                except OSError as e:
                    raise UpstreamFailed(str(e)) from None
            elif type(event) is h11.Data:
                out.append(client.h11.send(h11.Data(data=event.data)) or b"")
            elif type(event) is h11.Response:
                self.response_started = True
                headers = response_headers(event.headers.raw_items(), switching=False)
                head = h11.Response(
                    status_code=event.status_code, headers=headers, reason=event.reason
                )
                out.append(client.h11.send(head) or b"")
            elif type(event) is h11.EndOfMessage:
                # Trailers are dropped: HTTP/1.1 clients of sandboxes (Connect) do not use them.
                out.append(client.h11.send(h11.EndOfMessage()) or b"")
                await self._send_client(out)
                return False
            elif type(event) is h11.InformationalResponse:
                switching = event.status_code == 101
                headers = response_headers(event.headers.raw_items(), switching=switching)
                info = h11.InformationalResponse(
                    status_code=event.status_code, headers=headers, reason=event.reason
                )
                self.response_started |= switching
                out.append(client.h11.send(info) or b"")
                if switching:
                    await self._send_client(out)
                    return True
            else:
                raise UpstreamFailed(f"unexpected {event!r}")

    async def _send_client(self, out: list[bytes]) -> None:
        writer = self.client.writer
        writer.write(b"".join(out))
        out.clear()
        try:
            await writer.drain()
        except OSError:
            raise ClientGone from None

    async def _watch_client(self) -> None:
        try:
            data = await self.client.reader.read(READ_SIZE)
        except OSError:
            raise ClientGone from None
        if not data:
            raise ClientGone
        self.client.h11.receive_data(data)

    async def _tunnel(self, conn: UpstreamConnection) -> bool:
        if self.body_task is not None and not self.body_task.done():
            return False  # a body still streaming into a switched protocol makes no sense
        if self.watcher is not None:
            # Whatever the watcher read before it is cancelled is in h11's trailing data.
            self.watcher.cancel()
            await asyncio.gather(self.watcher, return_exceptions=True)
            self.watcher = None
        await splice(self.client, conn, self.client.h11.trailing_data[0], conn.h11.trailing_data[0])
        return False

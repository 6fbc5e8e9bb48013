"""Keep-alive connections to sandboxes, reused across requests and clients.

Connections are pooled per (sandbox id, instance key, host, port). Sandbox addresses are recycled
when a sandbox dies and another takes its network slot, so the instance key is part of the pool
key: a connection opened to one sandbox is never handed to the next one on the same address.

Only a connection whose exchange completed on both sides with keep-alive comes back (the caller
decides: `release` vs `discard`). Idle ones are checked for EOF before reuse, capped per key,
and closed after `max_idle_age` seconds. Connections in use are tracked too, so `forget` can cut
streams that would otherwise hang on a sandbox that was killed (its network namespace vanishes
without sending a reset).
"""

from __future__ import annotations

import asyncio
import ssl
import time
from collections import deque
from typing import NamedTuple

import h11

from vivarium.proxy.stream import MAX_HEAD, READ_SIZE, HttpStream


class PoolKey(NamedTuple):
    sandbox_id: str
    instance: str
    host: str
    port: int
    tls: bool = False  # a cluster node's proxy that serves TLS


class ConnectFailed(Exception):
    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason  # "refused", "timeout" or the OS error text


class UpstreamConnection(HttpStream):
    __slots__ = ("key", "reused", "idle_since")

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, key: PoolKey
    ) -> None:
        # Response heads may be as large as request heads (big Set-Cookie); h11's default is 16 KiB.
        conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=MAX_HEAD)
        super().__init__(reader, writer, conn)
        self.key = key
        self.reused = False
        self.idle_since = 0.0


class ConnectionPool:
    def __init__(
        self, *, connect_timeout: float, max_idle_per_key: int, max_idle_age: float,
        tls: ssl.SSLContext | None = None,
    ) -> None:  # fmt: skip
        self.tls = tls
        self.connect_timeout = connect_timeout
        self.max_idle_per_key = max_idle_per_key
        self.max_idle_age = max_idle_age
        self._idle: dict[PoolKey, deque[UpstreamConnection]] = {}
        self._busy: set[UpstreamConnection] = set()

    async def acquire(self, key: PoolKey) -> UpstreamConnection:
        idle = self._idle.get(key)
        while idle:
            conn = idle.pop()  # most recently used first: least likely to have timed out
            if not idle:
                del self._idle[key]
            if conn.usable() and time.monotonic() - conn.idle_since < self.max_idle_age:
                conn.reused = True
                self._busy.add(conn)
                return conn
            conn.abort()
        return await self.connect(key)

    async def connect(self, key: PoolKey) -> UpstreamConnection:
        try:
            async with asyncio.timeout(self.connect_timeout):
                if key.tls and self.tls is None:
                    self.tls = ssl.create_default_context()
                reader, writer = await asyncio.open_connection(
                    key.host, key.port, limit=READ_SIZE, ssl=self.tls if key.tls else None
                )
        except ssl.SSLError as e:
            raise ConnectFailed(f"TLS: {e.reason or e}") from None
        except ConnectionRefusedError:
            raise ConnectFailed("refused") from None
        except TimeoutError:
            raise ConnectFailed("timeout") from None
        except OSError as e:
            raise ConnectFailed(e.strerror or str(e)) from None
        conn = UpstreamConnection(reader, writer, key)
        self._busy.add(conn)
        return conn

    def release(self, conn: UpstreamConnection) -> None:
        """Back to the pool: the caller saw both sides of the exchange complete."""
        self._busy.discard(conn)
        idle = self._idle.setdefault(conn.key, deque())
        if not conn.usable() or len(idle) >= self.max_idle_per_key:
            conn.abort()
            if not idle:
                del self._idle[conn.key]
            return
        conn.h11.start_next_cycle()
        conn.idle_since = time.monotonic()
        idle.append(conn)

    def discard(self, conn: UpstreamConnection) -> None:
        self._busy.discard(conn)
        conn.abort()

    def forget(self, name: str) -> None:
        """Close every connection, idle or in use, of a sandbox id or instance key."""
        for key in [k for k in self._idle if name in (k.sandbox_id, k.instance)]:
            for conn in self._idle.pop(key):
                conn.abort()
        for conn in [c for c in self._busy if name in (c.key.sandbox_id, c.key.instance)]:
            self.discard(conn)

    def sweep(self) -> None:
        """Close idle connections that are too old or that the sandbox closed."""
        deadline = time.monotonic() - self.max_idle_age
        for key in list(self._idle):
            idle = self._idle[key]
            keep = [c for c in idle if c.idle_since > deadline and c.usable()]
            if len(keep) == len(idle):
                continue
            for conn in idle:
                if conn not in keep:
                    conn.abort()
            if keep:
                self._idle[key] = deque(keep)
            else:
                del self._idle[key]

    def close(self) -> None:
        for idle in self._idle.values():
            for conn in idle:
                conn.abort()
        self._idle.clear()
        for conn in list(self._busy):
            self.discard(conn)

"""The listener: one asyncio TCP server speaking plain HTTP/1.1 to clients.

Each client connection is a keep-alive loop; every request on it is routed on its own (one
connection may reach several sandboxes). Requests the proxy answers itself (bad routing, unknown
sandbox, closed port, `/health`) get a JSON body `{"code": ..., "message": ...}` like E2B's own
proxy, whose phrases the e2b client matches: "was not found" means the sandbox is gone,
"port ... is not open" that it runs but nothing listens. A paused sandbox, or one being paused
or resumed, is a 409 (`Refusal`), as E2B's proxy answers when it does not resume it itself;
one made with auto-resume is resumed first (`Waker`) and then served.
"""

from __future__ import annotations

import asyncio
import hmac
import inspect
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from http import HTTPStatus
from ssl import SSLContext
from typing import Any
from urllib.parse import unquote

import h11

from vivarium.errors import NotFound, VivariumError
from vivarium.guest.envd import PORT as ENVD_PORT
from vivarium.proxy.exchange import Exchange, ProxyError
from vivarium.proxy.pool import ConnectionPool, PoolKey
from vivarium.proxy.routing import Route, RoutingError, route_request, signed_files
from vivarium.proxy.stream import MAX_HEAD, READ_SIZE, ClientGone, HttpStream, UpstreamCut
from vivarium.telemetry import PROXY_REQUESTS

log = logging.getLogger("vivarium.proxy")

TRANSITION_POLL_S = 0.05
# envd's endpoints for the node alone, which reaches envd straight at its slot address. /init
# sets the sandbox's access token: through the proxy, anyone who knew a sandbox's id could take
# it over (E2B's envd leaves /init open too, behind a proxy that is not the way in).
NODE_ONLY_ENVD_PATHS = frozenset({"/init"})


@dataclass(frozen=True, slots=True)
class Upstream:
    """Where a sandbox is reached: its address, and a key naming this instance of it.

    Addresses are reused by later sandboxes; pooled connections are kept per `key`, so give
    each sandbox instance (each create, each resume) a distinct one.
    """

    host: str
    key: str
    # If set, requests to its ports but envd's must carry it (E2B's e2b-traffic-access-token).
    traffic_token: str | None = None
    # If set, every port of the sandbox is reached through this one: a node's own sandbox
    # proxy, which routes the request again by its headers (the cluster's proxy), over TLS
    # if `tls` (verified with the proxy's `upstream_tls`).
    port: int | None = None
    tls: bool = False


@dataclass(frozen=True, slots=True)
class Refusal:
    """A sandbox that exists but takes no traffic now, answered with E2B's proxy shape for it:
    409 `{"sandboxId", "message", "code"}` and, for a paused one, `canAutoResume`."""

    sandbox_id: str
    message: str
    can_auto_resume: bool | None = None

    @classmethod
    def paused(cls, sandbox_id: str) -> Refusal:
        return cls(sandbox_id, f"The sandbox {sandbox_id} is paused: resume it with "
                   f"Sandbox.connect('{sandbox_id}') (POST /sandboxes/{sandbox_id}/connect)",
                   can_auto_resume=False)  # fmt: skip

    @classmethod
    def transitioning(cls, sandbox_id: str) -> Refusal:
        return cls(sandbox_id, "The sandbox is still transitioning. Try again in a moment.")

    def body(self) -> dict[str, Any]:
        body: dict[str, Any] = {"sandboxId": self.sandbox_id, "message": self.message,
                                "code": 409}  # fmt: skip
        if self.can_auto_resume is not None:
            body["canAutoResume"] = self.can_auto_resume
        return body


# None: no such sandbox (502, "was not found": the e2b client's phrase for a sandbox gone).
# Either answers at once (a node's own table) or is awaited (the cluster's catalog).
Resolved = Upstream | Refusal | None
Resolver = Callable[[str], Resolved | Awaitable[Resolved]]
# Called for a paused sandbox: True once it runs again (auto-resume), False if it is not one that
# traffic resumes; a VivariumError says why it could not be resumed.
Waker = Callable[[str], Awaitable[bool]]
# The running sandbox whose access token passes the check given (a pre-signed URL's), if any.
Signer = Callable[[Callable[[str], bool]], str | None]
# Told of each request about to be forwarded to a sandbox (its id), once it passed every check.
Toucher = Callable[[str], None]


@dataclass(frozen=True, slots=True)
class ProxyLimits:
    max_head_bytes: int = MAX_HEAD  # request line and headers; 431 beyond
    idle_timeout: float = 75.0  # a client connection waiting for its next request
    connect_timeout: float = 5.0
    transition_wait: float = 30.0  # a request for a sandbox being paused or snapshotted
    pool_max_idle: int = 8  # idle connections kept per sandbox instance and port
    pool_max_idle_age: float = 30.0
    # After a local error the rest of the request body is read and dropped, so the connection
    # stays usable and the client reads the answer instead of a reset; beyond this, close.
    discard_body_max: int = 1024 * 1024


class SandboxProxy:
    def __init__(
        self, resolve: Resolver, *, domain: str | None = None, limits: ProxyLimits | None = None,
        wake: Waker | None = None, signer: Signer | None = None, touch: Toucher | None = None,
        upstream_tls: SSLContext | None = None,
    ) -> None:  # fmt: skip
        self._resolve = resolve
        self._touch = touch
        self._signer = signer
        self._wake = wake
        self._domain = domain.strip(".").lower() if domain else None
        self.limits = limits or ProxyLimits()
        self._pool = ConnectionPool(
            connect_timeout=self.limits.connect_timeout,
            max_idle_per_key=self.limits.pool_max_idle,
            max_idle_age=self.limits.pool_max_idle_age,
            tls=upstream_tls,
        )
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._clients: set[asyncio.Task[Any]] = set()

    async def start(
        self, host: str = "127.0.0.1", port: int = 0, ssl: SSLContext | None = None
    ) -> None:
        self._server = await asyncio.start_server(
            self._serve_client, host, port, limit=READ_SIZE, backlog=1024, ssl=ssl
        )
        self._sweeper = asyncio.create_task(self._sweep())

    @property
    def port(self) -> int:
        assert self._server is not None, "start() first"
        return int(self._server.sockets[0].getsockname()[1])

    async def stop(self) -> None:
        if self._server is None:
            return
        self._server.close()
        tasks = [*self._clients, *([self._sweeper] if self._sweeper else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._pool.close()
        await self._server.wait_closed()
        self._server = None

    def forget(self, name: str) -> None:
        """Close the connections to a sandbox (its id, or an `Upstream.key`), idle or streaming.

        Call it when a sandbox is killed or paused: a vanished network namespace sends no
        reset, so streams to it would otherwise hang until the client gives up.
        """
        self._pool.forget(name)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(min(5.0, self.limits.pool_max_idle_age / 2))
            self._pool.sweep()

    async def _serve_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._clients.add(task)
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=self.limits.max_head_bytes)
        client = HttpStream(reader, writer, conn)
        peer = writer.get_extra_info("peername")
        client_ip = str(peer[0]) if isinstance(peer, tuple) else "unknown"
        graceful = cut = False
        try:
            while True:
                request = await self._read_head(client)
                if request is None or not await self._handle(client, request, client_ip):
                    break
                if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                    break
                conn.start_next_cycle()
            graceful = True
        except UpstreamCut:
            cut = True
        except (ClientGone, OSError):
            pass
        except asyncio.CancelledError:
            # Only stop() cancels us. Ending normally spares asyncio's stream callback, which
            # in 3.11 calls task.exception() on the finished task and chokes on a cancelled one.
            pass
        except Exception:
            log.exception("proxy: client connection failed")
        finally:
            self._clients.discard(task)
            if graceful:
                client.close()
            elif cut:
                await client.reset()
            else:
                client.abort()

    async def _read_head(self, client: HttpStream) -> h11.Request | None:
        deadline: float | None = None
        while True:
            try:
                event = client.h11.next_event()
            except h11.RemoteProtocolError as e:
                await self._reply(client, None, e.error_status_hint, f"Bad request: {e}")
                return None
            if event is h11.NEED_DATA:
                if deadline is None:
                    deadline = asyncio.get_running_loop().time() + self.limits.idle_timeout
                try:
                    async with asyncio.timeout_at(deadline):
                        await client.fill()
                except TimeoutError:
                    return None
            elif type(event) is h11.Request:
                return event
            else:
                return None  # ConnectionClosed: the client is done

    async def _handle(self, client: HttpStream, request: h11.Request, client_ip: str) -> bool:
        """Answer one request; True when the connection may carry another."""
        try:
            route = route_request(request.headers, self._domain)
        except RoutingError as e:
            return await self._reply(client, request, 400, str(e))
        if route is None and self._signer is not None:
            signed = signed_files(request.method, request.target)
            sandbox_id = self._signer(signed.made_with) if signed else None
            route = Route(sandbox_id, ENVD_PORT) if sandbox_id else None
        if route is None:
            if request.method in (b"GET", b"HEAD") and request.target.split(b"?")[0] == b"/health":
                return await self._reply(client, request, 200, None)
            where = f", or a Host of {{port}}-{{sandboxId}}.{self._domain}" if self._domain else ""
            message = f"Missing E2b-Sandbox-Id and E2b-Sandbox-Port headers{where}"
            return await self._reply(client, request, 400, message)
        if request.method == b"CONNECT":
            return await self._reply(client, request, 400, "CONNECT is not supported")
        if route.port == ENVD_PORT and _node_only(request.target):
            return await self._reply(client, request, 403, "envd's /init is the node's alone")
        try:
            upstream = await self._lookup(route.sandbox_id)
        except Exception:
            log.exception("proxy: resolving sandbox %s failed", route.sandbox_id)
            return await self._reply(client, request, 502, "The sandbox could not be looked up")
        # Being paused, snapshotted or resumed: a request waits for the outcome (a snapshot
        # stops a sandbox for about a second) rather than fail.
        deadline = asyncio.get_running_loop().time() + self.limits.transition_wait
        while isinstance(upstream, Refusal) and upstream.can_auto_resume is None:
            if asyncio.get_running_loop().time() > deadline:
                break
            await asyncio.sleep(TRANSITION_POLL_S)
            upstream = await self._lookup(route.sandbox_id)
        if isinstance(upstream, Refusal) and upstream.can_auto_resume is not None and self._wake:
            try:  # paused: resumed first if it was made to be, as E2B's proxy does
                await self._wake(route.sandbox_id)
            except NotFound:
                pass  # killed meanwhile: not found, below
            except VivariumError as e:
                message = f"The sandbox {route.sandbox_id} could not be resumed: {e}"
                return await self._reply(client, request, e.http_status, message)
            upstream = await self._lookup(route.sandbox_id)
        if upstream is None:
            message = f"The sandbox {route.sandbox_id} was not found"
            return await self._reply(client, request, 502, message)
        if isinstance(upstream, Refusal):
            return await self._reply(client, request, 409, upstream.message, upstream.body())
        if upstream.traffic_token is not None and route.port != ENVD_PORT:
            sent = _header(request, b"e2b-traffic-access-token")
            if not hmac.compare_digest(sent.encode(), upstream.traffic_token.encode()):
                message = (f"The sandbox {route.sandbox_id} takes traffic to its ports only with "
                           "its traffic access token (e2b-traffic-access-token)")  # fmt: skip
                return await self._reply(client, request, 403, message)
        if self._touch is not None:
            self._touch(route.sandbox_id)
        key = PoolKey(route.sandbox_id, upstream.key, upstream.host, upstream.port or route.port,
                      upstream.tls)  # fmt: skip
        try:
            keep = await Exchange(client, request, key, self._pool, client_ip).run()
            PROXY_REQUESTS.labels("forwarded").inc()
            return keep
        except ProxyError as e:
            return await self._reply(client, request, e.status, e.message)

    async def _lookup(self, sandbox_id: str) -> Resolved:
        found = self._resolve(sandbox_id)
        return await found if inspect.isawaitable(found) else found

    async def _reply(
        self, client: HttpStream, request: h11.Request | None, status: int, message: str | None,
        payload: dict[str, Any] | None = None,
    ) -> bool:  # fmt: skip
        """A response of the proxy's own. `request` None: the request was unreadable, close."""
        PROXY_REQUESTS.labels(str(status)).inc()
        if payload is None:
            payload = {"status": "ok"} if message is None else {"code": status, "message": message}
        body = json.dumps(payload).encode()
        # Readable by pages of any origin, as envd's own answers are (a browser client learns
        # that a sandbox is paused, not that the network failed); they hold no secret.
        headers = [(b"Content-Type", b"application/json"), (b"Content-Length", b"%d" % len(body)),
                   (b"Access-Control-Allow-Origin", b"*")]  # fmt: skip
        if request is None:
            headers.append((b"Connection", b"close"))
        conn = client.h11
        reason = HTTPStatus(status).phrase.encode()
        data = conn.send(h11.Response(status_code=status, headers=headers, reason=reason)) or b""
        if request is None or request.method != b"HEAD":
            data += conn.send(h11.Data(data=body)) or b""
        data += conn.send(h11.EndOfMessage()) or b""
        await client.write(data)
        return request is not None and await self._discard_body(client)

    async def _discard_body(self, client: HttpStream) -> bool:
        left = self.limits.discard_body_max
        conn = client.h11
        try:
            while conn.their_state is h11.SEND_BODY:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    async with asyncio.timeout(self.limits.idle_timeout):
                        await client.fill()
                elif type(event) is h11.Data:
                    left -= len(event.data)
                    if left < 0:
                        return False
        except (h11.RemoteProtocolError, TimeoutError):
            return False
        return True


def _header(request: h11.Request, name: bytes) -> str:
    for key, value in request.headers:
        if key.lower() == name:
            return bytes(value).decode("latin-1")
    return ""


def _node_only(target: bytes) -> bool:
    """Whether the request is for a path envd serves to the node only, as envd will read it
    (percent-decoded, so `/%69nit` is `/init`; a trailing slash only earns a redirect)."""
    path = unquote(target.split(b"?", 1)[0].decode("latin-1")).rstrip("/")
    return path in NODE_ONLY_ENVD_PATHS

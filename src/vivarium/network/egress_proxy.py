"""The egress proxy: where a sandbox's HTTP (port 80) and TLS (port 443) connections go when
its rules allow hostnames (network/egress.py): to denied addresses, and to every address when
rules inject headers.

The slot's router sends such connections here (firewall.router_rules). The proxy looks at what
the sandbox asks for, the TLS server name or the HTTP Host, before anything reaches the outside
(it peeks: nothing is consumed until it decides):
- a name the rules allow: the proxy resolves it itself and connects there, never to the address
  the sandbox dialled, so a name cannot be used to reach an address that other names share,
  and a literal IP with a forged name reaches only where the name points. TLS passes through
  untouched;
- a name whose requests get headers (a rule with a transform): the proxy terminates TLS with a
  certificate of the deployment's CA (network/egress_ca.py, which sandboxes trust), adds the
  headers to the request, and sends it on over TLS it verifies itself. The request asks the
  server to close after its response, so every request of the sandbox passes here;
- any other name goes where it resolves if the address rules allow that address; else, and
  without a name, the connection is reset.
Addresses in private, link-local and host ranges are refused unless the operator opened them
(egress_allow). The sandbox sees its connection accepted before the verdict (as in E2B).

A sandbox with a SOCKS5 proxy of its own (`egressProxy`) has every TCP connection its rules let
out tunnelled through it: the ones above once decided, and all others, which the host sends to
a second port (the tunnel, HostFirewall.tunnel) with their original destination. The tunnel
holds them to the same closed ranges, and fails closed: a proxy that cannot be reached, or
refuses, ends the connection; nothing falls back to going out directly.

Each sandbox may hold MAX_PER_SANDBOX connections through the proxy: one flooding it is refused
more, and the others' keep going.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import ipaddress
import logging
import os
import socket
import ssl
import struct
from collections import Counter
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path

import dns.asyncresolver
import dns.exception
import dns.resolver
import h11

from vivarium.errors import InvalidArgument
from vivarium.network.egress import Egress, Headers, Socks, covering, reachable
from vivarium.network.egress_ca import EgressCA
from vivarium.network.socks5 import SocksError
from vivarium.network.socks5 import connect as socks_connect

log = logging.getLogger(__name__)

MAX_PER_SANDBOX = 256
HEAD_TIMEOUT_S = 10.0  # for the sandbox to say where it goes
CONNECT_TIMEOUT_S = 10.0
MAX_HEAD = 16 * 1024
READ_SIZE = 256 * 1024
PIPE_SIZE = 1024 * 1024  # per direction of a relayed connection
WRITE_BUFFER = 4 * 1024 * 1024
TLS_HANDSHAKE = 0x16
SO_ORIGINAL_DST = 80  # linux/netfilter_ipv4.h

# (sandbox id, its rules) of the sandbox behind a slot address; None for any other peer.
PolicyOf = Callable[[str], tuple[str, Egress] | None]
Handler = Callable[[str, Egress, socket.socket], Awaitable[None]]


class EgressProxy:
    def __init__(
        self, policy_of: PolicyOf, opened: Sequence[str], nameservers: Sequence[str] = (),
        ca: EgressCA | None = None, upstream_cafile: Path | None = None,
    ) -> None:  # fmt: skip
        self.policy_of = policy_of
        self.opened = tuple(opened)  # the operator's VIVARIUM_EGRESS_ALLOW
        self.resolver = dns.asyncresolver.Resolver(configure=not nameservers)
        if nameservers:
            self.resolver.nameservers = list(nameservers)
        self.resolver.lifetime = CONNECT_TIMEOUT_S
        # Answers are kept for their TTL: a sandbox opening connection after connection to
        # one API must not wait for a DNS round trip each time.
        self.resolver.cache = dns.resolver.LRUCache(4096)
        self.ca = ca
        self.upstream_tls = ssl.create_default_context()
        if upstream_cafile is not None:
            self.upstream_tls.load_verify_locations(cafile=str(upstream_cafile))
        self.upstream_tls.set_alpn_protocols(["http/1.1"])
        self.port = 0
        self.tunnel_port = 0
        self._listeners: list[socket.socket] = []
        self._accepting: list[asyncio.Task[None]] = []
        self._connections: set[asyncio.Task[None]] = set()
        self._open: Counter[str] = Counter()

    async def start(self) -> tuple[int, int]:
        """Listen on two ephemeral ports of every host address, the router rules' and the
        tunnel's (HostFirewall.tunnel)."""
        self.port = self._listen(self._relay)
        self.tunnel_port = self._listen(self._tunnel)
        return self.port, self.tunnel_port

    def _listen(self, handler: Handler) -> int:
        listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.bind(("0.0.0.0", 0))
        listener.listen(1024)
        listener.setblocking(False)
        self._listeners.append(listener)
        self._accepting.append(asyncio.create_task(self._accept(listener, handler)))
        return int(listener.getsockname()[1])

    async def close(self) -> None:
        tasks = [*self._accepting, *self._connections]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        for listener in self._listeners:
            listener.close()

    async def _accept(self, listener: socket.socket, handler: Handler) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                sock, peer = await loop.sock_accept(listener)
            except OSError:  # out of descriptors, say: the next one may do
                log.exception("the egress proxy could not accept a connection")
                await asyncio.sleep(0.1)
                continue
            sock.setblocking(False)
            task = asyncio.create_task(self._serve(sock, peer[0], handler))
            self._connections.add(task)
            task.add_done_callback(self._connections.discard)

    async def _serve(self, sock: socket.socket, peer: str, handler: Handler) -> None:
        found = self.policy_of(peer)
        if found is None or self._open[found[0]] >= MAX_PER_SANDBOX:
            _reset_socket(sock)
            return
        sandbox_id, egress = found
        self._open[sandbox_id] += 1
        try:
            await handler(sandbox_id, egress, sock)
            sock.close()  # done (a reset, or handed to a transport that closed it: no matter)
        except (TimeoutError, OSError, ssl.SSLError, asyncio.IncompleteReadError,
                asyncio.LimitOverrunError, h11.ProtocolError, SocksError) as e:  # fmt: skip
            if isinstance(e, SocksError):
                log.info("egress of %s through its SOCKS5 proxy failed: %s", sandbox_id, e)
            _reset_socket(sock)
        finally:
            self._open[sandbox_id] -= 1
            if not self._open[sandbox_id]:
                del self._open[sandbox_id]

    async def _relay(self, sandbox_id: str, egress: Egress, sock: socket.socket) -> None:
        head = await asyncio.wait_for(_peek_head(sock), HEAD_TIMEOUT_S)
        tls = head[:1] == bytes([TLS_HANDSHAKE])
        name = server_name(head) if tls else http_host(head)
        port = 443 if tls else 80
        headers = egress.headers_for(name) if name else None
        by_name = headers is not None or (name is not None and egress.allows_name(name))
        address = None  # unless a name leaves something the rules could allow
        if name is not None and (by_name or not egress.walled):
            address = await self._resolve(name)
        if name is None or address is None or not (by_name or _allowed(egress, address)):
            log.info("egress of %s to %s:%d refused by its rules", sandbox_id, name, port)
            _reset_socket(sock)
            return
        if headers is not None and self.ca is not None:
            await self._intercept(sandbox_id, egress, sock, name, address, port, tls, headers)
            return
        if egress.socks is not None:
            await self._through_socks(egress.socks, sock, address, port)
            return
        upstream = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        try:
            upstream.setblocking(False)
            await asyncio.wait_for(
                asyncio.get_running_loop().sock_connect(upstream, (address, port)),
                CONNECT_TIMEOUT_S,
            )
            await _splice_both_ways(sock, upstream)
        finally:
            upstream.close()

    async def _intercept(
        self, sandbox_id: str, egress: Egress, sock: socket.socket, name: str, address: str,
        port: int, tls: bool, headers: Headers,
    ) -> None:  # fmt: skip
        """Terminate the sandbox's TLS, add `headers` to its request, and send it on."""
        assert self.ca is not None
        if tls:
            context = await asyncio.to_thread(self.ca.server_context, name)
            reader, writer = await _accept_tls(sock, context)
        else:
            reader, writer = await asyncio.open_connection(sock=sock, limit=READ_SIZE)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), HEAD_TIMEOUT_S)
        if egress.socks is None:
            up_reader, up_writer = await asyncio.wait_for(
                asyncio.open_connection(address, port, limit=READ_SIZE,
                                        ssl=self.upstream_tls if tls else None,
                                        server_hostname=name if tls else None),
                CONNECT_TIMEOUT_S,
            )  # fmt: skip
        else:
            up_reader, up_writer = await self._socks_stream(egress.socks, address, port)
            if tls:
                await asyncio.wait_for(up_writer.start_tls(self.upstream_tls, server_hostname=name),
                                       CONNECT_TIMEOUT_S)  # fmt: skip
        up_writer.write(with_headers(head, headers))
        # Names only: the values are secrets.
        log.info("egress of %s to %s:%d: added headers %s", sandbox_id, name, port,
                 ", ".join(k for k, _ in headers))  # fmt: skip
        await _both_ways(reader, writer, up_reader, up_writer)

    async def _tunnel(self, sandbox_id: str, egress: Egress, sock: socket.socket) -> None:
        """A TCP connection of a sandbox with a SOCKS5 proxy, as its router let it out: on to
        its original destination through the proxy."""
        raw = sock.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
        address, port = socket.inet_ntoa(raw[4:8]), int.from_bytes(raw[2:4], "big")
        if egress.socks is None or not (_allowed(egress, address) and self._may_reach(address)):
            log.info("egress of %s to %s:%d refused by its rules", sandbox_id, address, port)
            _reset_socket(sock)
            return
        await self._through_socks(egress.socks, sock, address, port)

    async def _through_socks(self, socks: Socks, sock: socket.socket, address: str,
                             port: int) -> None:  # fmt: skip
        # Dialled first: if the proxy fails, _serve resets the sandbox's connection.
        up_reader, up_writer = await self._socks_stream(socks, address, port)
        reader, writer = await asyncio.open_connection(sock=sock, limit=READ_SIZE)
        await _both_ways(reader, writer, up_reader, up_writer)

    async def _socks_stream(
        self, socks: Socks, address: str, port: int
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        """A stream through the sandbox's SOCKS5 proxy to `address`:`port`. The proxy's name
        is resolved now, and held to the same closed ranges as any destination."""
        proxy = await self._proxy_address(socks)
        if proxy is None:
            raise SocksError(f"{socks.host} does not resolve to an address sandboxes may reach")
        reader, writer = await asyncio.wait_for(
            asyncio.open_connection(
                proxy, socks.port, limit=READ_SIZE,
                ssl=socks.tls_context() if socks.tls else None,
                server_hostname=(socks.server_name or socks.host) if socks.tls else None,
            ),
            CONNECT_TIMEOUT_S,
        )  # fmt: skip
        try:
            await asyncio.wait_for(
                socks_connect(reader, writer, address, port, socks.username, socks.password),
                CONNECT_TIMEOUT_S,
            )
        except BaseException:
            writer.close()
            raise
        return reader, writer

    async def check(self, socks: Socks | None) -> None:
        """Refuse, before a sandbox has it, a SOCKS5 proxy no sandbox could reach."""
        if socks is None:
            return
        if await self._proxy_address(socks) is None:
            raise InvalidArgument(
                f"network.egressProxy.address: {socks.host} does not resolve to an address "
                "sandboxes may reach",
                "give a proxy on a public address (private and internal ranges need the "
                "operator's VIVARIUM_EGRESS_ALLOW)",
            )

    async def _proxy_address(self, socks: Socks) -> str | None:
        """Where to dial the SOCKS5 proxy: its address, or its name resolved now, held to the
        ranges sandboxes may reach."""
        if not _is_address(socks.host):
            return await self._resolve(socks.host)  # which holds it to them already
        return socks.host if self._may_reach(socks.host) else None

    def _may_reach(self, address: str) -> bool:
        return reachable(address, self.opened)

    async def _resolve(self, name: str) -> str | None:
        """The first address of `name` outside the closed ranges (or in ones opened)."""
        try:
            answer = await self.resolver.resolve(name, "A")
        except (dns.exception.DNSException, OSError):
            return None
        for record in answer:
            if self._may_reach(address := str(record)):
                return address
        return None


def _is_address(host: str) -> bool:
    try:
        ipaddress.IPv4Address(host)
    except ValueError:
        return False
    return True


def _allowed(egress: Egress, address: str) -> bool:
    """What the firewall would say of a connection to `address`: allowed entries win."""
    return covering(egress.allow_nets, address) or not covering(egress.deny_nets, address)


def with_headers(head: bytes, headers: Headers) -> bytes:
    """An HTTP/1.x request head with `headers` set (replacing any of the same names), asking
    the server to close after its response."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(head)
    request = conn.next_event()
    if not isinstance(request, h11.Request):
        raise h11.RemoteProtocolError("not an HTTP request", 400)
    replaced = {k.lower().encode() for k, _ in headers} | {b"connection"}
    kept = [(k, v) for k, v in request.headers.raw_items() if k.lower() not in replaced]
    added = [(k.encode(), v.encode()) for k, v in headers]
    out = h11.Request(method=request.method, target=request.target,
                      headers=[*kept, *added, (b"connection", b"close")],
                      http_version=request.http_version)  # fmt: skip
    return h11.Connection(h11.CLIENT).send(out) or b""


async def _peek_head(sock: socket.socket) -> bytes:
    """The TLS ClientHello record or the HTTP request head, left unread in the socket."""
    loop = asyncio.get_running_loop()
    while True:
        try:
            data = sock.recv(MAX_HEAD, socket.MSG_PEEK)
        except BlockingIOError:
            await _ready(loop, sock, loop.add_reader, loop.remove_reader)
            continue
        if not data:
            raise asyncio.IncompleteReadError(b"", None)
        if _complete(data) or len(data) >= MAX_HEAD:
            return data
        await asyncio.sleep(0.01)  # the rest is on its way (readable stays true meanwhile)


def _complete(data: bytes) -> bool:
    if data[0] == TLS_HANDSHAKE:
        return len(data) >= 5 and len(data) >= 5 + int.from_bytes(data[3:5], "big")
    return b"\r\n\r\n" in data


async def _accept_tls(
    sock: socket.socket, context: ssl.SSLContext
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=READ_SIZE)
    protocol = asyncio.StreamReaderProtocol(reader)
    transport, _ = await loop.connect_accepted_socket(
        lambda: protocol, sock, ssl=context, ssl_handshake_timeout=HEAD_TIMEOUT_S
    )
    return reader, asyncio.StreamWriter(transport, protocol, reader, loop)


def server_name(record: bytes) -> str | None:
    """The server name (SNI) of a TLS ClientHello record; None without one."""
    try:
        body = record[5 : 5 + int.from_bytes(record[3:5], "big")]
        if body[0] != 1:  # not a ClientHello
            return None
        pos = 4 + 2 + 32  # handshake header, version, random
        pos += 1 + body[pos]  # session id
        pos += 2 + int.from_bytes(body[pos : pos + 2], "big")  # cipher suites
        pos += 1 + body[pos]  # compression methods
        end = pos + 2 + int.from_bytes(body[pos : pos + 2], "big")
        pos += 2
        while pos + 4 <= end:
            kind = int.from_bytes(body[pos : pos + 2], "big")
            size = int.from_bytes(body[pos + 2 : pos + 4], "big")
            pos += 4
            if kind == 0:  # server_name: list length, name type 0 (host_name), length, name
                if body[pos + 2] != 0:
                    return None
                length = int.from_bytes(body[pos + 3 : pos + 5], "big")
                return _checked_name(body[pos + 5 : pos + 5 + length])
            pos += size
    except IndexError:
        return None
    return None


def http_host(head: bytes) -> str | None:
    """The host (without a port) an HTTP/1.x request head names; None if it is not one."""
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(head)
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError:
        return None
    if not isinstance(event, h11.Request):
        return None
    for key, value in event.headers:
        if key == b"host":
            host = value.rsplit(b":", 1)[0] if not value.startswith(b"[") else b""
            return _checked_name(host)
    return None


def _checked_name(raw: bytes) -> str | None:
    try:
        name = raw.decode("ascii").lower().rstrip(".")
    except UnicodeDecodeError:
        return None
    if not name or len(name) > 253:
        return None
    with contextlib.suppress(ValueError):
        ipaddress.ip_address(name)
        return None  # an address is not a name: rules by address are the firewall's
    return name


async def _splice_both_ways(a: socket.socket, b: socket.socket) -> None:
    """Relay raw bytes both ways in the kernel (splice(2) through a pipe per direction): what
    passes through untouched never crosses into Python. A half-close is passed on."""
    one, other = asyncio.ensure_future(_splice(a, b)), asyncio.ensure_future(_splice(b, a))
    try:
        await asyncio.gather(one, other)
    finally:  # one side failed: the other direction has nowhere to go either
        for task in (one, other):
            task.cancel()
        await asyncio.gather(one, other, return_exceptions=True)


async def _splice(src: socket.socket, dst: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    pipe_out, pipe_in = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    flags = os.SPLICE_F_MOVE | os.SPLICE_F_NONBLOCK
    try:
        with contextlib.suppress(OSError):  # a larger pipe: fewer trips per download
            fcntl.fcntl(pipe_in, fcntl.F_SETPIPE_SZ, PIPE_SIZE)
        while True:
            try:
                held = os.splice(src.fileno(), pipe_in, PIPE_SIZE, flags=flags)
            except BlockingIOError:
                await _ready(loop, src, loop.add_reader, loop.remove_reader)
                continue
            if held == 0:  # end of stream: pass the half-close on
                with contextlib.suppress(OSError):
                    dst.shutdown(socket.SHUT_WR)
                return
            while held:
                try:
                    held -= os.splice(pipe_out, dst.fileno(), held, flags=flags)
                except BlockingIOError:
                    await _ready(loop, dst, loop.add_writer, loop.remove_writer)
    finally:
        os.close(pipe_out)
        os.close(pipe_in)


async def _ready(loop: asyncio.AbstractEventLoop, sock: socket.socket,
                 add: Callable[..., None], remove: Callable[[int], bool]) -> None:  # fmt: skip
    """Until `sock` is readable (add_reader) or writable (add_writer)."""
    ready: asyncio.Future[None] = loop.create_future()

    def wake() -> None:
        if not ready.done():
            ready.set_result(None)

    add(sock.fileno(), wake)
    try:
        await ready
    finally:
        remove(sock.fileno())


async def _both_ways(
    a_reader: asyncio.StreamReader, a_writer: asyncio.StreamWriter,
    b_reader: asyncio.StreamReader, b_writer: asyncio.StreamWriter,
) -> None:  # fmt: skip
    """Copy both ways until both sides have finished; a half-close is passed on."""
    for writer in (a_writer, b_writer):
        # Fewer pauses for drain(): a download crosses in a few large writes.
        writer.transport.set_write_buffer_limits(high=WRITE_BUFFER)
    try:
        await asyncio.gather(_pump(a_reader, b_writer), _pump(b_reader, a_writer))
    finally:
        a_writer.close()
        b_writer.close()


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(READ_SIZE):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except OSError:
        writer.transport.abort()


def _reset_socket(sock: socket.socket) -> None:
    """End the connection with a reset: the program inside sees it refused at once."""
    with contextlib.suppress(OSError):
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()

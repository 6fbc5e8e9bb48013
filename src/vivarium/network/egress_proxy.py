"""The egress proxy: where a sandbox's HTTP (port 80) and TLS (port 443) connections go when
its rules allow hostnames but deny the address it dialled (network/egress.py).

The slot's router sends such connections here (firewall.router_rules). The proxy reads what the
sandbox asks for, the TLS server name or the HTTP Host, before anything reaches the outside:
- a name the rules do not allow: the connection is reset;
- an allowed name: the proxy resolves it itself and connects there, never to the address the
  sandbox dialled, so a name cannot be used to reach an address that other names share, and a
  literal IP with a forged name reaches only where the name points. Addresses in private,
  link-local and host ranges are refused unless the operator opened them (egress_allow).
The sandbox sees the connection accepted before the verdict (as in E2B): a denied one is then
reset. TLS passes through untouched (no certificate of ours is involved).

Each sandbox may hold MAX_PER_SANDBOX connections through the proxy: one flooding it is refused
more, and the others' keep going.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import socket
import struct
from collections import Counter
from collections.abc import Callable, Sequence

import dns.asyncresolver
import dns.exception
import h11

from vivarium.network.addressing import BLOCKED_RANGES
from vivarium.network.egress import Egress, covering

log = logging.getLogger(__name__)

MAX_PER_SANDBOX = 256
HEAD_TIMEOUT_S = 10.0  # for the sandbox to say where it goes
CONNECT_TIMEOUT_S = 10.0
MAX_HEAD = 16 * 1024
READ_SIZE = 256 * 1024
TLS_HANDSHAKE = 0x16

# (sandbox id, its rules) of the sandbox behind a slot address; None for any other peer.
PolicyOf = Callable[[str], tuple[str, Egress] | None]


class EgressProxy:
    def __init__(self, policy_of: PolicyOf, opened: Sequence[str],
                 nameservers: Sequence[str] = ()) -> None:  # fmt: skip
        self.policy_of = policy_of
        self.opened = tuple(opened)  # the operator's VIVARIUM_EGRESS_ALLOW
        self.resolver = dns.asyncresolver.Resolver(configure=not nameservers)
        if nameservers:
            self.resolver.nameservers = list(nameservers)
        self.resolver.lifetime = CONNECT_TIMEOUT_S
        self.port = 0
        self._server: asyncio.Server | None = None
        self._open: Counter[str] = Counter()

    async def start(self) -> int:
        """Listen on an ephemeral port of every host address; the router rules point at it."""
        self._server = await asyncio.start_server(self._serve, "0.0.0.0", 0, limit=MAX_HEAD)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 5)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        found = self.policy_of(peer[0]) if peer else None
        if found is None or self._open[found[0]] >= MAX_PER_SANDBOX:
            _reset(writer)
            return
        sandbox_id, egress = found
        self._open[sandbox_id] += 1
        try:
            await self._relay(sandbox_id, egress, reader, writer)
        except (TimeoutError, OSError, asyncio.IncompleteReadError):
            _reset(writer)
        finally:
            self._open[sandbox_id] -= 1
            if not self._open[sandbox_id]:
                del self._open[sandbox_id]

    async def _relay(self, sandbox_id: str, egress: Egress, reader: asyncio.StreamReader,
                     writer: asyncio.StreamWriter) -> None:  # fmt: skip
        head = await asyncio.wait_for(_read_head(reader), HEAD_TIMEOUT_S)
        tls = head[:1] == bytes([TLS_HANDSHAKE])
        name = server_name(head) if tls else http_host(head)
        port = 443 if tls else 80
        if name is None or not egress.allows_name(name):
            log.info("egress of %s to %s:%d refused by its rules", sandbox_id, name, port)
            _reset(writer)
            return
        address = await self._resolve(name)
        if address is None:
            log.info("egress of %s to %s:%d: no address it may reach", sandbox_id, name, port)
            _reset(writer)
            return
        up_reader, up_writer = await asyncio.wait_for(
            asyncio.open_connection(address, port, limit=READ_SIZE), CONNECT_TIMEOUT_S
        )
        up_writer.write(head)
        await _both_ways(reader, writer, up_reader, up_writer)

    async def _resolve(self, name: str) -> str | None:
        """The first address of `name` outside the closed ranges (or in ones opened)."""
        try:
            answer = await self.resolver.resolve(name, "A")
        except (dns.exception.DNSException, OSError):
            return None
        for record in answer:
            address = str(record)
            if covering(self.opened, address) or not covering(BLOCKED_RANGES, address):
                return address
        return None


async def _read_head(reader: asyncio.StreamReader) -> bytes:
    """The TLS ClientHello record, or the HTTP request head."""
    first = await reader.readexactly(5)
    if first[0] == TLS_HANDSHAKE:
        return first + await reader.readexactly(int.from_bytes(first[3:5], "big"))
    try:
        return first + await reader.readuntil(b"\r\n\r\n")
    except asyncio.LimitOverrunError:
        raise asyncio.IncompleteReadError(first, None) from None


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


async def _both_ways(
    a_reader: asyncio.StreamReader, a_writer: asyncio.StreamWriter,
    b_reader: asyncio.StreamReader, b_writer: asyncio.StreamWriter,
) -> None:  # fmt: skip
    """Copy both ways until both sides have finished; a half-close is passed on."""
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


def _reset(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()

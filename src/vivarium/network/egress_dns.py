"""The sandboxes' DNS resolver: every DNS query a sandbox sends, to any address on port 53, comes
here (the slot's router redirects it: firewall.router_rules), and is answered by policy.

- A sandbox whose rules deny all traffic but what they allow (an allow-list) gets answers for
  the hostnames it may reach only; any other name is NXDOMAIN. A name it may not reach cannot
  carry data out in its queries either (DNS tunnelling), and a program learns at once that the
  name is not for it instead of waiting on a server it cannot reach.
- Other sandboxes get every name answered.
Queries go on to the sandbox's own DNS servers when its rules name them (`dnsServers`), else to
the node's (VIVARIUM_EGRESS_DNS, or the host's resolv.conf), so sandboxes resolve names on a
host that cannot reach public DNS servers too. Servers in private, link-local and host ranges
are asked only if the operator opened them (VIVARIUM_EGRESS_ALLOW).

UDP and TCP on one port. Each sandbox may have MAX_PENDING_PER_SANDBOX queries in flight and
MAX_TCP_PER_SANDBOX connections: one flooding its resolver has the rest dropped unread, and the
others' are answered.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import re
import socket
import struct
from collections import Counter
from collections.abc import Coroutine, Sequence
from typing import Any

import dns.asyncquery
import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
import dns.resolver

from vivarium.network.egress import Egress, reachable
from vivarium.network.egress_proxy import PolicyOf

log = logging.getLogger(__name__)

MAX_PENDING_PER_SANDBOX = 64
MAX_TCP_PER_SANDBOX = 16
UPSTREAM_TIMEOUT_S = 3.0
TCP_IDLE_S = 10.0  # a TCP client may send several queries, but not hold the connection idle
MAX_MESSAGE = 65535
_LABEL = re.compile(rb"[A-Za-z0-9_-]{1,63}")


class EgressDNS:
    def __init__(self, policy_of: PolicyOf, opened: Sequence[str],
                 nameservers: Sequence[str] = ()) -> None:  # fmt: skip
        self.policy_of = policy_of
        self.opened = tuple(opened)
        self.nameservers = tuple(nameservers) or tuple(
            str(s) for s in dns.resolver.Resolver(configure=True).nameservers if ":" not in str(s)
        )
        self.port = 0
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._pending: Counter[str] = Counter()  # queries in flight, by sandbox
        self._tcp_open: Counter[str] = Counter()  # TCP connections, by sandbox

    async def start(self) -> int:
        """Listen on one ephemeral port, UDP and TCP alike, of every host address."""
        loop = asyncio.get_running_loop()
        for _ in range(20):  # the UDP port may be taken for TCP: try another
            udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            udp.bind(("0.0.0.0", 0))
            port = int(udp.getsockname()[1])
            tcp = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            tcp.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                tcp.bind(("0.0.0.0", port))
            except OSError as e:
                udp.close()
                tcp.close()
                if e.errno != errno.EADDRINUSE:
                    raise
                continue
            break
        else:
            raise RuntimeError("no port free for the sandboxes' DNS resolver, UDP and TCP alike")
        self._udp, _ = await loop.create_datagram_endpoint(lambda: _Datagrams(self), sock=udp)
        self._tcp = await asyncio.start_server(self._serve_tcp, sock=tcp, backlog=256)
        self.port = port
        return port

    async def close(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    def spawn(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def admit(self, peer: str) -> tuple[str, Egress] | None:
        """The sandbox behind `peer` and its rules, if it may have one more query in flight
        (then counted until done()). Asked before anything of the query is read: a stranger,
        or a sandbox flooding its resolver, costs next to nothing."""
        policy = self.policy_of(peer)
        if policy is None or self._pending[policy[0]] >= MAX_PENDING_PER_SANDBOX:
            return None
        self._pending[policy[0]] += 1
        return policy

    def done(self, sandbox_id: str) -> None:
        self._pending[sandbox_id] -= 1
        if not self._pending[sandbox_id]:
            del self._pending[sandbox_id]

    async def answer(self, wire: bytes, sandbox_id: str, egress: Egress,
                     tcp: bool) -> bytes | None:  # fmt: skip
        """The reply to one query of the sandbox's, or None to send nothing (not a query)."""
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        if query.flags & dns.flags.QR:
            return None
        if query.opcode() != dns.opcode.QUERY or len(query.question) != 1:
            return _reply(query, dns.rcode.NOTIMP)
        question = query.question[0]
        name = question.name.to_text(omit_final_dot=True)
        # Labels are compared as text: one holding a dot (or anything but a hostname's
        # characters) could pass for a name below an allowed one.
        if not egress.resolves(name) or (egress.walled and not _plain(question.name)):
            log.debug("sandbox %s: DNS for %s refused by its rules", sandbox_id, name)
            return _reply(query, dns.rcode.NXDOMAIN)
        # The node's servers are the operator's own; ones a sandbox names are held to the
        # ranges a sandbox may reach.
        servers = ([s for s in egress.dns if reachable(s, self.opened)] if egress.dns
                   else self.nameservers)  # fmt: skip
        if not servers:
            log.warning("sandbox %s: none of its DNS servers (%s) may be asked: private "
                        "addresses need VIVARIUM_EGRESS_ALLOW", sandbox_id,
                        ", ".join(egress.dns or ()))  # fmt: skip
            return _reply(query, dns.rcode.REFUSED)
        if egress.walled:  # only the question leaves, not what else the sandbox put in
            asked = dns.message.make_query(question.name, question.rdtype, question.rdclass,
                                           use_edns=query.edns if query.edns >= 0 else False,
                                           payload=max(query.payload, 512))  # fmt: skip
            asked.id = query.id
            return await self._forward(asked, servers, tcp)
        return await self._forward(query, servers, tcp)

    async def _forward(self, query: dns.message.Message, servers: Sequence[str],
                       tcp: bool) -> bytes:  # fmt: skip
        for server in servers:
            try:
                if tcp:
                    response = await dns.asyncquery.tcp(query, server, UPSTREAM_TIMEOUT_S)
                else:
                    response = await dns.asyncquery.udp(
                        query, server, UPSTREAM_TIMEOUT_S, ignore_unexpected=True,
                        raise_on_truncation=False,
                    )  # fmt: skip
            except (dns.exception.DNSException, OSError) as e:
                log.debug("DNS server %s did not answer: %s", server, e)
                continue
            # Sized as the sandbox asked (its EDNS payload size, or 512): a longer answer is
            # sent empty with TC set, and the sandbox asks again over TCP.
            try:
                return response.to_wire(max_size=MAX_MESSAGE if tcp else max(query.payload, 512))
            except dns.exception.TooBig:
                cut = dns.message.make_response(query)
                cut.flags |= dns.flags.TC
                return cut.to_wire()
        return _reply(query, dns.rcode.SERVFAIL)

    async def _serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        policy = self.policy_of(writer.get_extra_info("peername")[0])
        if policy is None or self._tcp_open[policy[0]] >= MAX_TCP_PER_SANDBOX:
            writer.transport.abort()
            return
        sandbox_id = policy[0]
        self._tcp_open[sandbox_id] += 1
        try:
            while True:
                size = struct.unpack("!H", await asyncio.wait_for(reader.readexactly(2),
                                                                  TCP_IDLE_S))[0]  # fmt: skip
                wire = await asyncio.wait_for(reader.readexactly(size), TCP_IDLE_S)
                admitted = self.admit(writer.get_extra_info("peername")[0])
                if admitted is None:
                    break
                try:
                    reply = await self.answer(wire, sandbox_id, admitted[1], tcp=True)
                finally:
                    self.done(sandbox_id)
                if reply is None:
                    break
                writer.write(struct.pack("!H", len(reply)) + reply)
                await writer.drain()
        except (TimeoutError, asyncio.IncompleteReadError, OSError):
            pass
        finally:
            self._tcp_open[sandbox_id] -= 1
            if not self._tcp_open[sandbox_id]:
                del self._tcp_open[sandbox_id]
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


class _Datagrams(asyncio.DatagramProtocol):
    def __init__(self, resolver: EgressDNS) -> None:
        self.resolver = resolver
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        admitted = self.resolver.admit(addr[0])
        if admitted is not None:  # else dropped, unread: the client asks again later
            self.resolver.spawn(self._answer(data, addr, *admitted))

    async def _answer(self, data: bytes, addr: tuple[str, int], sandbox_id: str,
                      egress: Egress) -> None:  # fmt: skip
        try:
            reply = await self.resolver.answer(data, sandbox_id, egress, tcp=False)
        finally:
            self.resolver.done(sandbox_id)
        if reply is not None and self.transport is not None and not self.transport.is_closing():
            self.transport.sendto(reply, addr)


def _plain(name: dns.name.Name) -> bool:
    """Every label a hostname's (letters, digits, hyphens; underscores, as in SRV names)."""
    return all(_LABEL.fullmatch(label) for label in name.labels if label)


def _reply(query: dns.message.Message, rcode: dns.rcode.Rcode) -> bytes:
    response = dns.message.make_response(query)
    response.set_rcode(rcode)
    return response.to_wire()

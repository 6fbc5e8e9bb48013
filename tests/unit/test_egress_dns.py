"""The sandboxes' resolver on loopback (network/egress_dns.py): which names it answers for
whom, where it asks, and its guards. With real sandboxes, through the slot's redirect, it is
tested in compat/test_egress.py."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import dns.asyncquery
import dns.edns
import dns.exception
import dns.message
import dns.name
import dns.rcode
import dns.rrset
import pytest

from vivarium.network import egress_dns
from vivarium.network.egress import ALL_TRAFFIC, Egress
from vivarium.network.egress_dns import EgressDNS

UPSTREAM = "127.0.0.66"  # a DNS server of the test's own, on port 53 of a loopback address
ANSWER = "192.0.2.10"
ALLOW_LIST = Egress(allow=("pkg.example.test", "*.cdn.example.test"), deny=(ALL_TRAFFIC,))
OWN_SERVER = Egress(dns=(UPSTREAM,))  # open to the internet, naming its own DNS server
SANDBOXES = {"127.0.0.2": ("a", ALLOW_LIST), "127.0.0.3": ("b", Egress()),
             "127.0.0.4": ("c", OWN_SERVER)}  # fmt: skip


class _Upstream(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.asked: list[str] = []
        self.options: list[dns.edns.Option] = []  # EDNS options that reached it
        self.delay = 0.0

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: asyncio.DatagramTransport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        asyncio.get_running_loop().call_later(self.delay, self._answer, data, addr)

    def _answer(self, data: bytes, addr: tuple[str, int]) -> None:
        self.transport.sendto(self.response(data), addr)

    def response(self, data: bytes) -> bytes:
        query = dns.message.from_wire(data)
        self.options.extend(query.options)
        name = query.question[0].name
        self.asked.append(name.to_text(omit_final_dot=True))
        response = dns.message.make_response(query)
        response.answer.append(dns.rrset.from_text(name, 60, "IN", "A", ANSWER))
        return response.to_wire()

    async def serve_tcp(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        size = int.from_bytes(await reader.readexactly(2), "big")
        reply = self.response(await reader.readexactly(size))
        writer.write(len(reply).to_bytes(2, "big") + reply)
        await writer.drain()
        writer.close()


@asynccontextmanager
async def _resolver(opened: tuple[str, ...] = ()) -> AsyncIterator[tuple[EgressDNS, _Upstream]]:
    loop = asyncio.get_running_loop()
    transport, upstream = await loop.create_datagram_endpoint(
        _Upstream, local_addr=(UPSTREAM, 53), reuse_port=True
    )
    tcp = await asyncio.start_server(upstream.serve_tcp, UPSTREAM, 53, reuse_address=True)
    resolver = EgressDNS(SANDBOXES.get, opened, nameservers=[UPSTREAM])
    await resolver.start()
    try:
        yield resolver, upstream
    finally:
        await resolver.close()
        transport.close()
        tcp.close()
        await tcp.wait_closed()


async def _ask(port: int, source: str, name: str | dns.name.Name, tcp: bool = False,
               query: dns.message.Message | None = None) -> dns.message.Message:  # fmt: skip
    query = query or dns.message.make_query(name, "A")
    if tcp:
        return await dns.asyncquery.tcp(query, "127.0.0.1", 2.0, port=port, source=source)
    return await dns.asyncquery.udp(query, "127.0.0.1", 2.0, port=port, source=source)


def test_an_allow_list_gets_its_names_answered_and_no_other_name_leaves() -> None:
    async def scenario() -> None:
        async with _resolver() as (resolver, upstream):
            for name, tcp in (("pkg.example.test", False), ("a.cdn.example.test", True)):
                answer = await _ask(resolver.port, "127.0.0.2", name, tcp)
                assert answer.rcode() == dns.rcode.NOERROR
                assert answer.answer[0][0].to_text() == ANSWER
            refused = await _ask(resolver.port, "127.0.0.2", "secret-data.attacker.example")
            assert refused.rcode() == dns.rcode.NXDOMAIN and not refused.answer
            # A label holding a dot reads as a name below the wildcard, but is not one.
            dotted = dns.name.Name([b"data", b"x.cdn", b"example", b"test", b""])
            assert dotted.to_text().endswith(".cdn.example.test.")
            assert (await _ask(resolver.port, "127.0.0.2", dotted)).rcode() == dns.rcode.NXDOMAIN
            # Only the question leaves: not options the sandbox added to it.
            carrier = dns.message.make_query("pkg.example.test", "A", use_edns=0, options=[
                dns.edns.GenericOption(65001, b"payload")])  # fmt: skip
            sent = await _ask(resolver.port, "127.0.0.2", "", query=carrier)
            assert sent.rcode() == dns.rcode.NOERROR and upstream.options == []
            assert upstream.asked == ["pkg.example.test", "a.cdn.example.test",
                                      "pkg.example.test"]  # never the others  # fmt: skip
            # A sandbox without an allow-list gets every name.
            open_answer = await _ask(resolver.port, "127.0.0.3", "anything.example")
            assert open_answer.answer[0][0].to_text() == ANSWER
            # No sandbox has this address: no answer at all.
            with pytest.raises(dns.exception.Timeout):
                await _ask(resolver.port, "127.0.0.9", "pkg.example.test")

    asyncio.run(scenario())


def test_a_sandboxs_own_dns_servers_are_asked_only_in_ranges_it_may_reach() -> None:
    async def scenario() -> None:
        async with _resolver() as (resolver, upstream):  # 127/8 is closed to sandboxes
            answer = await _ask(resolver.port, "127.0.0.4", "x.example")
            assert answer.rcode() == dns.rcode.REFUSED and upstream.asked == []
        async with _resolver(opened=("127.0.0.66/32",)) as (resolver, upstream):
            answer = await _ask(resolver.port, "127.0.0.4", "x.example")
            assert answer.answer[0][0].to_text() == ANSWER and upstream.asked == ["x.example"]

    asyncio.run(scenario())


def test_one_sandbox_flooding_its_resolver_has_the_rest_dropped_and_others_are_answered(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(egress_dns, "MAX_PENDING_PER_SANDBOX", 2)

    async def scenario() -> None:
        async with _resolver() as (resolver, upstream):
            upstream.delay = 0.5  # queries stay in flight
            flood = [_ask(resolver.port, "127.0.0.3", f"n{i}.example") for i in range(4)]
            other = _ask(resolver.port, "127.0.0.2", "pkg.example.test")
            *answers, others = await asyncio.gather(*flood, other, return_exceptions=True)
            assert sum(isinstance(a, dns.message.Message) for a in answers) == 2
            assert sum(isinstance(a, dns.exception.Timeout) for a in answers) == 2  # dropped
            assert isinstance(others, dns.message.Message)
            assert others.rcode() == dns.rcode.NOERROR

    asyncio.run(scenario())

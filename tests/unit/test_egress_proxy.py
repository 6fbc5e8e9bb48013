"""The egress proxy's own guards, on loopback: who it serves, and how many connections each
sandbox may hold through it (network/egress_proxy.py). What it lets through and where it
connects is tested with real sandboxes in compat/test_egress.py."""

from __future__ import annotations

import asyncio

import pytest

from vivarium.network import egress_proxy
from vivarium.network.egress import ALL_TRAFFIC, Egress
from vivarium.network.egress_proxy import EgressProxy

RULES = Egress(allow=("pkg.example.test",), deny=(ALL_TRAFFIC,))
SANDBOXES = {"127.0.0.2": ("a", RULES), "127.0.0.3": ("b", RULES)}


async def _open(port: int, source: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))


async def _was_reset(reader: asyncio.StreamReader) -> bool:
    """Whether the proxy ended the connection (rather than waiting for it to say where)."""
    try:
        return await asyncio.wait_for(reader.read(1), 1.0) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_one_sandbox_flooding_the_proxy_is_refused_more_and_others_are_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(egress_proxy, "MAX_PER_SANDBOX", 2)

    async def scenario() -> None:
        proxy = EgressProxy(SANDBOXES.get, opened=())
        port, _ = await proxy.start()
        try:
            held = [await _open(port, "127.0.0.2") for _ in range(2)]  # a's share, waiting
            await asyncio.sleep(0.2)
            (extra, _), (other, _) = await _open(port, "127.0.0.2"), await _open(port, "127.0.0.3")
            assert await _was_reset(extra)  # a is at its limit
            assert not await _was_reset(other)  # b is not held back by a
            assert not any([await _was_reset(r) for r, _ in held])
            (stranger, _) = await _open(port, "127.0.0.9")  # no sandbox has that address
            assert await _was_reset(stranger)
        finally:
            await proxy.close()

    asyncio.run(scenario())


def test_a_name_the_rules_do_not_allow_is_reset_before_anything_leaves() -> None:
    async def scenario() -> None:
        proxy = EgressProxy(SANDBOXES.get, opened=(), nameservers=["127.0.0.1"])
        port, _ = await proxy.start()
        try:
            reader, writer = await _open(port, "127.0.0.2")
            writer.write(b"GET / HTTP/1.1\r\nHost: other.example.test\r\n\r\n")
            assert await _was_reset(reader)
        finally:
            await proxy.close()

    asyncio.run(scenario())

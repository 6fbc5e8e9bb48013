"""The node registry (api/nodes.py) on SQLite and PostgreSQL: registration, heartbeats, drain,
and the status a listing shows when the heartbeat stops."""

from __future__ import annotations

import asyncio
import time

import pytest
from sqlalchemy import update
from sqlalchemy.ext.asyncio import AsyncEngine

from vivarium.api import nodes
from vivarium.api.db.schema import nodes as nodes_table
from vivarium.cluster import moves
from vivarium.errors import ConfigError, InvalidArgument, NodeUnavailable

pytestmark = pytest.mark.anyio
INFO = {"labels": {"zone": "a"}, "cpu_count": 2, "memory_mb": 24000, "max_sandboxes": 200,
        "runsc_version": "0.0~20240729.0", "platform": "systrap"}  # fmt: skip


async def test_a_node_registers_heartbeats_and_is_listed(engine: AsyncEngine) -> None:
    row = await nodes.register(engine, "n1", "unix:/run/n1.sock", **INFO)
    assert row["state"] == "ready" and nodes.status(row) == "ready"
    assert row["labels"] == {"zone": "a"} and row["runsc_version"] == "0.0~20240729.0"
    beat = await nodes.heartbeat(engine, "n1", 3, 1.5, 1536)
    assert beat is not None
    assert (beat["sandboxes"], beat["allocated_cpus"], beat["allocated_memory_mb"]) == (
        3,
        1.5,
        1536,
    )
    assert beat["heartbeat_at"] >= row["heartbeat_at"]
    await nodes.register(engine, "n0", "unix:/run/n0.sock", **INFO)
    assert [r["id"] for r in await nodes.list_nodes(engine)] == ["n0", "n1"]
    assert await nodes.heartbeat(engine, "nobody", 0, 0.0, 0) is None


async def test_a_drained_node_stays_drained_across_a_restart(engine: AsyncEngine) -> None:
    await nodes.register(engine, "n1", "unix:/run/n1.sock", **INFO)
    drained = await nodes.set_state(engine, "n1", "draining")
    assert drained is not None and nodes.status(drained) == "draining"
    with pytest.raises(NodeUnavailable, match="undrain"):
        nodes.check_placeable(drained, "n1")
    again = await nodes.register(engine, "n1", "unix:/run/n1.sock", **{**INFO, "cpu_count": 4})
    assert again["state"] == "draining" and again["cpu_count"] == 4
    ready = await nodes.set_state(engine, "n1", "ready")
    assert ready is not None
    nodes.check_placeable(ready, "n1")  # no error


async def test_bad_states_and_unknown_nodes(engine: AsyncEngine) -> None:
    with pytest.raises(InvalidArgument):
        await nodes.set_state(engine, "n1", "gone")
    assert await nodes.set_state(engine, "nobody", "draining") is None
    with pytest.raises(NodeUnavailable, match="not registered"):
        nodes.check_placeable(await nodes.get(engine, "nobody"), "nobody")


async def test_a_node_whose_heartbeat_stopped_is_unhealthy(engine: AsyncEngine) -> None:
    await nodes.register(engine, "n1", "unix:/run/n1.sock", **INFO)
    stale = time.time() - nodes.HEARTBEAT_TIMEOUT_S - 1
    async with engine.begin() as conn:
        await conn.execute(update(nodes_table).values(heartbeat_at=stale))
    row = await nodes.get(engine, "n1")
    assert row is not None and nodes.status(row) == "unhealthy"
    with pytest.raises(NodeUnavailable, match="heartbeat"):
        nodes.check_placeable(row, "n1")
    assert nodes.status(row, now=stale) == "ready"  # as seen at its last heartbeat


async def test_an_id_a_live_node_holds_elsewhere_and_another_secret_are_refused(
    engine: AsyncEngine,
) -> None:
    await nodes.register(engine, "n1", "http://10.0.0.1:3000", secret_check="s1", **INFO)
    with pytest.raises(ConfigError, match="node id 'n1' is taken by a running node at "
                       "http://10.0.0.1:3000"):  # fmt: skip
        await nodes.register(engine, "n1", "http://10.0.0.2:3000", secret_check="s1", **INFO)
    with pytest.raises(ConfigError, match="cluster secret differs from node 'n1'"):
        await nodes.register(engine, "n2", "http://10.0.0.2:3000", secret_check="s2", **INFO)
    # The same node restarting (same address), and a new one with the same secret: welcome.
    await nodes.register(engine, "n1", "http://10.0.0.1:3000", secret_check="s1", **INFO)
    await nodes.register(engine, "n2", "http://10.0.0.2:3000", secret_check="s1", **INFO)
    # Once the holder's heartbeat is older than the timeout, its id may move (a replaced host).
    async with engine.begin() as conn:
        await conn.execute(update(nodes_table).where(nodes_table.c.id == "n1").values(
            heartbeat_at=time.time() - nodes.HEARTBEAT_TIMEOUT_S - 1))  # fmt: skip
    moved = await nodes.register(engine, "n1", "http://10.0.0.3:3000", secret_check="s1", **INFO)
    assert moved["address"] == "http://10.0.0.3:3000"


def test_a_node_may_not_advertise_more_sandboxes_than_its_memory_holds() -> None:
    nodes.check_capacity(128, 24000)  # no error
    with pytest.raises(ConfigError, match="VIVARIUM_MAX_SANDBOXES=10000 is more than this host"):
        nodes.check_capacity(10000, 24000)


async def test_a_moved_sandbox_is_announced_to_listeners(engine: AsyncEngine) -> None:
    if engine.dialect.name != "postgresql":
        await moves.announce(engine, "isandbox")  # one host: nobody to tell, no error
        return
    heard: list[str] = []
    connected = asyncio.Event()
    listening = asyncio.create_task(moves.listen(engine, heard.append, connected.set))
    try:
        await asyncio.wait_for(connected.wait(), 30)
        await moves.announce(engine, "isandbox")
        async with asyncio.timeout(30):
            while not heard:
                await asyncio.sleep(0.05)
        assert heard == ["isandbox"]
    finally:
        listening.cancel()
        await asyncio.gather(listening, return_exceptions=True)

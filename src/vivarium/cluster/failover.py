"""What the cluster does when a node is lost (its heartbeat stopped: killed, crashed, or its
host gone). Every API replica watches; the catalog's row locks make one of them act.

- Its sandboxes that ran, started or were being paused have ended with it: marked killed with
  the reason, each with a lifecycle event (and webhook), as E2B reports a lost sandbox.
- Its paused sandboxes stay paused: their snapshots are in the shared store (each node keeps
  its part, `Settings.node_snapshot_url`), and the router places a resume of one on another
  node (router.py), which fetches it from the lost node's part.
- If it comes back, it gives up what the catalog gave up (ControlPlane.reconcile_node).
"""

from __future__ import annotations

import asyncio
import logging
import time

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncEngine

from vivarium.api import nodes
from vivarium.api.db.schema import nodes as nodes_table
from vivarium.api.db.schema import sandboxes, snapshots
from vivarium.api.events import EventLog, ended_type
from vivarium.api.store import LIVE, Row
from vivarium.cluster.directory import Directory
from vivarium.errors import CatalogUnavailable

log = logging.getLogger(__name__)


def lost_reason(node_id: str) -> str:
    return (f"node {node_id} was lost (no heartbeat for {nodes.HEARTBEAT_TIMEOUT_S:.0f} s): "
            "its running sandboxes ended with it")  # fmt: skip


async def end_lost_node(engine: AsyncEngine, node_id: str, reason: str) -> list[Row]:
    """If the node's heartbeat is still HEARTBEAT_TIMEOUT_S old by the catalog's clock (in
    this transaction, with the node's row locked: a heartbeat that came meanwhile wins), end
    what it ran, started or was pausing; the rows ended (as they were). A sandbox that was
    being resumed from a snapshot goes back to paused, on the node whose store holds it."""
    async with engine.begin() as conn:
        found = (await conn.execute(
            select(nodes_table.c.heartbeat_at, nodes.catalog_now(conn))
            .where(nodes_table.c.id == node_id).with_for_update()
        )).first()  # fmt: skip
        if found is None or found[0] > found[1] - nodes.HEARTBEAT_TIMEOUT_S:
            return []
        live = sandboxes.c.node_id == node_id, sandboxes.c.state.in_([*LIVE, "pausing"])
        rows = [dict(r) for r in (await conn.execute(
            select(sandboxes, snapshots.c.node_id.label("snapshot_node"))
            .outerjoin(snapshots, snapshots.c.sandbox_id == sandboxes.c.id)
            .where(*live).with_for_update(of=sandboxes)
        )).mappings()]  # fmt: skip
        ended = []
        for row in rows:
            if row["state"] == "starting" and row["snapshot_node"] is not None:
                await conn.execute(update(sandboxes).where(sandboxes.c.id == row["id"]).values(
                    state="paused", node_id=row["snapshot_node"]))  # fmt: skip
                continue
            await conn.execute(update(sandboxes).where(sandboxes.c.id == row["id"]).values(
                state="killed", ended_at=time.time(), end_reason=reason))  # fmt: skip
            ended.append(row)
    return ended


class NodeWatch:
    def __init__(self, directory: Directory, events: EventLog) -> None:
        self.directory = directory
        self.events = events
        self._task: asyncio.Task[None] | None = None
        # Since when this replica has reached the catalog without a break: after an outage,
        # every heartbeat is old, and nodes get HEARTBEAT_TIMEOUT_S to send one before any is
        # taken for lost.
        self._reached_since: float | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._watch())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(nodes.HEARTBEAT_S)
            try:
                await self.sweep()
            except CatalogUnavailable as exc:
                self._reached_since = None
                log.warning("could not look for lost nodes: %s", exc)
            except Exception:
                self._reached_since = None
                log.exception("looking for lost nodes failed")

    async def sweep(self) -> int:
        """End the live sandboxes of every node whose heartbeat stopped; how many ended."""
        engine = self.directory.engine
        now = await nodes.catalog_time(engine)
        if self._reached_since is None:
            self._reached_since = time.monotonic()
        if time.monotonic() - self._reached_since < nodes.HEARTBEAT_TIMEOUT_S:
            return 0
        ended = 0
        for node in await nodes.list_nodes(engine):
            if nodes.status(node, now) != "unhealthy":
                continue
            reason = lost_reason(node["id"])
            for row in await end_lost_node(engine, node["id"], reason):
                ended += 1
                log.warning("sandbox %s ended: %s", row["id"], reason)
                await self.events.record(row["team_id"], row["id"], ended_type(reason), "node",
                                         reason)  # fmt: skip
        return ended

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

from vivarium.api import nodes, store
from vivarium.api.events import EventLog, ended_type
from vivarium.cluster.directory import Directory
from vivarium.errors import CatalogUnavailable

log = logging.getLogger(__name__)


def lost_reason(node_id: str) -> str:
    return (f"node {node_id} was lost (no heartbeat for {nodes.HEARTBEAT_TIMEOUT_S:.0f} s): "
            "its running sandboxes ended with it")  # fmt: skip


class NodeWatch:
    def __init__(self, directory: Directory, events: EventLog) -> None:
        self.directory = directory
        self.events = events
        self._task: asyncio.Task[None] | None = None

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
                log.warning("could not look for lost nodes: %s", exc)
            except Exception:
                log.exception("looking for lost nodes failed")

    async def sweep(self) -> int:
        """End the live sandboxes of every node whose heartbeat stopped; how many ended."""
        now = time.time()
        ended = 0
        for node in await nodes.list_nodes(self.directory.engine):
            if nodes.status(node, now) != "unhealthy":
                continue
            reason = lost_reason(node["id"])
            for row in await store.end_node_sandboxes(self.directory.engine, node["id"], reason):
                ended += 1
                log.warning("sandbox %s ended: %s", row["id"], reason)
                await self.events.record(row["team_id"], row["id"], ended_type(reason), "node",
                                         reason)  # fmt: skip
        return ended

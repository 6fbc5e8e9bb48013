"""What the cluster's front (API replicas and the proxy) reads from the catalog: which nodes
there are, which node holds a sandbox, snapshot, template or volume, and how loaded each node
is. Node rows are kept for a second: placement and routing read them on every request."""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncEngine

from vivarium.api import nodes
from vivarium.api.db.schema import sandboxes, team_snapshots, team_templates, volumes
from vivarium.api.store import Row

NODES_TTL_S = 1.0
# Where each kind of object a request may name is kept, and by which node.
OWNERS = {"sandbox": sandboxes, "snapshot": team_snapshots, "template": team_templates,
          "volume": volumes}  # fmt: skip


@dataclass
class Load:
    """What runs, or is starting, on one node (from the sandbox rows)."""

    sandboxes: int = 0
    starting: int = 0
    cpus: float = 0.0
    memory_mb: int = 0


class Directory:
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine
        self._nodes: list[Row] = []
        self._nodes_at = 0.0
        self._skew = 0.0  # the catalog's clock minus this host's: heartbeats are in the former

    async def nodes(self) -> list[Row]:
        """Every registered node (a second old at most)."""
        if time.monotonic() - self._nodes_at > NODES_TTL_S:
            self._nodes = await nodes.list_nodes(self.engine)
            self._skew = await nodes.catalog_time(self.engine) - time.time()
            self._nodes_at = time.monotonic()
        return self._nodes

    async def node(self, node_id: str) -> Row | None:
        return next((r for r in await self.nodes() if r["id"] == node_id), None)

    async def status(self, node_id: str) -> str | None:
        """ready, draining or unhealthy by the catalog's clock (None: no such node)."""
        node = await self.node(node_id)
        return nodes.status(node, time.time() + self._skew) if node is not None else None

    async def ready(self) -> list[Row]:
        """Nodes that take new sandboxes, in id order."""
        rows = await self.nodes()
        now = time.time() + self._skew
        return [r for r in rows if nodes.status(r, now) == "ready"]

    async def stand_in(self, sandbox_id: str) -> Row | None:
        """The ready node that answers for a sandbox whose own node is lost (rendezvous
        hashing: the same one from every replica and the proxy while the ready nodes stay the
        same), so that a kill, a resume and traffic that wakes it meet in one place."""
        ready = await self.ready()
        if not ready:
            return None
        return max(ready, key=lambda n: hashlib.sha256(f"{n['id']}/{sandbox_id}".encode()).digest())

    async def alike(self, node_id: str) -> frozenset[str] | None:
        """The nodes whose runsc release and platform are `node_id`'s: those that restore what
        it built (a checkpoint restores under no other). None if `node_id` is unknown."""
        rows = await self.nodes()
        made = next((r for r in rows if r["id"] == node_id), None)
        if made is None:
            return None
        return frozenset(r["id"] for r in rows if (r["runsc_version"], r["platform"])
                         == (made["runsc_version"], made["platform"]))  # fmt: skip

    def forget_nodes(self) -> None:
        """Read the node rows again next time (a node did not answer)."""
        self._nodes_at = 0.0

    async def owner(self, kind: str, object_id: str) -> str | None:
        """The node that holds the sandbox, snapshot, template or volume `object_id`."""
        table = OWNERS[kind]
        async with self.engine.connect() as conn:
            return (await conn.execute(
                select(table.c.node_id).where(table.c.id == object_id)
            )).scalar_one_or_none()  # fmt: skip

    async def sandbox_home(self, sandbox_id: str) -> tuple[str, str] | None:
        """(its node, its state), if the sandbox exists."""
        async with self.engine.connect() as conn:
            row = (await conn.execute(
                select(sandboxes.c.node_id, sandboxes.c.state).where(sandboxes.c.id == sandbox_id)
            )).first()  # fmt: skip
        return (str(row[0]), str(row[1])) if row is not None else None

    async def loads(self) -> dict[str, Load]:
        """Each node's live sandboxes by the catalog: what placement scores."""
        query = (
            select(sandboxes.c.node_id, sandboxes.c.state, func.count(),
                   func.sum(sandboxes.c.cpu_count), func.sum(sandboxes.c.memory_mb))
            .where(sandboxes.c.state.in_(("starting", "running", "pausing")))
            .group_by(sandboxes.c.node_id, sandboxes.c.state)
        )  # fmt: skip
        loads: dict[str, Load] = {}
        async with self.engine.connect() as conn:
            for node_id, state, count, cpus, memory_mb in await conn.execute(query):
                load = loads.setdefault(node_id, Load())
                load.sandboxes += int(count)
                load.starting += int(count) if state == "starting" else 0
                load.cpus += float(cpus or 0)
                load.memory_mb += int(memory_mb or 0)
        return loads

"""The node registry in the catalog: every node agent registers when it starts and heartbeats
while it runs; the operator drains and undrains nodes (`vivarium node`).

A node's `state` is the operator's: `ready` takes new sandboxes, `draining` keeps the ones it
has and takes no more. Its `status`, what listings show, is the state unless the heartbeat
stopped: then `unhealthy`, whatever the state. A node that registers again (a restart) keeps
the state the operator gave it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Coroutine
from typing import Any

from sqlalchemy import ColumnElement, Float, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from vivarium.api.db.schema import nodes
from vivarium.api.store import Row, first_row
from vivarium.errors import CatalogUnavailable, ConfigError, InvalidArgument, NodeUnavailable
from vivarium.node.node import Node

log = logging.getLogger(__name__)

HEARTBEAT_S = 5.0
HEARTBEAT_TIMEOUT_S = 30.0  # six missed heartbeats: the node is taken for gone
STATES = ("ready", "draining")
MIN_SANDBOX_MB = 64  # an idle `base` sandbox takes ~45 MiB (docs/benchmarks.md)


def catalog_now(conn: AsyncConnection) -> ColumnElement[float]:
    """The catalog server's clock, in seconds since the epoch. Heartbeats are stamped with it
    and aged by it: the hosts' own clocks may disagree by more than the heartbeat timeout."""
    if conn.dialect.name == "postgresql":
        return func.extract("epoch", func.now()).cast(Float)
    return ((func.julianday("now") - 2440587.5) * 86400.0).cast(Float)


async def catalog_time(engine: AsyncEngine) -> float:
    async with engine.connect() as conn:
        return float((await conn.execute(select(catalog_now(conn)))).scalar_one())


def status(row: Row, now: float | None = None) -> str:
    """ready, draining or unhealthy (its heartbeat is older than HEARTBEAT_TIMEOUT_S)."""
    now = time.time() if now is None else now
    if now - row["heartbeat_at"] > HEARTBEAT_TIMEOUT_S:
        return "unhealthy"
    return str(row["state"])


async def register(engine: AsyncEngine, node_id: str, address: str, **info: Any) -> Row:
    """Record a node that starts (`info`: proxy_address, secret_check, labels, cpu_count,
    memory_mb, max_sandboxes, runsc_version, platform); a known one keeps its state. Refused
    (ConfigError) while another live node holds the id, or when live nodes have another
    cluster secret."""
    async with engine.begin() as conn:
        now = float((await conn.execute(select(catalog_now(conn)))).scalar_one())
        values = {"address": address, "started_at": now, "heartbeat_at": now, "sandboxes": 0,
                  "allocated_cpus": 0.0, "allocated_memory_mb": 0, **info}  # fmt: skip
        live = [dict(r) for r in (await conn.execute(
            select(nodes).where(nodes.c.heartbeat_at > now - HEARTBEAT_TIMEOUT_S).with_for_update()
        )).mappings()]  # fmt: skip
        _check_joining(node_id, address, str(info.get("secret_check", "")), live, now)
        known = first_row(await conn.execute(select(nodes.c.id).where(nodes.c.id == node_id)))
        if known is None:
            await conn.execute(insert(nodes).values(id=node_id, state="ready", **values))
        else:
            await conn.execute(update(nodes).where(nodes.c.id == node_id).values(**values))
        row = first_row(await conn.execute(select(nodes).where(nodes.c.id == node_id)))
    assert row is not None
    return row


def _check_joining(node_id: str, address: str, secret_check: str, live: list[Row],
                   now: float) -> None:  # fmt: skip
    for row in live:
        if row["id"] == node_id and row["address"] != address:
            raise ConfigError(
                f"node id {node_id!r} is taken by a running node at {row['address']} (its "
                f"last heartbeat {now - row['heartbeat_at']:.0f} s ago)",
                "give this node its own VIVARIUM_NODE_ID, or stop the other one first",
            )
        if row["id"] != node_id and row["secret_check"] != secret_check:
            raise ConfigError(
                f"this node's cluster secret differs from node {row['id']!r}'s",
                "set the same VIVARIUM_CLUSTER_SECRET on every part of the cluster",
            )


async def heartbeat(engine: AsyncEngine, node_id: str, sandboxes: int, allocated_cpus: float,
                    allocated_memory_mb: int) -> Row | None:  # fmt: skip
    """The node is alive and runs this much; its row (None if it was never registered)."""
    async with engine.begin() as conn:
        await conn.execute(
            update(nodes).where(nodes.c.id == node_id).values(
                heartbeat_at=catalog_now(conn), sandboxes=sandboxes, allocated_cpus=allocated_cpus,
                allocated_memory_mb=allocated_memory_mb,
            )
        )  # fmt: skip
        return first_row(await conn.execute(select(nodes).where(nodes.c.id == node_id)))


async def get(engine: AsyncEngine, node_id: str) -> Row | None:
    async with engine.connect() as conn:
        return first_row(await conn.execute(select(nodes).where(nodes.c.id == node_id)))


async def list_nodes(engine: AsyncEngine) -> list[Row]:
    async with engine.connect() as conn:
        result = await conn.execute(select(nodes).order_by(nodes.c.id))
        return [dict(r) for r in result.mappings()]


async def set_state(engine: AsyncEngine, node_id: str, state: str) -> Row | None:
    """Drain (`draining`) or undrain (`ready`) a node; None if there is no such node."""
    if state not in STATES:
        raise InvalidArgument(f"state must be one of {', '.join(STATES)}")
    async with engine.begin() as conn:
        await conn.execute(update(nodes).where(nodes.c.id == node_id).values(state=state))
        return first_row(await conn.execute(select(nodes).where(nodes.c.id == node_id)))


def check_capacity(max_sandboxes: int, memory_mb: int) -> None:
    """Refuse to advertise more sandboxes than the host's memory holds even idle: placement
    would keep sending creates to a node that can only fail them."""
    most = memory_mb // MIN_SANDBOX_MB
    if max_sandboxes > most:
        raise ConfigError(
            f"VIVARIUM_MAX_SANDBOXES={max_sandboxes} is more than this host can run: "
            f"{memory_mb} MiB of memory holds about {most} idle sandboxes of {MIN_SANDBOX_MB} MiB",
            f"set VIVARIUM_MAX_SANDBOXES to {most} or less",
        )


def check_placeable(row: Row | None, node_id: str, at: float | None = None) -> None:
    """Refuse a new sandbox on a node that is not ready (its status `at` that time, in the
    catalog's clock), saying what to do."""
    if row is None:
        raise NodeUnavailable(f"node {node_id!r} is not registered", "restart `vivarium serve`")
    now = status(row, at)
    if now == "draining":
        raise NodeUnavailable(f"node {node_id!r} is draining: it takes no new sandboxes",
                           f"undrain it (`vivarium node undrain {node_id}`)")  # fmt: skip
    if now == "unhealthy":
        raise NodeUnavailable(f"node {node_id!r} has not sent a heartbeat for "
                           f"{HEARTBEAT_TIMEOUT_S:.0f} s", "check the node's log")  # fmt: skip


class Membership:
    """This process's node in the registry: registered at start, then a heartbeat every
    HEARTBEAT_S with what it runs. `node` is the in-process node (the all-in-one default).
    Its row is kept from the registration, each heartbeat and each drain made here, so that a
    create checks it without a query; a drain made elsewhere counts from the next heartbeat."""

    def __init__(self, engine: AsyncEngine, node: Node, node_id: str, address: str,
                 labels: dict[str, str], proxy_address: str = "",
                 secret_check: str = "") -> None:  # fmt: skip
        self.engine = engine
        self.node = node
        self.node_id = node_id
        self.address = address
        self.labels = labels
        self.proxy_address = proxy_address
        self.secret_check = secret_check
        self.row: Row | None = None
        self._row_read = time.monotonic()  # when `row`'s heartbeat was written
        self._on_rejoin: Callable[[], Coroutine[Any, Any, None]] | None = None
        self._rejoining: set[asyncio.Task[None]] = set()
        self._beating: asyncio.Task[None] | None = None

    async def start(self, on_rejoin: Callable[[], Coroutine[Any, Any, None]] | None = None,
                    clustered: bool = False) -> None:  # fmt: skip
        """Register, then heartbeat; `on_rejoin` runs (beside the heartbeats) after a heartbeat
        that came after the others took this node for lost (it was cut off that long). A
        cluster's node may not advertise more sandboxes than its memory holds."""
        self._on_rejoin = on_rejoin
        info = self.node.info()
        memory_mb = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") >> 20
        if clustered:
            check_capacity(int(info["max_sandboxes"]), memory_mb)
        row = await register(
            self.engine, self.node_id, self.address, labels=self.labels,
            proxy_address=self.proxy_address, secret_check=self.secret_check,
            cpu_count=os.cpu_count() or 1, memory_mb=memory_mb,
            max_sandboxes=info["max_sandboxes"], runsc_version=info["runsc_version"],
            platform=info["platform"],
        )  # fmt: skip
        self._keep(row)
        self._beating = asyncio.get_running_loop().create_task(self._beat())

    async def stop(self) -> None:
        tasks = [*self._rejoining, *([self._beating] if self._beating else [])]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def check_placeable(self) -> None:
        """Refuse a new sandbox here unless this node is ready (NodeUnavailable). The row kept
        says so without a query; only a refusal reads it again, since an undrain made through
        another API would otherwise count from the next heartbeat."""
        try:
            check_placeable(self.row, self.node_id, self._now())
        except NodeUnavailable:
            if (fresh := await get(self.engine, self.node_id)) is not None:
                self._keep(fresh)
            check_placeable(self.row, self.node_id, self._now())

    def _now(self) -> float | None:
        """The catalog's time now, from this host's clock's count since the row was read."""
        if self.row is None:
            return None
        return float(self.row["heartbeat_at"]) + time.monotonic() - self._row_read

    def seen(self, row: Row) -> None:
        """A newer row of some node (a drain through this API): kept if it is this one."""
        if row["id"] == self.node_id:
            self._keep(row)

    def _keep(self, row: Row) -> None:
        if self.row is None or row["heartbeat_at"] != self.row["heartbeat_at"]:
            self._row_read = time.monotonic()  # a heartbeat written just now
        self.row = row

    async def _beat(self) -> None:
        last = time.time()
        while True:
            await asyncio.sleep(HEARTBEAT_S)
            running = list(self.node.sandboxes.values())
            try:
                row = await heartbeat(self.engine, self.node_id, len(running),
                                      sum(r.cpus for r in running),
                                      sum(r.memory_mb for r in running))  # fmt: skip
                if row is not None:
                    self._keep(row)
                if time.time() - last > HEARTBEAT_TIMEOUT_S and self._on_rejoin is not None:
                    log.warning("node %s is back after %.0f s without a heartbeat",
                                self.node_id, time.time() - last)  # fmt: skip
                    # Beside the heartbeats: a long one must not make the node lost again.
                    rejoin = asyncio.get_running_loop().create_task(self._on_rejoin())
                    self._rejoining.add(rejoin)
                    rejoin.add_done_callback(self._rejoining.discard)
                last = time.time()
            except CatalogUnavailable as exc:  # for a while: the next beat retries
                log.warning("could not send node %s's heartbeat: %s", self.node_id, exc)
            except Exception:
                log.exception("could not send node %s's heartbeat", self.node_id)

"""The control plane: E2B's sandbox lifecycle on top of the catalog (SQL) and the node.

It owns teams, keys, the sandbox catalog and the lifecycle rules (limits, timeouts, who may see
what); the node owns the containers. Today the node runs in the same process; everything here
goes through `self.node`'s methods so that a remote node can take its place.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections import defaultdict
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any, TypeVar

from sqlalchemy.ext.asyncio import AsyncEngine

from vivarium.api import keys, nodes, store
from vivarium.api.db.engine import migrate, open_engine, startup_lock
from vivarium.api.events import EventLog, actor, ended_type
from vivarium.api.templates import TemplateCatalog
from vivarium.api.volumes import VolumeCatalog
from vivarium.cluster import moves, secret
from vivarium.cluster.directory import Directory
from vivarium.config import Settings
from vivarium.errors import (
    CapacityExhausted,
    Conflict,
    InvalidArgument,
    NotFound,
    RuntimeFailure,
    VivariumError,
)
from vivarium.guest.envd import ENVD_VERSION
from vivarium.network.egress import Egress
from vivarium.node.node import Node
from vivarium.node.records import SandboxRecord, new_sandbox_id
from vivarium.node.request import CreateRequest
from vivarium.node.snapshots import Snapshot, new_fork_key, new_snapshot_id
from vivarium.node.volumes import VolumeMount
from vivarium.statedir import write_private
from vivarium.telemetry import timed_operation
from vivarium.templates.recipe import RECIPES
from vivarium.templates.store import Template, validate_name

log = logging.getLogger(__name__)

Row = dict[str, Any]
DISK_MB = 0  # the root filesystem lives in the sandbox's memory (overlay), not on a disk
MIN_REFRESH_S = 15
T = TypeVar("T")
MAX_FORKS = 20  # children of one fork, as E2B's client allows
KEYED_CREATE_WAIT_S = 120.0  # a create with a key in use waits this long for the first one


@dataclass(frozen=True)
class NewSandbox:
    """A validated create request (E2B's NewSandbox / NewSandboxV2)."""

    template: str
    timeout_s: int
    metadata: dict[str, str] = field(default_factory=dict)
    env_vars: dict[str, str] = field(default_factory=dict)
    auto_pause: bool = False
    auto_resume: bool = False
    egress: Egress = Egress()  # allow_internet_access and network's rules
    secure: bool = True
    public_traffic: bool = True  # False: its ports need its traffic token
    volume_mounts: tuple[tuple[str, str], ...] = ()  # (volume name, path), as asked
    auto_pause_memory: bool = True  # False: an auto-pause keeps the files only
    idempotency_key: str | None = None  # a retried create with it gets the same sandbox


@dataclass(frozen=True)
class Sizes:
    """What a sandbox gets, as E2B counts it: a team template's (`cpuCount`, `memoryMB` of its
    build), a fork's parent's, else the node's defaults."""

    cpu_count: int
    memory_mb: int


class ControlPlane:
    def __init__(self, settings: Settings, node: Node) -> None:
        self.settings = settings
        self.node = node
        self.node_id = settings.node_id
        self.engine: AsyncEngine = open_engine(settings.db_url)
        self.seed = b""
        self._team_locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        # Pause, resume and kill of one sandbox happen one at a time.
        self._sandbox_locks: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        # Two snapshots taken under one new name at once would both make it.
        self._snapshot_names: defaultdict[tuple[str, str], asyncio.Lock] = defaultdict(asyncio.Lock)
        self._tasks: set[asyncio.Task[None]] = set()
        self._periodic: list[asyncio.Task[None]] = []  # retention, the cluster sweep
        self.volumes = VolumeCatalog(self)
        self.templates = TemplateCatalog(self)
        self.events = EventLog(self.engine, settings.webhook_url, settings.webhook_secret)
        self.directory = Directory(self.engine)  # the cluster's nodes (lost ones' stand-ins)
        clustered = settings.role == "node"
        self.membership = nodes.Membership(
            self.engine, node, self.node_id,
            settings.advertised_node_url if clustered else f"unix:{settings.node_socket}",
            dict(settings.node_labels),
            proxy_address=settings.advertised_proxy_url if clustered else "",
            secret_check=secret.check_value(settings.cluster_secret) if clustered else "",
        )  # fmt: skip

    # -- start and stop ------------------------------------------------------------------------

    async def start(self) -> str | None:
        """Migrate, load the token seed, make the first team and key on a fresh database
        (returned, to be shown once), and reconcile the catalog with what the node runs."""
        if self.settings.role == "node":  # every node derives the same tokens
            self.seed = secret.token_seed(self.settings.cluster_secret)
        else:
            self.seed = _load_or_make_secret(self.settings.secret_file)
        first_key = None
        async with startup_lock(self.engine):  # one first team, however many nodes start
            await migrate(self.engine)
            if await store.team_count(self.engine) == 0:
                limit = self.settings.team_max_sandboxes
                team = await store.create_team(self.engine, "default", limit, is_admin=True)
                first_key, _ = await store.create_key(self.engine, team["id"], "default")
                write_private(self.settings.admin_key_file, first_key + "\n")
        clustered = self.settings.role == "node"
        await self.membership.start(on_rejoin=self.give_up_abandoned if clustered else None,
                                    clustered=clustered)  # fmt: skip
        await self._reconcile()
        await self.volumes.reconcile()
        await self.templates.reconcile()
        self.events.start()
        await self._warm_up()
        self.node.on_ended = self._node_ended
        self.node.on_paused = self._node_paused
        loop = asyncio.get_running_loop()
        if self.settings.snapshot_max_age_s > 0:
            self._periodic.append(loop.create_task(self._expire_snapshots()))
        if self.settings.role == "node":
            self._periodic.append(loop.create_task(self._sweep_cluster()))
            self._background(self.templates.share_builds_here())
        return first_key

    async def _warm_up(self) -> None:
        """Run each query once before serving: SQLAlchemy compiles and caches statements on
        first use, tens of milliseconds of event-loop time a first burst of creates would pay."""
        ghost: Row = {"id": "", "max_sandboxes": 0}
        await store.team_for_key(self.engine, keys.new_key())
        await store.get_sandbox(self.engine, "")
        await store.team_sandboxes(self.engine, "", ["running"])
        await store.reserve_sandboxes(self.engine, ghost, [{}])  # refused: limit 0
        await store.update_sandbox(self.engine, "", state="running")
        await store.end_sandbox(self.engine, "", "warm-up")

    async def stop(self) -> None:
        for task in self._periodic:
            task.cancel()
        await asyncio.gather(*self._periodic, return_exceptions=True)
        self.node.on_ended = None
        self.node.on_paused = None
        await self.membership.stop()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.events.stop()
        await self.engine.dispose()

    async def _reconcile(self) -> None:
        """After a restart: catalog rows whose sandbox the node no longer runs have ended."""
        running = {r.sandbox_id for r in self.node.list_sandboxes()}
        for row in await store.node_sandboxes(self.engine, self.node_id,
                                              [*store.LIVE, "pausing"]):  # fmt: skip
            if row["id"] in running:
                if row["state"] != "running":  # a pause or resume cut short by the restart
                    await store.transition(self.engine, row["id"], [row["state"]], "running")
            elif row["state"] != "starting" and (
                snapshot := await asyncio.to_thread(self.node.snapshots.local, row["id"])
            ):  # a pause the restart cut short after its checkpoint (this start sealed it)
                await self._record_pause(row["id"], snapshot, "restart")
            elif await asyncio.to_thread(self.node.snapshots.exists, row["id"]):  # maybe S3
                await store.transition(self.engine, row["id"], [row["state"]], "paused")
            else:
                await store.end_sandbox(self.engine, row["id"], "not running after restart")
        if self.settings.role == "node":
            await self.give_up_abandoned()
        # A crash between sealing a team's snapshot and recording it leaves files nobody owns.
        wanted = await store.node_team_snapshot_builds(self.engine, self.node_id)
        for key in self.node.snapshots.team_snapshot_keys():
            if key not in wanted:
                log.info("removing snapshot %s: no team owns it", key)
                self.node.delete_snapshot(key)

    async def give_up_abandoned(self) -> None:
        """What this node holds that the cluster has given to others or given up: sandboxes
        it still runs that ended while it was lost, and snapshots of paused sandboxes that
        have since been resumed on another node (their copy here is stale)."""
        running = [r.sandbox_id for r in self.node.list_sandboxes()]
        rows = await store.get_sandboxes(self.engine, running)
        for sandbox_id in running:
            row = rows.get(sandbox_id)
            if row is None or (row["state"] != "killed" and row["node_id"] == self.node_id):
                continue  # a warm sandbox (no row yet), or still this node's
            log.warning("ending sandbox %s: the cluster gave it up (%s)", sandbox_id,
                        row["end_reason"] or f"now on node {row['node_id']}")  # fmt: skip
            with contextlib.suppress(NotFound):
                await self.node.kill(sandbox_id)
        paused = await asyncio.to_thread(self.node.snapshots.paused_keys)  # a directory walk
        for sandbox_id, row in (await store.get_sandboxes(self.engine, paused)).items():
            # Not while another node starts it: that node may be reading this node's copy.
            if row["node_id"] != self.node_id and row["state"] != "starting":
                log.info("dropping the snapshot of %s: it is node %s's now", sandbox_id,
                         row["node_id"])  # fmt: skip
                self.node.delete_snapshot(sandbox_id)

    async def _sweep_cluster(self) -> None:
        """A cluster's node: give_up_abandoned every cluster_sweep_s (a sandbox moves when
        its node drains or is lost), drop copies of templates deleted meanwhile, apply
        snapshot retention to lost nodes' paused sandboxes, store volumes that changed."""
        passes = ((self.give_up_abandoned, "comparing this node's sandboxes with the catalog"),
                  (self.templates.drop_deleted_copies, "dropping copies of deleted templates"),
                  (self._expire_lost_nodes_snapshots, "retention for lost nodes' snapshots"),
                  (self.volumes.sweep, "storing or dropping volumes"))  # fmt: skip
        while True:
            await asyncio.sleep(self.settings.cluster_sweep_s)
            for run, what in passes:  # each on its own: one failing stops none of the others
                try:
                    await run()
                except Exception:
                    log.exception("%s failed", what)

    async def _expire_snapshots(self) -> None:
        """Retention: delete paused sandboxes whose snapshot is older than the maximum age."""
        max_age = self.settings.snapshot_max_age_s
        while True:
            await asyncio.sleep(min(60.0, max(1.0, max_age / 4)))
            try:
                cutoff = time.time() - max_age
                for sandbox_id in await store.snapshots_older_than(self.engine, self.node_id,
                                                                   cutoff):  # fmt: skip
                    await self._expire(sandbox_id)
            except Exception:
                log.exception("snapshot retention pass failed")

    async def _expire(self, sandbox_id: str, paused_on: str = "") -> None:
        """The paused sandbox ends and its snapshot goes (`paused_on`: from that node's part
        of the store)."""
        async with self._sandbox_locks[sandbox_id]:
            expired = await store.transition(
                self.engine, sandbox_id, ["paused"], "killed", ended_at=time.time(),
                end_reason="snapshot expired",
            )  # fmt: skip
            if not expired:
                return
            self.node.delete_snapshot(sandbox_id, paused_on)
            await store.drop_snapshot(self.engine, sandbox_id)
            log.info("snapshot of %s expired and was deleted", sandbox_id)

    async def _expire_lost_nodes_snapshots(self) -> None:
        """A cluster's node: retention for the paused sandboxes of lost nodes too (their own
        node's timer is gone), each applied by the node that stands in for it."""
        if self.settings.snapshot_max_age_s <= 0:  # kept until killed
            return
        cutoff = time.time() - self.settings.snapshot_max_age_s
        now = await nodes.catalog_time(self.engine)
        for row in await nodes.list_nodes(self.engine):
            if row["id"] == self.node_id or nodes.status(row, now) != "unhealthy":
                continue
            for sandbox_id in await store.snapshots_older_than(self.engine, row["id"], cutoff):
                stand_in = await self.directory.stand_in(sandbox_id)
                if stand_in is not None and stand_in["id"] == self.node_id:
                    await self._expire(sandbox_id, paused_on=row["id"])

    def _node_ended(self, sandbox_id: str, reason: str) -> None:
        self._background(self._ended(sandbox_id, reason))

    async def _ended(self, sandbox_id: str, reason: str) -> None:
        row = await store.get_sandbox(self.engine, sandbox_id)
        await store.end_sandbox(self.engine, sandbox_id, reason)
        if row is not None and row["state"] != "killed":
            who = "timeout" if reason == "timeout" else "node"
            await self.events.record(row["team_id"], sandbox_id, ended_type(reason), who, reason)

    def _node_paused(self, sandbox_id: str, snapshot: Snapshot) -> None:
        self._background(self._record_pause(sandbox_id, snapshot))

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _record_pause(self, sandbox_id: str, snapshot: Snapshot,
                            who: str = "timeout") -> None:  # fmt: skip
        row = await store.get_sandbox(self.engine, sandbox_id)
        if row is None:
            return
        await store.save_snapshot(self.engine, {
            "sandbox_id": sandbox_id, "team_id": row["team_id"],
            "template_id": row["template_id"], "node_id": self.node_id,
            "metadata": row["metadata"], "size_bytes": snapshot.size,
            "checksum": snapshot.checksum,
            "runsc_version": snapshot.manifest["runsc_version"],
            "created_at": snapshot.manifest["created_at"],
        })  # fmt: skip
        if await store.transition(self.engine, sandbox_id, ["running", "pausing"], "paused"):
            kind = "files only" if snapshot.mode != "full" else None
            await self.events.record(row["team_id"], sandbox_id, "paused", who, kind)

    @property
    def default_cpu_count(self) -> int:
        """Whole vCPUs as E2B reports them (`cpuCount`) for the configured CPU share."""
        return max(1, round(self.settings.default_cpus))

    # -- auth ----------------------------------------------------------------------------------

    async def team_for_key(self, key: str) -> Row | None:
        if not key.startswith(keys.PREFIX):
            return None
        return await store.team_for_key(self.engine, key)

    def envd_token(self, row: Row) -> str | None:
        return keys.envd_token(self.seed, row["id"]) if row["secure"] else None

    def traffic_token(self, row: Row) -> str | None:
        return None if row.get("public_traffic", True) else keys.traffic_token(self.seed, row["id"])

    # -- sandboxes -----------------------------------------------------------------------------

    @timed_operation("create")
    async def create(self, team: Row, new: NewSandbox) -> Row:
        """A sandbox from a template, or from one of the team's snapshots when `new.template`
        names one (by id or name), as E2B's `Sandbox.create(snapshot_id)`."""
        self._check_timeout(new.timeout_s)
        await self.membership.check_placeable()
        await self.node.egress_proxy.check(new.egress.socks)
        saved = await store.team_snapshot(self.engine, team["id"], new.template)
        if saved is not None:
            if new.volume_mounts:
                raise InvalidArgument(
                    "a sandbox started from a snapshot mounts the volumes its source mounted",
                    "leave volumeMounts out",
                )
            for mount in saved["volume_mounts"]:  # in a cluster, moved here if they must
                await self.volumes.here(mount["volume_id"])
            row = self._new_row(team, new, saved["template_id"], "", saved["volume_mounts"])
            if (earlier := await self._reserve(team, [row])) is not None:
                return earlier
            build = saved["build_key"]
            start = partial(self.node.create_from_snapshot, key=build, made_on=saved["node_id"])
            started = await self._start(row, new, start,
                                        actor(team), f"from snapshot {saved['id']}")  # fmt: skip
            if await store.team_snapshot(self.engine, team["id"], saved["id"]) != saved:
                # Deleted or taken again while this create read it (the node fetched it anew,
                # maybe from the remote store): nobody else will.
                self.node.delete_snapshot(build)
            return started
        template, sizes = await self._template_for(team, new.template)
        mounts = await self.volumes.resolve(team, new.volume_mounts)
        row = self._new_row(team, new, template.name, template.build_id,
                            [m.to_json() for m in mounts], sizes)  # fmt: skip
        if (earlier := await self._reserve(team, [row])) is not None:
            return earlier
        return await self._start(
            row,
            new,
            self.node.create,
            actor(team),
            f"from template {template.name}",
            sizes=sizes,
        )

    async def _template_for(self, team: Row, wanted: str) -> tuple[Template, Sizes | None]:
        """The build a create starts from: one of the team's own templates (by id, name or
        name:tag), with the sizes its sandboxes get, else one of the operator's (the node's
        sizes); never another team's."""
        if wanted in RECIPES:  # no team template has a built-in's name: no catalog query
            return self.node.templates.get(wanted), None
        resolved = await self.templates.resolve(team, wanted)
        if resolved is not None:
            row, build_id = resolved
            sizes = Sizes(int(row["cpu_count"]), int(row["memory_mb"]))
            return await self.node.template_build(row["id"], build_id), sizes
        if await self.templates.foreign(team, wanted):
            raise NotFound(f"template {wanted!r} not found")
        return self.node.templates.get(wanted), None  # NotFound for unknown templates

    def _new_row(self, team: Row, new: NewSandbox, template_id: str, build_id: str,
                 volume_mounts: list[dict[str, str]],
                 sizes: Sizes | None = None) -> Row:  # fmt: skip
        """The catalog's row of a sandbox about to start; `sizes` when they are not the node's
        (what placement counts until the node says what it gave)."""
        now = time.time()
        sizes = sizes or Sizes(self.default_cpu_count, self.settings.default_memory_mb)
        return {
            "id": new_sandbox_id(), "team_id": team["id"], "template_id": template_id,
            "build_id": build_id, "node_id": self.node_id, "state": "starting",
            "metadata": new.metadata, "cpu_count": sizes.cpu_count,
            "memory_mb": sizes.memory_mb, "disk_mb": DISK_MB,
            "auto_pause": new.auto_pause, "auto_resume": new.auto_resume,
            "allow_internet": new.egress.internet, "egress": new.egress.to_json(),
            "secure": new.secure, "public_traffic": new.public_traffic,
            "envd_version": ENVD_VERSION, "started_at": now,
            "end_at": now + new.timeout_s, "created_at": now, "ended_at": None,
            "end_reason": None, "volume_mounts": volume_mounts,
            "idempotency_key": new.idempotency_key,
        }  # fmt: skip

    def team_lock(self, team_id: str) -> asyncio.Lock:
        """Held while a team's sandboxes are reserved and while its volumes are checked for
        users, so a volume is never deleted under a sandbox that is about to mount it."""
        return self._team_locks[team_id]

    async def _reserve(self, team: Row, rows: list[Row]) -> Row | None:
        """Reserve the rows against the team's limit; None, or the sandbox an earlier create
        with the same idempotency key made (then nothing is reserved)."""
        async with self.team_lock(team["id"]):
            reserved = await store.reserve_sandboxes(self.engine, team, rows)
        if isinstance(reserved, bool):
            if not reserved:
                raise _limit_reached(team)
            return None
        return await self._made_with_key(reserved)

    async def _made_with_key(self, row: Row) -> Row:
        """The sandbox an earlier create with the same key made, once that create is done (a
        client resends a create whose answer it lost while the first one still runs)."""
        deadline = time.monotonic() + KEYED_CREATE_WAIT_S
        while row["state"] == "starting" and time.monotonic() < deadline:
            await asyncio.sleep(0.25)
            row = await store.get_sandbox(self.engine, row["id"]) or row
        if row["state"] == "starting":
            raise Conflict("a create with this Idempotency-Key is still under way",
                           "ask again in a moment: it answers with that sandbox")  # fmt: skip
        if row["state"] == "killed" and row["idempotency_key"] is None:  # that create failed
            raise Conflict(f"the create with this Idempotency-Key failed: {row['end_reason']}",
                           "create again: the key is free")  # fmt: skip
        return row

    async def _start(
        self, row: Row, new: NewSandbox, start: Callable[[CreateRequest], Awaitable[SandboxRecord]],
        who: str, how: str, *, sizes: Sizes | None = None,
    ) -> Row:  # fmt: skip
        """Start the reserved sandbox `row` on the node, with `sizes` (else the node's own);
        its row ends if that fails."""
        request = CreateRequest(
            memory_mb=sizes.memory_mb if sizes else None,
            cpus=float(sizes.cpu_count) if sizes else None,
            template=row["template_id"], build_id=row["build_id"] or None,
            sandbox_id=row["id"], access_token=self.envd_token(row),
            timeout_s=new.timeout_s, metadata=new.metadata, env_vars=new.env_vars,
            egress=new.egress, on_timeout="pause" if new.auto_pause else "kill",
            volume_mounts=tuple(VolumeMount.from_json(m) for m in row["volume_mounts"]),
            pause_memory=new.auto_pause_memory, traffic_token=self.traffic_token(row),
        )  # fmt: skip
        try:
            record = await start(request)
        except BaseException as exc:
            # Its key is free again: a create that failed is sent again to make one.
            await store.end_sandbox(self.engine, row["id"], f"create failed: {exc}",
                                    idempotency_key=None)  # fmt: skip
            raise
        # The clock starts when the sandbox is ready, as in E2B: start time is not charged.
        started = time.time()
        values = {"state": "running", "started_at": started, "end_at": record.end_at,
                  "build_id": record.build_id, "cpu_count": max(1, round(record.cpus)),
                  "memory_mb": record.memory_mb, "volume_mounts": record.volumes}  # fmt: skip
        await store.update_sandbox(self.engine, row["id"], **values)
        await self.events.record(row["team_id"], row["id"], "created", who, how)
        return {**row, **values}

    async def get(self, team: Row, sandbox_id: str, *, live: bool = True) -> Row:
        """The team's sandbox; other teams' sandboxes do not exist for it (404, not 403)."""
        row = await store.get_sandbox(self.engine, sandbox_id)
        if row is None or row["team_id"] != team["id"] or (live and row["state"] == "killed"):
            raise NotFound(f"sandbox {sandbox_id!r} was not found")
        return row

    async def list_sandboxes(self, team: Row, states: list[str]) -> list[Row]:
        return await store.team_sandboxes(self.engine, team["id"], states)

    @timed_operation("kill")
    async def kill(self, team: Row, sandbox_id: str) -> None:
        row = await self.get(team, sandbox_id)
        async with self._sandbox_locks[sandbox_id]:
            with contextlib.suppress(NotFound):  # it ended on its own: the catalog follows
                await self.node.kill(sandbox_id)
            # A paused sandbox's memory goes with it (from the store's part of the node that
            # paused it, when that node was lost and this one answers for it).
            self.node.delete_snapshot(sandbox_id, paused_on=row["node_id"])
            await store.drop_snapshot(self.engine, sandbox_id)
            await store.end_sandbox(self.engine, row["id"], "killed")
            await self.events.record(team["id"], sandbox_id, "killed", actor(team))
        self._sandbox_locks.pop(sandbox_id, None)  # ended for good: nothing left to serialize

    @timed_operation("pause")
    async def pause(self, team: Row, sandbox_id: str, memory: bool = True) -> None:
        """Checkpoint memory, processes and files (only files without `memory`); the sandbox
        then lists as paused. A failed pause leaves it running (the node guarantees it) and
        reports why."""
        await self.get(team, sandbox_id)
        async with self._sandbox_locks[sandbox_id]:
            if not await store.transition(self.engine, sandbox_id, ["running"], "pausing"):
                row = await self.get(team, sandbox_id)
                raise Conflict(f"sandbox {sandbox_id!r} is {row['state']}, not running")
            try:
                snapshot = await self.node.pause(sandbox_id, memory=memory)
            except NotFound:
                if self.node.snapshots.held(sandbox_id):
                    # Paused at its timeout while this pause waited for the node: the
                    # auto-pause records it (the row goes from pausing to paused).
                    raise Conflict(f"sandbox {sandbox_id!r} was paused meanwhile") from None
                await store.end_sandbox(self.engine, sandbox_id, "lost while pausing")
                raise
            except BaseException:
                if sandbox_id in self.node.sandboxes:
                    await store.transition(self.engine, sandbox_id, ["pausing"], "running")
                else:  # lost: ended like any sandbox that ends, with when and why
                    await store.end_sandbox(self.engine, sandbox_id, "lost while pausing")
                raise
            await self._record_pause(sandbox_id, snapshot, actor(team))

    async def set_timeout(self, team: Row, sandbox_id: str, timeout_s: int,
                          *, extend_only: bool = False) -> Row:  # fmt: skip
        """E2B's timeout rules: seconds from now, capped by the maximum lifetime counted from
        the (last) start; `extend_only` (refresh, connect) never shortens."""
        row = await self.get(team, sandbox_id)
        if row["state"] != "running":
            raise Conflict(f"sandbox {sandbox_id!r} is not running")
        if timeout_s < 0:
            raise InvalidArgument("timeout must not be negative")
        now = time.time()
        remaining_life = self.settings.max_timeout_s - (now - row["started_at"])
        if remaining_life <= 0:
            most = self.settings.max_timeout_s
            raise InvalidArgument("Max instance length exceeded", f"a sandbox runs at most {most}s")
        end_at = now + min(timeout_s, remaining_life)
        if extend_only and end_at <= row["end_at"]:
            return row
        record = await self.node.set_timeout(sandbox_id, max(1, round(end_at - now)))
        await store.update_sandbox(self.engine, sandbox_id, end_at=record.end_at)
        return {**row, "end_at": record.end_at}

    @timed_operation("update_network")
    async def update_network(self, team: Row, sandbox_id: str, egress: Egress) -> None:
        """Replace a running sandbox's egress rules, all at once (E2B's update_network)."""
        await self.get(team, sandbox_id)
        await self.node.egress_proxy.check(egress.socks)
        async with self._sandbox_locks[sandbox_id]:
            await self._running(team, sandbox_id)
            await self._on_node(team, sandbox_id, self.node.update_network(sandbox_id, egress))
            await store.update_sandbox(self.engine, sandbox_id, allow_internet=egress.internet,
                                       egress=egress.to_json())  # fmt: skip

    @timed_operation("connect")
    async def connect(self, team: Row, sandbox_id: str, timeout_s: int, reboot: bool = False,
                      who: str | None = None) -> tuple[Row, bool]:  # fmt: skip
        """(the sandbox, whether it was resumed). A running sandbox only gets a longer timeout;
        a paused one is restored from its snapshot, with the same id, metadata and token (with
        `reboot`, its files only, on the template started afresh)."""
        self._check_timeout(timeout_s)
        await self.get(team, sandbox_id)
        async with self._sandbox_locks[sandbox_id]:
            row = await self.get(team, sandbox_id)
            if row["state"] == "paused":
                resumed = await self._resume(team, row, timeout_s, reboot)
                await self.events.record(
                    team["id"],
                    sandbox_id,
                    "resumed",
                    who or actor(team),
                    "files only, started afresh" if reboot else None,
                )
                return resumed, True
            if row["state"] != "running":
                raise Conflict(f"sandbox {sandbox_id!r} is {row['state']}", "retry in a moment")
        return await self.set_timeout(team, sandbox_id, timeout_s, extend_only=True), False

    async def catalog_state(self, sandbox_id: str) -> str | None:
        """The sandbox's state in the catalog (wherever it runs or its snapshot is)."""
        row = await store.get_sandbox(self.engine, sandbox_id)
        return None if row is None else str(row["state"])

    async def wake(self, sandbox_id: str) -> bool:
        """Auto-resume, for the proxy: traffic for a paused sandbox made with `autoResume`
        resumes it, as E2B's proxy does. False if it is not such a sandbox; the resume's own
        error (a team at its limit, a kill that came first) if it could not be resumed."""
        row = await store.get_sandbox(self.engine, sandbox_id)
        if row is None or not row["auto_resume"] or row["state"] == "killed":
            return False
        team = await store.get_team(self.engine, row["team_id"])
        if team is None:
            return False
        await self.connect(team, sandbox_id, self.settings.default_timeout_s, who="traffic")
        log.info("sandbox %s resumed by traffic", sandbox_id)
        return True

    @timed_operation("resume")
    async def _resume(self, team: Row, row: Row, timeout_s: int, reboot: bool = False) -> Row:
        sandbox_id = row["id"]
        # Paused on another node (placed here by the cluster's API when that one was lost):
        # fetched from that node's part of the shared store, and this node's from the
        # reservation on (the lost node's sandboxes that are starting are ended).
        paused_on = row["node_id"]
        for mount in row["volume_mounts"]:  # in a cluster, moved here if they must
            await self.volumes.here(mount["volume_id"])
        async with self._team_locks[team["id"]]:
            reserved = await store.resume_reservation(self.engine, team, sandbox_id,
                                                      self.node_id)  # fmt: skip
        if reserved is False:
            raise _limit_reached(team)
        if reserved is None:
            raise Conflict(f"sandbox {sandbox_id!r} is not paused any more")
        try:
            record = await self.node.resume(sandbox_id, timeout_s, reboot=reboot,
                                            paused_on=paused_on)  # fmt: skip
        except BaseException:
            await store.transition(self.engine, sandbox_id, ["starting"], "paused",
                                   node_id=paused_on)  # fmt: skip
            raise
        values = {"started_at": time.time(), "end_at": record.end_at}
        if not await store.transition(self.engine, sandbox_id, ["starting"], "running", **values):
            # Killed meanwhile through another node (its own was lost): it stays killed.
            with contextlib.suppress(NotFound):
                await self.node.kill(sandbox_id)
            raise NotFound(f"sandbox {sandbox_id!r} was killed while it was resumed")
        if paused_on != self.node_id:
            log.info("sandbox %s, paused on node %s, resumed here", sandbox_id, paused_on)
            with contextlib.suppress(Exception):  # it only spares the proxy a stale entry
                await moves.announce(self.engine, sandbox_id)
            self.node.delete_snapshot(sandbox_id, paused_on=paused_on)
        return {**row, **values, "state": "running"}

    # -- snapshots and forks -------------------------------------------------------------------

    @timed_operation("snapshot")
    async def create_snapshot(self, team: Row, sandbox_id: str, name: str | None,
                              memory: bool = True) -> Row:  # fmt: skip
        """Save the running sandbox as one of the team's snapshots; it keeps running. A name
        already taken by one of the team's snapshots gives that snapshot the new contents.
        Without `memory`, only its files are saved."""
        if name is not None:
            validate_name(name)
            if name in self.node.templates.names():
                raise InvalidArgument(f"{name!r} is a template's name",
                                      "give the snapshot another name")  # fmt: skip
        await self._running(team, sandbox_id)
        naming = self._snapshot_names[(team["id"], name)] if name else contextlib.nullcontext()
        async with self._sandbox_locks[sandbox_id], naming:
            row = await self._running(team, sandbox_id)
            taken = await store.team_snapshot(self.engine, team["id"], name) if name else None
            if taken is not None and taken["name"] != name:
                raise InvalidArgument(f"{name!r} is the id of another snapshot",
                                      "give the snapshot another name")  # fmt: skip
            build = new_snapshot_id()
            taking = self.node.snapshot(sandbox_id, build, memory=memory)
            snapshot = await self._on_node(team, sandbox_id, taking)
            saved: Row = {
                "id": taken["id"] if taken else new_snapshot_id(), "team_id": team["id"],
                "name": name, "build_key": build, "sandbox_id": sandbox_id,
                "template_id": row["template_id"], "node_id": self.node_id,
                "size_bytes": snapshot.size, "created_at": snapshot.manifest["created_at"],
                "volume_mounts": row["volume_mounts"],
            }  # fmt: skip
            try:
                await store.save_team_snapshot(self.engine, saved)
            except BaseException:
                self.node.delete_snapshot(build)
                raise
        if taken is not None:  # its previous build, once the creates reading it are done
            self.node.delete_snapshot(taken["build_key"])
        await self.events.record(
            team["id"],
            sandbox_id,
            "snapshot",
            actor(team),
            f"snapshot {saved['id']}" + ("" if memory else ", files only"),
        )
        return saved

    async def _on_node(self, team: Row, sandbox_id: str, work: Awaitable[T]) -> T:
        """Work on a sandbox the catalog says runs: if the node no longer has it, it is being
        paused at its timeout (409) or has ended (404)."""
        try:
            return await work
        except NotFound:
            await self.get(team, sandbox_id)
            raise Conflict(f"sandbox {sandbox_id!r} is being paused or stopped",
                           "retry in a moment") from None  # fmt: skip

    async def list_snapshots(
        self, team: Row, sandbox_id: str | None, name: str | None
    ) -> list[Row]:
        rows = await store.list_team_snapshots(self.engine, team["id"])
        return [r for r in rows if (sandbox_id is None or r["sandbox_id"] == sandbox_id)
                and (name is None or name in (r["id"], r["name"]))]  # fmt: skip

    async def delete_snapshot(self, team: Row, snapshot_id: str) -> None:
        """Sandboxes already starting from it still start; new creates no longer find it."""
        row = await store.team_snapshot(self.engine, team["id"], snapshot_id)
        if row is None or not await store.drop_team_snapshot(self.engine, row["id"]):
            raise NotFound(f"snapshot {snapshot_id!r} was not found")
        self.node.delete_snapshot(row["build_key"])

    @timed_operation("fork")
    async def fork(self, team: Row, sandbox_id: str, count: int,
                   timeout_s: int) -> list[Row | VivariumError]:  # fmt: skip
        """`count` new sandboxes, each with the running sandbox's memory, processes and files,
        from one snapshot of it; it keeps running. All are reserved first (the team's limit
        refuses the whole fork, nothing half-made); each child then starts or fails alone."""
        self._check_timeout(timeout_s)
        if not 1 <= count <= MAX_FORKS:
            raise InvalidArgument(f"count must be 1..{MAX_FORKS}, not {count}")
        await self.membership.check_placeable()
        parent = await self._running(team, sandbox_id)
        new = NewSandbox(template=parent["template_id"], timeout_s=timeout_s,
                         metadata=parent["metadata"], auto_pause=parent["auto_pause"],
                         auto_resume=parent["auto_resume"],
                         egress=rules_of(parent),
                         public_traffic=parent["public_traffic"])  # fmt: skip
        sizes = Sizes(parent["cpu_count"], parent["memory_mb"])  # a fork's: its parent's
        rows = [self._new_row(team, new, parent["template_id"], parent["build_id"],
                              parent["volume_mounts"], sizes) for _ in range(count)]  # fmt: skip
        await self._reserve(team, rows)
        key = new_fork_key()
        try:
            async with self._sandbox_locks[sandbox_id]:
                await self._running(team, sandbox_id)
                await self._on_node(team, sandbox_id,
                                    self.node.snapshot(sandbox_id, key, remote=False))  # fmt: skip
        except BaseException as exc:
            for row in rows:
                await store.end_sandbox(self.engine, row["id"], f"fork failed: {exc}")
            raise
        try:
            start = partial(self.node.create_from_snapshot, key=key)
            how = f"fork of {sandbox_id}"
            started = await asyncio.gather(*(self._start(row, new, start, actor(team), how)
                                             for row in rows),
                                           return_exceptions=True)  # fmt: skip
        finally:
            self.node.delete_snapshot(key)
        await self.events.record(team["id"], sandbox_id, "forked", actor(team), f"{count} children")
        return [r if isinstance(r, (dict, VivariumError))
                else RuntimeFailure(f"the fork did not start: {r}") for r in started]  # fmt: skip

    async def refresh(self, team: Row, sandbox_id: str, duration_s: int) -> None:
        await self.set_timeout(team, sandbox_id, max(duration_s, MIN_REFRESH_S), extend_only=True)

    async def metrics(self, team: Row, sandbox_id: str, start: float | None,
                      end: float | None) -> list[dict[str, Any]]:  # fmt: skip
        """Its samples in the range (also while paused, and for a while after it was killed)."""
        await self.get(team, sandbox_id, live=False)
        return [s.to_json() for s in await self.node.metrics(sandbox_id, start, end)]

    async def latest_metrics(self, team: Row, sandbox_ids: list[str]) -> dict[str, dict[str, Any]]:
        """The newest sample of each of the team's running sandboxes among `sandbox_ids`
        (others' and unknown ids are left out, as in a list; so are ones not sampled yet)."""
        wanted = set(sandbox_ids)
        latest = {}
        for row in await self.list_sandboxes(team, ["running"]):
            sample = self.node.latest_sample(row["id"]) if row["id"] in wanted else None
            if sample is not None:
                latest[row["id"]] = sample.to_json()
        return latest

    async def logs(self, team: Row, sandbox_id: str) -> list[tuple[float, str]]:
        await self._running(team, sandbox_id)
        return self.node.logs(sandbox_id)

    async def _running(self, team: Row, sandbox_id: str) -> Row:
        row = await self.get(team, sandbox_id)
        if row["state"] != "running":
            raise Conflict(f"sandbox {sandbox_id!r} is {row['state']}")
        return row

    def _check_timeout(self, timeout_s: int) -> None:
        if not 1 <= timeout_s <= self.settings.max_timeout_s:
            raise InvalidArgument(f"timeout {timeout_s}s is out of range",
                                  f"use 1..{self.settings.max_timeout_s} seconds")  # fmt: skip

    async def events_of(self, team: Row, sandbox_id: str | None, after_id: int,
                        limit: int) -> list[Row]:  # fmt: skip
        """The team's lifecycle events (one sandbox's, also once it ended), oldest first."""
        if sandbox_id is not None:
            await self.get(team, sandbox_id, live=False)
        return await store.events(self.engine, team["id"], sandbox_id, after_id, limit)

    async def state_counts(self) -> list[tuple[str, str, int]]:
        return await store.state_counts(self.engine)

    # -- teams and keys ------------------------------------------------------------------------

    async def create_team(
        self, caller: Row, name: str, max_sandboxes: int | None
    ) -> tuple[Row, str]:
        _admin_only(caller)
        if await store.team_by_name(self.engine, name) is not None:
            raise Conflict(f"team {name!r} already exists")
        limit = self.settings.team_max_sandboxes if max_sandboxes is None else max_sandboxes
        team = await store.create_team(self.engine, name, limit)
        key, _ = await store.create_key(self.engine, team["id"], "default")
        return team, key

    # -- nodes (admin keys only) ----------------------------------------------------------------

    async def list_nodes(self, caller: Row) -> list[Row]:
        _admin_only(caller)
        return await nodes.list_nodes(self.engine)

    async def set_node_state(self, caller: Row, node_id: str, state: str) -> Row:
        """Drain (`draining`: no new sandboxes, the running ones stay) or undrain (`ready`)."""
        _admin_only(caller)
        row = await nodes.set_state(self.engine, node_id, state)
        if row is None:
            raise NotFound(f"node {node_id!r} was not found", "see `vivarium node list`")
        self.membership.seen(row)
        log.info("node %s is now %s", node_id, state)
        return row

    async def create_key(self, team: Row, name: str) -> tuple[str, Row]:
        return await store.create_key(self.engine, team["id"], name)

    async def list_keys(self, team: Row) -> list[Row]:
        return await store.list_keys(self.engine, team["id"])

    async def revoke_key(self, team: Row, key_id: str) -> None:
        if key_id == team.get("key_id"):
            raise InvalidArgument(
                "a key cannot revoke itself", "sign in with another key of the team to revoke it"
            )
        deleted = await store.delete_key(self.engine, team["id"], key_id)
        if deleted is None:
            raise InvalidArgument("a team keeps at least one key", "create another key first")
        if not deleted:
            raise NotFound(f"API key {key_id!r} not found")


def rules_of(row: Row) -> Egress:
    """A catalog row's egress rules."""
    return Egress.from_json(row.get("egress"), row["allow_internet"])


def _limit_reached(team: Row) -> CapacityExhausted:
    return CapacityExhausted(
        f"you have reached the maximum number of concurrent sandboxes ({team['max_sandboxes']})",
        "kill or pause a sandbox first, or ask the operator to raise the team's limit",
    )


def _load_or_make_secret(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            seed = f.read().strip()
        if seed:
            return seed
    except FileNotFoundError:
        pass
    seed = secrets.token_hex(32).encode()
    write_private(path, seed.decode() + "\n")
    return seed


def _admin_only(caller: Row) -> None:
    if not caller["is_admin"]:
        raise NotFound("not found")  # non-admins do not learn that the route exists

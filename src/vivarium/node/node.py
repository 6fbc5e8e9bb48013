"""The node agent: everything host-local about sandboxes (runsc containers, network slots,
template checkpoints, timeouts). It is the only component that changes the host.

This module owns the node's state and the life of a sandbox (create, kill, exec); the rest is
split by concept: pause.py (pause and resume), team_snapshots.py (snapshots of running
sandboxes, and sandboxes started from them), reaper.py (timeouts and containers that died),
reconcile.py (what a start finds), guards.py (memory guards), request.py (what a create asks).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from functools import partial
from pathlib import Path
from typing import Any

from vivarium import statedir
from vivarium.cluster import secret
from vivarium.config import Settings
from vivarium.errors import (
    Conflict,
    HostNotReady,
    InvalidArgument,
    NodeFull,
    NotFound,
    RuntimeFailure,
    VivariumError,
)
from vivarium.guest.envd.state import EnvdState
from vivarium.guest.envd.volumes import MOUNT_COMMAND
from vivarium.network import firewall
from vivarium.network.addressing import Slot
from vivarium.network.egress import Egress
from vivarium.network.egress_ca import EgressCA
from vivarium.network.egress_dns import EgressDNS
from vivarium.network.egress_proxy import EgressProxy
from vivarium.network.pool import SlotPool
from vivarium.node import exclusive, file_snapshots
from vivarium.node.disks import DiskPool
from vivarium.node.envd_init import INIT_TIMEOUT_S, envd_http, init_envd
from vivarium.node.guards import Guards
from vivarium.node.idle_timers import IdleTimers
from vivarium.node.launched import Launched
from vivarium.node.metrics_history import MetricsHistory, Sample
from vivarium.node.pause import pause_sandbox, resume_sandbox
from vivarium.node.reaper import Reaper
from vivarium.node.reconcile import reconcile
from vivarium.node.records import (
    RecordStore,
    SandboxRecord,
    new_container_id,
    new_sandbox_id,
    valid_sandbox_id,
)
from vivarium.node.request import ON_TIMEOUT, CreateRequest
from vivarium.node.snapshots import (
    FORK_PREFIX,
    ObjectStore,
    Snapshot,
    SnapshotStore,
    remote_store,
)
from vivarium.node.steps import Steps
from vivarium.node.team_snapshots import snapshot_sandbox, start_from_snapshot
from vivarium.node.template_builds import BUILD_EGRESS, TemplateBuilds
from vivarium.node.template_share import TemplateShare
from vivarium.node.volume_share import VolumeShare
from vivarium.node.volumes import VolumeMount, VolumeStore, check_mounts
from vivarium.node.warm import WarmPool
from vivarium.proc import Result
from vivarium.runtime import cgroups, disk
from vivarium.runtime.bundle import (
    DEFAULT_CAPS,
    Resources,
    for_sandbox,
    has_volume_hub,
    write_bundle,
)
from vivarium.runtime.runsc import Runsc, open_runtime
from vivarium.templates.custom import mount_rootfs_images
from vivarium.templates.store import Template, TemplateStore

log = logging.getLogger(__name__)

MAX_EVENTS = 100
# A warm sandbox's envd answered before it was pooled: if it does not answer its /init within
# this, the create restores another rather than wait the full INIT_TIMEOUT_S.
CLAIM_INIT_TIMEOUT_S = 3.0
MAX_EXEC_TIMEOUT_S = 3600
FRESH_S = 1.0  # get_metrics up to now: a sample older than this is taken again
USERS = {"root": ("0:0", "/root"), "user": ("1000:1000", "/home/user")}


def _made_by(template: Template) -> tuple[object, object]:
    """The runsc release and platform that made the template's checkpoint."""
    return template.manifest.get("runsc_version"), template.manifest.get("platform")


class Node:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        statedir.prepare(settings.state_dir)  # before anything is made in it
        self.templates = TemplateStore(settings.templates_root)
        share_url = settings.template_share_url
        # What nodes store for each other is signed with a key from the cluster secret.
        signing_key = secret.signing_key(settings.cluster_secret)
        self.template_share = (TemplateShare(share_url, settings.s3_endpoint_url, signing_key)
                               if share_url else None)  # fmt: skip
        self.records = RecordStore(settings.sandboxes_dir)
        self.snapshots = SnapshotStore(
            settings.state_dir / "snapshots",
            remote_store(settings.node_snapshot_url(settings.node_id), settings.s3_endpoint_url),
            dedup=settings.snapshot_dedup,
        )
        self._remote_deletes: set[asyncio.Task[None]] = set()
        self._other_stores: dict[str, ObjectStore | None] = {}  # other nodes' parts (_store_of)
        # Snapshots sandboxes are being started from: deleting one waits until they are.
        self._snapshot_users: Counter[str] = Counter()
        # What to do with one once the last of them has started: delete it, or drop a copy.
        self._after_use: dict[str, Callable[[], None]] = {}
        self._collecting: asyncio.Task[None] | None = None
        self.pool = SlotPool(
            settings.slot_prefix, settings.slot_cidr, settings.egress_allow,
            settings.slot_prewarm, settings.max_sandboxes,
        )  # fmt: skip
        self.egress_ca = EgressCA(settings.state_dir / "egress-ca")
        self.egress_proxy = EgressProxy(self._egress_of, settings.egress_allow,
                                        settings.egress_dns, self.egress_ca,
                                        settings.egress_ca_file)  # fmt: skip
        self.egress_dns = EgressDNS(self._egress_of, settings.egress_allow, settings.egress_dns)
        self.volumes = VolumeStore(settings.volumes_dir, settings.volume_size_mb)
        volume_url = settings.volume_share_url
        self.volume_share = (VolumeShare(volume_url, settings.s3_endpoint_url, signing_key,
                                         self.volumes) if volume_url else None)  # fmt: skip
        self.history = MetricsHistory(settings.metrics_retention_s, self.records.container_dir)
        self._sampler: asyncio.Task[None] | None = None
        self.disks = DiskPool(settings.state_dir / "disks", settings.default_disk_mb,
                              settings.slot_prewarm)  # fmt: skip
        self.runtime: Runsc | None = None
        self.sandboxes: dict[str, SandboxRecord] = {}
        # Sandboxes that ended without being killed through us (OOM, crash, lost in a restart).
        self.events: list[dict[str, Any]] = []
        self._locks: dict[str, asyncio.Lock] = {}
        self.guards = Guards()
        self._creating = 0
        self.starts_waited = 0  # creates and resumes that waited for a start permit
        self.starts_beside_refill = 0  # ... that began while the warm pool was refilling
        # Restores at once: more only thrash the CPUs (and starve the API) without finishing
        # sooner; the rest wait their turn (E2B's nodes cap "starting" sandboxes the same way).
        self._starting = asyncio.Semaphore(settings.max_starting)
        self._cleanups: set[asyncio.Task[None]] = set()
        self.idle_timers = IdleTimers(settings.idle_timer_slack_ms * 1_000_000)
        self._idle_check: asyncio.Task[None] | None = None
        # Sandboxes started again after a snapshot was taken of them (team_snapshots.py).
        self.restarts: set[asyncio.Task[None]] = set()
        self.warm = WarmPool(self, dict(settings.warm_pool))
        self.builds = TemplateBuilds(self, settings.state_dir / "template-files")
        self._reaper: asyncio.Task[None] | None = None
        self._exclusive: list[int] = []  # the locks that make this the only node on its state
        self.http = envd_http()
        # Told when a sandbox ends other than by kill(): (sandbox id, reason). The control
        # plane keeps its catalog in step through it.
        self.on_ended: Callable[[str, str], None] | None = None
        # Told when a sandbox was paused on its own (auto-pause at timeout).
        self.on_paused: Callable[[str, Snapshot], None] | None = None
        # Told when a sandbox stops for any reason (the proxy drops its connections).
        self.on_destroyed: list[Callable[[str], None]] = []

    # -- lifecycle ---------------------------------------------------------------------------

    async def start(self) -> None:
        self._exclusive = exclusive.hold(self.settings.state_dir, self.settings.slot_prefix)
        try:
            await self._start()
        except BaseException:
            exclusive.release(self._exclusive)
            raise

    async def _start(self) -> None:
        steps = Steps("node start")  # on a loaded host a start can take minutes: say where
        await asyncio.to_thread(self.snapshots.check)  # a remote store must answer: say so now
        steps.done("snapshot store")
        self.runtime = await asyncio.to_thread(
            open_runtime, self.settings.runsc_path, self.settings.state_dir,
            self.settings.runsc_root, self.settings.runsc_platform,
        )  # fmt: skip
        steps.done("runsc probes")
        await asyncio.to_thread(self.volumes.mount_all)  # before sandboxes using them start
        await asyncio.to_thread(mount_rootfs_images, self.templates)  # teams' templates' too
        steps.done("volumes")
        found = await reconcile(self.runtime, self.records)
        self.sandboxes.update(found.adopted)
        for record in found.adopted.values():  # idle as far as this run knows
            self.idle_timers.idle(record.container_id)
        for record, reason in found.lost:
            self.record_event(record, reason)
        await asyncio.to_thread(self.snapshots.sweep_staging)
        steps.done("reconcile")
        # Before any slot's rules name their ports (the ones below, every launch).
        (
            self.pool.firewall.proxy_port,
            self.pool.firewall.tunnel_port,
        ) = await self.egress_proxy.start()
        self.pool.firewall.dns_port = await self.egress_dns.start()
        await self.pool.start({r.slot_index for r in self.sandboxes.values()})
        steps.done("network slots")
        await self.disks.start()
        steps.done("ready disks")
        for record in self.sandboxes.values():  # a pause cut short may have left them refusing
            slot = self.pool.range.slot(record.slot_index)
            await firewall.forget_other_backend(slot)
            await self.apply_egress(slot, record.rules)
            self.guards.arm(self.runtime, record.sandbox_id, record.container_id,
                            record.memory_mb)  # fmt: skip
        self._reaper = asyncio.create_task(Reaper(self).run())
        self._sampler = asyncio.create_task(self.history.run(self.list_sandboxes))
        self._idle_check = asyncio.create_task(
            self.idle_timers.run(self.list_sandboxes, self.latest_sample)
        )
        self.warm.start()
        steps.report()
        log.info(
            "node ready: %d sandbox(es) adopted, runsc %s (%s)",
            len(self.sandboxes),
            self.runtime.probe.runsc_version,
            self.runtime.probe.platform,
        )

    async def stop(self) -> None:
        """Stop managing; running sandboxes keep running and are adopted by the next start."""
        await self.warm.stop()
        for task in (self._reaper, self._sampler, self._idle_check):
            if task:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        if self.restarts:
            await asyncio.gather(*self.restarts, return_exceptions=True)
        await self._drain_cleanups()
        if self._collecting is not None:  # a thread: it finishes (and is crash-safe anyway)
            await asyncio.gather(self._collecting, return_exceptions=True)
        if self._remote_deletes:
            await asyncio.gather(*self._remote_deletes, return_exceptions=True)
        await self.pool.stop()
        await self.egress_proxy.close()
        await self.egress_dns.close()
        await self.disks.stop()
        await self.http.aclose()
        exclusive.release(self._exclusive)

    # -- for pause.py and reaper.py ------------------------------------------------------------

    def rt(self) -> Runsc:
        if self.runtime is None:
            raise RuntimeError("node not started")
        return self.runtime

    def lock(self, sandbox_id: str) -> asyncio.Lock:
        """Held by whatever changes the sandbox: create, kill, pause, resume, timeouts."""
        return self._locks.setdefault(sandbox_id, asyncio.Lock())

    @asynccontextmanager
    async def locked(self, sandbox_id: str) -> AsyncIterator[SandboxRecord]:
        async with self.lock(sandbox_id):
            record = self.get(sandbox_id)
            with self.idle_timers.held(record.container_id):
                yield record

    # -- egress ------------------------------------------------------------------------------

    async def apply_egress(self, slot: Slot, egress: Egress) -> None:
        # A SOCKS5 tunnel is in place before the router lets anything out, and removed only
        # after it no longer does: the sandbox's TCP never leaves directly in between.
        tunnelled = egress.socks is not None
        if tunnelled:
            await self.pool.firewall.tunnel(slot, True)
        await firewall.apply_router_rules(slot, egress, self.egress_proxy.port,
                                          self.egress_dns.port)  # fmt: skip
        if not tunnelled:
            await self.pool.firewall.tunnel(slot, False)

    def _egress_of(self, address: str) -> tuple[str, Egress] | None:
        """The sandbox whose slot has `address` (a peer of the egress proxy or the resolver),
        and its rules."""
        for record in self.sandboxes.values():
            if record.slot_address == address and record.state == "running":
                return record.sandbox_id, record.rules
        if address in self.builds.addresses:
            return f"build:{address}", BUILD_EGRESS
        return None

    async def update_network(self, sandbox_id: str, egress: Egress) -> SandboxRecord:
        """Replace a running sandbox's egress rules at once. New connections follow them;
        ones already open stay as they were let through."""
        async with self.locked(sandbox_id) as record:
            if record.state != "running":
                raise Conflict(f"sandbox {sandbox_id} is {record.state}",
                               "resume it first: rules change on a running sandbox")  # fmt: skip
            await self.apply_egress(self.pool.range.slot(record.slot_index), egress)
            record.allow_internet, record.egress = egress.internet, egress.to_json()
            await self.save(record)
            return record

    # -- sandboxes ---------------------------------------------------------------------------

    def get(self, sandbox_id: str) -> SandboxRecord:
        record = self.sandboxes.get(sandbox_id) if valid_sandbox_id(sandbox_id) else None
        if record is None:
            raise NotFound(f"sandbox {sandbox_id!r} not found")
        return record

    def list_sandboxes(self) -> list[SandboxRecord]:
        return sorted(self.sandboxes.values(), key=lambda r: r.started_at)

    def timeout(self, timeout_s: int | None) -> int:
        value = self.settings.default_timeout_s if timeout_s is None else timeout_s
        if not 1 <= value <= self.settings.max_timeout_s:
            raise InvalidArgument(
                f"timeout {value}s is out of range", f"use 1..{self.settings.max_timeout_s} seconds"
            )
        return value

    async def create(self, req: CreateRequest) -> SandboxRecord:
        timeout_s = self.timeout(req.timeout_s)
        if req.on_timeout not in ON_TIMEOUT:
            raise InvalidArgument(f"on_timeout must be one of {', '.join(ON_TIMEOUT)}")
        if req.sandbox_id is not None and (
            not valid_sandbox_id(req.sandbox_id) or req.sandbox_id in self.sandboxes
        ):
            raise InvalidArgument(f"sandbox id {req.sandbox_id!r} is invalid or in use")
        # A named build (what the control plane asks for, its current one verified already)
        # may be another node's, fetched; without one, the template's current build.
        if req.build_id:
            template = await self.template_build(req.template, req.build_id)
        else:
            template = self.templates.get(req.template)
        self._check_built_here(template)
        self.check_volumes(template, req.volume_mounts)
        usual = self.default_resources(template)
        resources = Resources(
            usual.memory_mb if req.memory_mb is None else req.memory_mb,
            usual.cpus if req.cpus is None else req.cpus,
            usual.pids,
            usual.disk_mb,
        )
        resources.validate()
        # A warm sandbox has an empty volume hub: one that mounts volumes is restored for it.
        if resources == usual and not req.volume_mounts and (warm := self.warm.take(template)):
            try:
                return await self._claim(warm, req, template, timeout_s)
            except RuntimeFailure as exc:  # hand_over removed it: restore one instead
                self.warm.claim_failed()
                log.warning("a warm sandbox of %r failed its /init (%s); restoring one",
                            template.name, exc)  # fmt: skip
        steps = Steps(f"create from {template.name!r}")
        return await self.restore_in_turn(req, template, template.checkpoint, resources,
                                          timeout_s, steps)  # fmt: skip

    async def _claim(
        self, warm: Launched, req: CreateRequest, template: Template, timeout_s: int
    ) -> SandboxRecord:
        steps = Steps(f"create from warm {template.name!r}")
        self._creating += 1  # counted between the pool and the node's sandboxes
        try:
            sandbox_id = req.sandbox_id or new_sandbox_id()
            return await self.hand_over(
                warm, req, sandbox_id, template.name, template.build_id, timeout_s, steps,
                init_timeout_s=CLAIM_INIT_TIMEOUT_S,
            )  # fmt: skip
        finally:
            self._creating -= 1

    def check_volumes(self, template: Template, mounts: tuple[VolumeMount, ...]) -> None:
        if not mounts:
            return
        if not has_volume_hub(template.spec):
            raise InvalidArgument(
                f"template {template.name!r} was built before volumes existed",
                f"rebuild it to mount volumes: `vivarium template build {template.name}`",
            )
        check_mounts(list(mounts))
        for mount in mounts:
            self.volumes.data(mount.volume_id)  # NotFound if it is gone

    async def template_build(self, name: str, build_id: str) -> Template:
        """A specific build of a template: this node's, or in a cluster fetched from where
        the node that built it published it (template_share.py)."""
        try:
            return self.templates.build(name, build_id)
        except NotFound:
            if self.template_share is None:
                raise
        return await self.template_share.fetch(self.templates, name, build_id)

    async def share_template_of(self, record: SandboxRecord) -> None:
        """In a cluster, the build a sandbox runs on goes to the store before a snapshot of it
        does: another node may resume it, on that build. RuntimeFailure if it cannot."""
        if self.template_share is not None:
            template = await self.template_build(record.template, record.build_id)
            await self.template_share.share(template)

    def built_here(self, template: Template) -> bool:
        """A checkpoint restores only under the runsc release and platform that made it (under
        another, envd just never answers)."""
        probe = self.rt().probe
        return _made_by(template) == (probe.runsc_version, probe.platform)

    def _check_built_here(self, template: Template) -> None:
        if not self.built_here(template):
            probe, made = self.rt().probe, _made_by(template)
            raise HostNotReady(
                f"template {template.name!r} was built by runsc {made[0]} ({made[1]}); this "
                f"node runs runsc {probe.runsc_version} ({probe.platform})",
                f"rebuild it: `vivarium template build {template.name}` (`make run` does)",
            )

    @asynccontextmanager
    async def start_slot(self) -> AsyncIterator[None]:
        """Room for one more sandbox (creates and resumes alike): within the node's maximum,
        and among at most `max_starting` restores at once."""
        limit = self.settings.max_sandboxes
        self._creating += 1  # counted from here on, so that a create beside us sees us
        try:
            # The warm pool gives way to users (a refill under way is waited for, then given
            # up), and slots of just-killed sandboxes come back.
            while self.occupied() + len(self._cleanups) > limit:
                if not self.warm.shrink(self.occupied() - limit):
                    if not self.warm.filling:
                        await self._drain_cleanups()
                        break
                    await self.warm.until_filled()
                await self._drain_cleanups()
            if self.occupied() > limit:
                raise NodeFull(
                    f"this node runs its maximum of {limit} sandboxes",
                    "kill some, or raise VIVARIUM_MAX_SANDBOXES",
                )
            if self._starting.locked():
                self.starts_waited += 1
            if self.warm.filling:
                self.starts_beside_refill += 1
            async with self._starting:
                yield
        finally:
            self._creating -= 1

    def occupied(self) -> int:
        """Sandboxes running or starting, and warm ones: what counts against the node."""
        return len(self.sandboxes) + self._creating + len(self.warm)

    def starting_for_users(self) -> bool:
        return self._creating > 0

    def default_resources(self, template: Template) -> Resources:
        s = self.settings
        disk_mb = int(template.manifest.get("disk_mb") or s.default_disk_mb)
        return Resources(s.default_memory_mb, s.default_cpus, s.default_pids, disk_mb)

    async def restore_in_turn(
        self, req: CreateRequest, template: Template, image: Path, resources: Resources,
        timeout_s: int, steps: Steps, *, again: bool = False, files: Path | None = None,
    ) -> SandboxRecord:  # fmt: skip
        """restore() on the template's build once a start slot is free (creates, resumes and
        starts from snapshots alike). `again`: a new incarnation of a sandbox that keeps its
        place on the node (after a snapshot), restored at once, ahead of any queue. `files`: a
        filesystem-only snapshot laid over it (node/file_snapshots.py)."""
        # From the template's own checkpoint, nothing of the sandbox is in it yet: its volumes
        # are mounted and its files laid over it.
        fresh = image == template.checkpoint
        if again:
            return await self.restore(req, template.name, template.build_id, template.spec,
                                      image, resources, timeout_s, steps, files, fresh)  # fmt: skip
        async with self.start_slot():
            steps.done("waiting for a start slot")
            return await self.restore(req, template.name, template.build_id, template.spec,
                                      image, resources, timeout_s, steps, files, fresh)  # fmt: skip

    async def restore(
        self, req: CreateRequest, template: str, build_id: str, spec: dict[str, Any],
        image: Path, resources: Resources, timeout_s: int, steps: Steps,
        files: Path | None = None, fresh: bool = False,
    ) -> SandboxRecord:  # fmt: skip
        sandbox_id = req.sandbox_id or new_sandbox_id()
        # Every incarnation gets a container (and cgroup, directory) of its own: after a pause
        # the previous one may still be being deleted in the background, and its slot stays
        # taken until it is gone, so a resume takes another.
        started = await self.launch(new_container_id(sandbox_id), spec, image, resources, steps,
                                    egress=req.egress,
                                    volumes=req.volume_mounts, files=files,
                                    fresh=fresh)  # fmt: skip
        return await self.hand_over(started, req, sandbox_id, template, build_id, timeout_s, steps)

    async def launch(
        self, container_id: str, spec: dict[str, Any], image: Path, resources: Resources,
        steps: Steps, *, egress: Egress, volumes: tuple[VolumeMount, ...] = (),
        files: Path | None = None, fresh: bool = False,
    ) -> Launched:  # fmt: skip
        """Restore a container from `image` in a network slot of its own, with `volumes` in its
        hub (node/volumes.py); it is nobody's yet (hand_over makes it a sandbox)."""
        directory = self.records.container_dir(container_id)
        slot = await self.pool.acquire()
        steps.done("network slot")
        # Egress opens while runsc restores: until then the slot refuses it, as free ones do.
        opening = (None if egress.is_closed
                   else asyncio.create_task(self.apply_egress(slot, egress)))  # fmt: skip
        started = Launched(container_id, directory, slot, resources, opening is not None, opening,
                           files=files is not None, fresh=fresh)  # fmt: skip
        try:
            filestore = await self.disks.take(directory, resources.disk_mb)
            steps.done("disk")
            hub = await asyncio.to_thread(self.volumes.attach, filestore, list(volumes), files,
                                          file_snapshots.IN_HUB)  # fmt: skip
            bundle = await asyncio.to_thread(
                write_bundle, directory / "bundle",
                for_sandbox(spec, Path(slot.netns_path), resources, container_id, hub),
            )  # fmt: skip
            await self.rt().restore(container_id, bundle, image, filestore,
                                    directory / "console.log")  # fmt: skip
            steps.done("runsc restore")
        except BaseException as exc:
            steps.report(f"failed ({type(exc).__name__})")
            await self.discard(started)
            raise
        return started

    async def hand_over(
        self, started: Launched, req: CreateRequest, sandbox_id: str, template: str,
        build_id: str, timeout_s: int, steps: Steps, init_timeout_s: float = INIT_TIMEOUT_S,
    ) -> SandboxRecord:  # fmt: skip
        """Make a launched container the sandbox `sandbox_id`: envd's /init gives it its id,
        token and environment, and the record makes it the node's. On failure it is removed."""
        slot, resources, container_id = started.slot, started.resources, started.container_id
        try:
            if not started.internet and not req.egress.is_closed:  # a warm one: opens now
                started.internet = True
                started.egress = asyncio.create_task(self.apply_egress(slot, req.egress))
            self.guards.arm(self.rt(), sandbox_id, container_id, resources.memory_mb)
            # Independent of each other: done side by side while envd answers.
            await asyncio.gather(
                *([] if started.held_back else [asyncio.to_thread(disk.hold_back,
                                                                  started.directory)]),
                *([started.egress] if started.egress else []),
                init_envd(self.http, slot.router_ip, sandbox_id=sandbox_id, template_id=template,
                          env_vars=dict(req.env_vars or {}), access_token=req.access_token,
                          ca_bundle=self.egress_ca.cert_pem, timeout_s=init_timeout_s),
                self._settle_in(started, req.volume_mounts),
            )  # fmt: skip
            steps.done("envd init")
            cgroups.settle_cpu(container_id)  # up: no more weight than its siblings
            now = time.time()
            record = SandboxRecord(
                sandbox_id=sandbox_id, template=template, build_id=build_id,
                slot_index=slot.index, slot_address=slot.router_ip, started_at=now,
                end_at=now + timeout_s, memory_mb=resources.memory_mb, cpus=resources.cpus,
                pids=resources.pids, disk_mb=resources.disk_mb, allow_internet=req.egress.internet,
                metadata=dict(req.metadata or {}), env_vars=dict(req.env_vars or {}),
                on_timeout=req.on_timeout, access_token=req.access_token,
                container_id=container_id, volumes=[m.to_json() for m in req.volume_mounts],
                pause_memory=req.pause_memory, traffic_token=req.traffic_token,
                egress=req.egress.to_json(),
            )  # fmt: skip
            await self.save(record)
        except BaseException as exc:
            steps.report(f"failed ({type(exc).__name__})")
            await self.discard(started)
            raise
        self.sandboxes[sandbox_id] = record
        steps.report(f"of {sandbox_id} done")
        return record

    async def _settle_in(self, started: Launched, mounts: tuple[VolumeMount, ...]) -> None:
        """A sandbox restored from its template's checkpoint gets its volumes mounted, then
        its files laid back if it starts from a filesystem-only snapshot. Anything else was
        saved with both in place. The mount comes first: it runs with CAP_SYS_ADMIN and must
        run the template's own code, not files of the sandbox's."""
        if started.fresh and mounts:
            await self._mount_volumes(started.container_id, mounts)
        if started.files:
            await file_snapshots.apply(self, started.container_id)

    async def _mount_volumes(self, container_id: str, mounts: tuple[VolumeMount, ...]) -> None:
        """Mount each volume from the hub where the create asked for it: a mount needs
        CAP_SYS_ADMIN, which only this one command gets (guest/envd/volumes.py)."""
        wanted = json.dumps([{"name": m.name, "path": m.path} for m in mounts])
        result = await self.rt().exec(
            container_id, ["/usr/bin/python3", "-I", "-c", MOUNT_COMMAND, wanted],
            caps=(*DEFAULT_CAPS, "CAP_SYS_ADMIN"), timeout=INIT_TIMEOUT_S,
        )  # fmt: skip
        if not result.ok:
            why = (result.stderr or result.stdout).strip()[-500:]
            raise RuntimeFailure(f"mounting volumes failed: {why}",
                                 "check that nothing else is at the mount paths")  # fmt: skip

    async def discard(self, started: Launched) -> None:
        """Remove a container that is no sandbox (a failed start, a warm one given up) and free
        its slot and disk."""
        if started.egress:  # cancelling a finished one does nothing
            started.egress.cancel()
            await asyncio.gather(started.egress, return_exceptions=True)
        self.guards.disarm(started.container_id)
        self.idle_timers.forget(started.container_id)
        await self.rt().delete(started.container_id)
        await self.pool.release(started.slot)
        await asyncio.to_thread(disk.discard, started.directory)

    def discard_soon(self, started: Launched) -> None:
        """discard() in the background, counted with the teardowns of killed sandboxes."""

        async def discarding() -> None:
            try:
                await self.discard(started)
            except Exception:
                log.exception("removing container %s failed; the next start retries it",
                              started.container_id)  # fmt: skip

        task = asyncio.create_task(discarding())
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    async def kill(self, sandbox_id: str) -> None:
        self.history.killed(sandbox_id)  # paused ones too (for which the lookup fails)
        async with self.locked(sandbox_id) as record:
            await self.destroy(record)

    async def destroy(self, record: SandboxRecord) -> None:
        """Stop the sandbox now; delete its container and free its slot in the background.

        `runsc delete` takes over a second (it waits for the cgroup to drain), while killing
        every process takes milliseconds. Removing the record first is crash-safe: a container
        or slot without a record is cleaned up by the next start.
        """
        await self.stop_incarnation(record)
        self.forget(record)

    async def stop_incarnation(self, record: SandboxRecord) -> asyncio.Task[None]:
        """Stop the sandbox's container and tear it down in the background (the returned
        task); the sandbox stays the node's, for a new incarnation to replace (pause.py)."""
        self.guards.disarm(record.container_id)
        self.idle_timers.forget(record.container_id)
        await self.rt().kill(record.container_id)
        self.records.drop(record.container_id)
        directory = self.records.container_dir(record.container_id)
        task = asyncio.create_task(self._finish_destroy(record, directory))
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)
        return task

    def forget(self, record: SandboxRecord) -> None:
        """The sandbox is no longer the node's (its container is stopped)."""
        self.sandboxes.pop(record.sandbox_id, None)
        self.tell_destroyed(record.sandbox_id)
        self._locks.pop(record.sandbox_id, None)

    async def _finish_destroy(self, record: SandboxRecord, directory: Path) -> None:
        try:
            await self.rt().delete(record.container_id)
            await self.pool.release(self.pool.range.slot(record.slot_index))
            await asyncio.to_thread(disk.discard, directory)
        except Exception:
            log.exception("cleanup of sandbox %s failed; the next start retries it",
                          record.sandbox_id)  # fmt: skip

    async def _drain_cleanups(self) -> None:
        if self._cleanups:
            await asyncio.gather(*self._cleanups, return_exceptions=True)

    # -- pause and resume (pause.py) --------------------------------------------------------

    async def pause(self, sandbox_id: str, *, memory: bool = True) -> Snapshot:
        """Checkpoint the sandbox (memory, processes, filesystem changes; only its files without
        `memory`) into its snapshot and free its resources. If that fails, the sandbox keeps
        running unchanged."""
        async with self.locked(sandbox_id) as record:
            return await pause_sandbox(self, record, memory=memory)

    async def resume(
        self, sandbox_id: str, timeout_s: int, *, reboot: bool = False, paused_on: str = ""
    ) -> SandboxRecord:
        """`paused_on`: the node it was paused on, if another: its snapshot is fetched from
        that node's part of the remote store."""
        source = self._store_of(paused_on)
        return await resume_sandbox(self, sandbox_id, timeout_s, reboot=reboot, source=source)

    def _elsewhere(self, node_id: str) -> bool:
        """Whether `node_id` is another node of this cluster."""
        return self.settings.role == "node" and node_id not in ("", self.settings.node_id)

    def _store_of(self, node_id: str) -> ObjectStore | None:
        """Another node's part of the shared snapshot store (None for this node's own), made
        once per node."""
        if not self._elsewhere(node_id):
            return None
        if node_id not in self._other_stores:
            self._other_stores[node_id] = remote_store(
                self.settings.node_snapshot_url(node_id), self.settings.s3_endpoint_url
            )
        return self._other_stores[node_id]

    def delete_snapshot(self, key: str, paused_on: str = "") -> None:
        """The local copy now (or once the sandboxes starting from it have started); the remote
        one (if any) in the background: a kill does not wait for the store, and one that is
        down only leaves objects nothing reads again. `paused_on`: the copy in another node's
        part of the store (a sandbox that node paused and this one resumed)."""
        other = self._store_of(paused_on)
        if other is None:
            if self._snapshot_users[key]:
                self._after_use[key] = partial(self.delete_snapshot, key)
                return
            self.snapshots.delete_local(key)
            if self.snapshots.remote is None or key.startswith(FORK_PREFIX):  # local only
                return
        task = asyncio.create_task(asyncio.to_thread(self.snapshots.delete_remote, key, other))
        self._remote_deletes.add(task)
        task.add_done_callback(self._remote_deletes.discard)

    def drop_copy(self, key: str) -> None:
        """This node's copy of another node's snapshot, once no sandbox is starting from it
        (that node keeps the snapshot)."""
        if self._snapshot_users[key]:  # a delete already due covers it
            self._after_use.setdefault(key, partial(self.snapshots.delete_local, key))
        else:
            self.snapshots.delete_local(key)

    def collect_chunks_soon(self) -> None:
        """Collect unused chunks in the background (one collection at a time)."""
        if self._collecting is None or self._collecting.done():
            self._collecting = asyncio.create_task(self._collect_chunks())

    async def _collect_chunks(self) -> None:
        try:
            await asyncio.to_thread(self.snapshots.collect_chunks)
        except Exception as exc:  # the next round tries again; nothing named was touched
            self.snapshots.may_hold_unnamed_chunks = True
            if isinstance(exc, VivariumError):
                log.warning("unused snapshot chunks not collected: %s (%s)", exc.message, exc.hint)
            else:
                log.exception("collecting unused snapshot chunks failed")

    @contextmanager
    def snapshot_in_use(self, key: str) -> Iterator[None]:
        self._snapshot_users[key] += 1
        try:
            yield
        finally:
            self._snapshot_users[key] -= 1
            if not self._snapshot_users[key]:
                del self._snapshot_users[key]
                if (then := self._after_use.pop(key, None)) is not None:
                    then()

    # -- snapshots of running sandboxes (team_snapshots.py) ----------------------------------

    async def snapshot(self, sandbox_id: str, key: str, *, remote: bool = True,
                       memory: bool = True) -> Snapshot:  # fmt: skip
        """Save the running sandbox (memory, processes, files; only files without `memory`) as
        the snapshot `key`; it keeps running, stopped for the checkpoint and its restore, which
        may still be under way when this returns."""
        return await snapshot_sandbox(self, sandbox_id, key, remote=remote, memory=memory)

    async def create_from_snapshot(self, req: CreateRequest, key: str,
                                   made_on: str = "") -> SandboxRecord:  # fmt: skip
        """`made_on`: the node that took the snapshot, if another (it is fetched from that
        node's part of the store)."""
        return await start_from_snapshot(self, req, key, self._store_of(made_on))

    async def set_timeout(self, sandbox_id: str, timeout_s: int) -> SandboxRecord:
        async with self.locked(sandbox_id) as record:
            record.end_at = time.time() + self.timeout(timeout_s)
            await self.save(record)
            return record

    async def exec(
        self,
        sandbox_id: str,
        cmd: list[str],
        *,
        user: str = "user",
        env: dict[str, str] | None = None,
        cwd: str | None = None,
        timeout_s: float = 60.0,
    ) -> Result:
        if not cmd or not all(isinstance(part, str) and part for part in cmd):
            raise InvalidArgument("cmd must be a non-empty list of non-empty strings")
        if user not in USERS:
            raise InvalidArgument(f"unknown user {user!r}", f"use one of {', '.join(USERS)}")
        if not 0 < timeout_s <= MAX_EXEC_TIMEOUT_S:
            raise InvalidArgument(f"exec timeout must be in (0, {MAX_EXEC_TIMEOUT_S}] seconds")
        record = self.get(sandbox_id)
        uid_gid, home = USERS[user]
        # The same environment envd gives its processes (guest code may be imported, not import).
        sandbox_env = EnvdState(sandbox_id=record.sandbox_id, template_id=record.template,
                                env_vars=record.env_vars).process_env()  # fmt: skip
        merged = {"HOME": home, "USER": user, "LOGNAME": user, **sandbox_env, **(env or {})}
        try:
            with self.idle_timers.held(record.container_id):
                return await self.rt().exec(
                    record.container_id, cmd, user=uid_gid, cwd=cwd or home, timeout=timeout_s,
                    env=[f"{k}={v}" for k, v in merged.items()],
                )  # fmt: skip
        except TimeoutError:
            raise InvalidArgument(f"command did not finish within {timeout_s:g}s") from None

    async def save(self, record: SandboxRecord) -> None:
        # A file write: on a disk busy with restores even that can take milliseconds, which
        # must not stall the event loop (the API and proxy share it).
        await asyncio.to_thread(self.records.save, record)

    def logs(self, sandbox_id: str, limit: int = 1000) -> list[tuple[float, str]]:
        """The sandbox's console output (its init and envd), newest `limit` lines, each with the
        time the log file was last written (runsc does not timestamp console lines)."""
        record = self.get(sandbox_id)
        path = self.records.container_dir(record.container_id) / "console.log"
        try:
            stamp = path.stat().st_mtime
            lines = path.read_text(errors="replace").splitlines()[-limit:]
        except OSError:
            return []
        return [(stamp, line) for line in lines]

    async def metrics(
        self, sandbox_id: str, start: float | None, end: float | None
    ) -> list[Sample]:
        """The sandbox's samples between `start` and `end` (node/metrics_history.py). If the
        range reaches now, a running sandbox is sampled now too: the last sample is current
        (samples are otherwise up to MetricsHistory's interval old)."""
        samples = self.history.between(sandbox_id, start, end)
        now = time.time()
        record = self.sandboxes.get(sandbox_id)
        reaches_now = (start or now) <= now <= (end or now)
        if record and reaches_now and (not samples or now - samples[-1].ts > FRESH_S):
            taken = await asyncio.to_thread(self.history.now, record)
            samples = [*samples, taken] if taken else samples
        return samples

    def latest_sample(self, sandbox_id: str) -> Sample | None:
        """The newest periodic sample, read from memory: cheap enough for a list of many."""
        return self.history.latest(sandbox_id)

    def record_event(self, record: SandboxRecord, reason: str) -> None:
        log.warning("sandbox %s ended: %s", record.sandbox_id, reason)
        self.events.append({"sandbox_id": record.sandbox_id, "template": record.template,
                            "reason": reason, "at": time.time()})  # fmt: skip
        del self.events[:-MAX_EVENTS]
        self.tell_ended(record.sandbox_id, reason)

    def tell_ended(self, sandbox_id: str, reason: str) -> None:
        self.history.killed(sandbox_id)
        if self.on_ended is not None:
            try:
                self.on_ended(sandbox_id, reason)
            except Exception:
                log.exception("on_ended listener failed for sandbox %s", sandbox_id)

    def tell_destroyed(self, sandbox_id: str) -> None:
        for listener in self.on_destroyed:
            listener(sandbox_id)

    def info(self) -> dict[str, Any]:
        probe = self.rt().probe
        return {
            "runsc_version": probe.runsc_version,
            "platform": probe.platform,
            "netns_workaround": probe.netns_workaround,
            "sandboxes": len(self.sandboxes),
            "warm": self.warm.info(),
            "starts_waited": self.starts_waited,
            "starts_beside_refill": self.starts_beside_refill,
            "max_sandboxes": self.settings.max_sandboxes,
            "slots_in_use": self.pool.in_use,
            "coarse_timers": self.idle_timers.coarse,  # idle sandboxes (node/idle_timers.py)
            # Teardowns of killed sandboxes, ready disks still being made, or restored sentries'
            # garbage being collected, in the background.
            "settling": bool(self._cleanups) or self.disks.filling,
            "templates": self.templates.names(),
            "events": self.events,
        }

"""The node agent: everything host-local about sandboxes (runsc containers, network slots,
template checkpoints, timeouts). It is the only component that changes the host.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import httpx

from vivarium.config import Settings
from vivarium.errors import (
    CannotSave,
    CapacityExhausted,
    Conflict,
    HostNotReady,
    InvalidArgument,
    NotFound,
    RuntimeFailure,
)
from vivarium.guest.envd import PORT as ENVD_PORT
from vivarium.guest.envd.state import EnvdState
from vivarium.network import firewall, handshakes
from vivarium.network.addressing import Slot
from vivarium.network.pool import SlotPool
from vivarium.node.disks import DiskPool
from vivarium.node.envd_init import envd_http, init_envd
from vivarium.node.records import (
    RecordStore,
    SandboxRecord,
    new_container_id,
    new_sandbox_id,
    valid_sandbox_id,
)
from vivarium.node.snapshots import Snapshot, SnapshotNotStored, SnapshotStore, remote_store
from vivarium.proc import Result
from vivarium.runtime import disk
from vivarium.runtime.bundle import Resources, for_sandbox, write_bundle
from vivarium.runtime.cgroups import memory_stats, pids_limit_hits
from vivarium.runtime.memory_guard import MemoryGuard
from vivarium.runtime.runsc import CheckpointFailed, Runsc, open_runtime
from vivarium.templates.store import Template, TemplateStore

log = logging.getLogger(__name__)

REAPER_INTERVAL_S = 0.5
LIVENESS_EVERY = 4  # reaper ticks between checks that every container still runs
MAX_EVENTS = 100
MAX_EXEC_TIMEOUT_S = 3600
AUTO_PAUSE_RETRY_S = 60
SNAPSHOT_HEADROOM = 64 << 20  # bytes kept free beyond a snapshot's largest possible size
# A handshake under way at a pause ends when the peer answers or the sandbox's netstack (which
# runs while its programs are frozen) retransmits the SYN into the refusal: first after 1 s,
# then 2 s later.
HANDSHAKE_WAIT_S = 3.5
HANDSHAKE_POLL_S = 0.02
USERS = {"root": ("0:0", "/root"), "user": ("1000:1000", "/home/user")}


ON_TIMEOUT = ("kill", "pause")


@dataclass(frozen=True)
class CreateRequest:
    template: str = "base"
    sandbox_id: str | None = None  # chosen by the control plane; else the node picks one
    access_token: str | None = None  # envd then requires it (X-Access-Token)
    on_timeout: str = "kill"
    timeout_s: int | None = None
    metadata: dict[str, str] | None = None
    env_vars: dict[str, str] | None = None
    allow_internet: bool = True
    memory_mb: int | None = None
    cpus: float | None = None


def resume_request(record: SandboxRecord) -> CreateRequest:
    """The create request that gives a resumed sandbox its old identity back."""
    return CreateRequest(
        template=record.template, sandbox_id=record.sandbox_id, access_token=record.access_token,
        metadata=record.metadata, env_vars=record.env_vars, allow_internet=record.allow_internet,
        on_timeout=record.on_timeout,
    )  # fmt: skip


class Node:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.templates = TemplateStore(settings.templates_root)
        self.records = RecordStore(settings.sandboxes_dir)
        self.snapshots = SnapshotStore(
            settings.state_dir / "snapshots",
            remote_store(settings.snapshot_url, settings.s3_endpoint_url),
        )
        self._remote_deletes: set[asyncio.Task[None]] = set()
        self.pool = SlotPool(
            settings.slot_prefix, settings.slot_cidr, settings.egress_allow,
            settings.slot_prewarm, settings.max_sandboxes,
        )  # fmt: skip
        self.disks = DiskPool(settings.state_dir / "disks", settings.default_disk_mb,
                              settings.slot_prewarm)  # fmt: skip
        self.runtime: Runsc | None = None
        self.sandboxes: dict[str, SandboxRecord] = {}
        # Sandboxes that ended without being killed through us (OOM, crash, lost in a restart).
        self.events: list[dict[str, Any]] = []
        self._locks: dict[str, asyncio.Lock] = {}
        self._guards: dict[str, MemoryGuard] = {}  # by container id
        self._creating = 0
        # Restores at once: more only thrash the CPUs (and starve the API) without finishing
        # sooner; the rest wait their turn (E2B's nodes cap "starting" sandboxes the same way).
        self._starting = asyncio.Semaphore(settings.max_starting)
        self._suspects: set[str] = set()
        self._cleanups: set[asyncio.Task[None]] = set()
        self._reaper: asyncio.Task[None] | None = None
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
        self.settings.state_dir.mkdir(parents=True, exist_ok=True)
        await asyncio.to_thread(self.snapshots.check)  # a remote store must answer: say so now
        self.runtime = await asyncio.to_thread(
            open_runtime, self.settings.runsc_path, self.settings.state_dir,
            self.settings.runsc_root, self.settings.runsc_platform,
        )  # fmt: skip
        await self._reconcile()
        await asyncio.to_thread(self.snapshots.sweep_staging)
        await self.pool.start({r.slot_index for r in self.sandboxes.values()})
        await self.disks.start()
        for record in self.sandboxes.values():  # a pause cut short may have left them refusing
            slot = self.pool.range.slot(record.slot_index)
            await firewall.apply_router_rules(slot, record.allow_internet)
            self._guard(record.sandbox_id, record.container_id, record.memory_mb)
        self._reaper = asyncio.create_task(self._reap_expired())
        log.info(
            "node ready: %d sandbox(es) adopted, runsc %s (%s)",
            len(self.sandboxes),
            self.runtime.probe.runsc_version,
            self.runtime.probe.platform,
        )

    async def stop(self) -> None:
        """Stop managing; running sandboxes keep running and are adopted by the next start."""
        if self._reaper:
            self._reaper.cancel()
            await asyncio.gather(self._reaper, return_exceptions=True)
        await self._drain_cleanups()
        if self._remote_deletes:
            await asyncio.gather(*self._remote_deletes, return_exceptions=True)
        await self.pool.stop()
        await self.disks.stop()
        await self.http.aclose()

    async def _reconcile(self) -> None:
        """Adopt sandboxes still running after a restart or crash; remove what was left over."""
        runtime = self._rt()
        records, strays = self.records.load_all()
        containers = {c.id: c for c in await runtime.list()}
        # Newest incarnation first: an older record of the same sandbox (never expected: a
        # record goes before the next incarnation starts) is only removed, never reported.
        for record in sorted(records, key=lambda r: r.started_at, reverse=True):
            container = containers.pop(record.container_id, None)
            # Frozen by a pause that the restart cut short: thaw it. That fails if its
            # checkpoint had already ended it (runsc still says "paused" then).
            paused = container is not None and container.status == "paused"
            if paused and await runtime.resume(record.container_id):
                container = await runtime.state(record.container_id) or container
            if record.sandbox_id not in self.sandboxes:
                if container is not None and container.status == "running":
                    self.sandboxes[record.sandbox_id] = record
                    continue
                state = container.status if container else "missing"
                self._event(record, f"not running after node restart (container {state})")
            if container is not None:  # only by its exact id: runsc would take a prefix
                await runtime.delete(record.container_id)
            await asyncio.to_thread(disk.discard, self.records.container_dir(record.container_id))
        for cid in containers:
            log.warning("removing orphaned container %s", cid)
            await runtime.delete(cid)
        for stray in strays:
            await asyncio.to_thread(disk.discard, stray)

    def _rt(self) -> Runsc:
        if self.runtime is None:
            raise RuntimeError("node not started")
        return self.runtime

    @asynccontextmanager
    async def _locked(self, sandbox_id: str) -> AsyncIterator[SandboxRecord]:
        lock = self._locks.setdefault(sandbox_id, asyncio.Lock())
        async with lock:
            yield self.get(sandbox_id)

    # -- sandboxes ---------------------------------------------------------------------------

    def get(self, sandbox_id: str) -> SandboxRecord:
        record = self.sandboxes.get(sandbox_id) if valid_sandbox_id(sandbox_id) else None
        if record is None:
            raise NotFound(f"sandbox {sandbox_id!r} not found")
        return record

    def list_sandboxes(self) -> list[SandboxRecord]:
        return sorted(self.sandboxes.values(), key=lambda r: r.started_at)

    def _timeout(self, timeout_s: int | None) -> int:
        value = self.settings.default_timeout_s if timeout_s is None else timeout_s
        if not 1 <= value <= self.settings.max_timeout_s:
            raise InvalidArgument(
                f"timeout {value}s is out of range", f"use 1..{self.settings.max_timeout_s} seconds"
            )
        return value

    async def create(self, req: CreateRequest) -> SandboxRecord:
        s = self.settings
        timeout_s = self._timeout(req.timeout_s)
        if req.on_timeout not in ON_TIMEOUT:
            raise InvalidArgument(f"on_timeout must be one of {', '.join(ON_TIMEOUT)}")
        if req.sandbox_id is not None and (
            not valid_sandbox_id(req.sandbox_id) or req.sandbox_id in self.sandboxes
        ):
            raise InvalidArgument(f"sandbox id {req.sandbox_id!r} is invalid or in use")
        template = self.templates.get(req.template)
        self._check_built_here(template)
        resources = Resources(
            s.default_memory_mb if req.memory_mb is None else req.memory_mb,
            s.default_cpus if req.cpus is None else req.cpus,
            s.default_pids,
            int(template.manifest.get("disk_mb") or s.default_disk_mb),
        )
        resources.validate()
        async with self._start_slot():
            return await self._restore(req, template.name, template.build_id, template.spec,
                                       template.checkpoint, resources, timeout_s)  # fmt: skip

    def _check_built_here(self, template: Template) -> None:
        """A checkpoint restores only under the runsc release and platform that made it (under
        another, envd just never answers): say so before trying."""
        probe = self._rt().probe
        made = (template.manifest.get("runsc_version"), template.manifest.get("platform"))
        if made != (probe.runsc_version, probe.platform):
            raise HostNotReady(
                f"template {template.name!r} was built by runsc {made[0]} ({made[1]}); this "
                f"node runs runsc {probe.runsc_version} ({probe.platform})",
                f"rebuild it: `vivarium template build {template.name}` (`make run` does)",
            )

    @asynccontextmanager
    async def _start_slot(self) -> AsyncIterator[None]:
        """Room for one more sandbox (creates and resumes alike): within the node's maximum,
        and among at most `max_starting` restores at once."""
        s = self.settings
        if len(self.sandboxes) + self._creating + len(self._cleanups) >= s.max_sandboxes:
            await self._drain_cleanups()  # slots of just-killed sandboxes come back first
        if len(self.sandboxes) + self._creating >= s.max_sandboxes:
            raise CapacityExhausted(
                f"this node runs its maximum of {s.max_sandboxes} sandboxes",
                "kill some, or raise VIVARIUM_MAX_SANDBOXES",
            )
        self._creating += 1
        try:
            async with self._starting:
                yield
        finally:
            self._creating -= 1

    async def _restore(
        self, req: CreateRequest, template: str, build_id: str, spec: dict[str, Any],
        image: Path, resources: Resources, timeout_s: int,
    ) -> SandboxRecord:  # fmt: skip
        runtime = self._rt()
        sandbox_id = req.sandbox_id or new_sandbox_id()
        # Every incarnation gets a container (and cgroup, directory) of its own: after a pause
        # the previous one may still be being deleted in the background, and its slot stays
        # taken until it is gone, so a resume takes another.
        container_id = new_container_id(sandbox_id)
        directory = self.records.container_dir(container_id)
        slot = await self.pool.acquire()
        # Egress opens while runsc restores: until then the slot refuses it, as free ones do.
        egress = (asyncio.create_task(firewall.apply_router_rules(slot, allow_internet=True))
                  if req.allow_internet else None)  # fmt: skip
        try:
            filestore = await self.disks.take(directory, resources.disk_mb)
            bundle = await asyncio.to_thread(
                write_bundle, directory / "bundle",
                for_sandbox(spec, Path(slot.netns_path), resources, container_id),
            )  # fmt: skip
            await runtime.restore(container_id, bundle, image, filestore,
                                  directory / "console.log")  # fmt: skip
            self._guard(sandbox_id, container_id, resources.memory_mb)
            # Independent of each other: done side by side while envd answers.
            await asyncio.gather(
                asyncio.to_thread(disk.hold_back, directory),
                *([egress] if egress else []),
                init_envd(self.http, slot.router_ip, sandbox_id=sandbox_id, template_id=template,
                          env_vars=dict(req.env_vars or {}), access_token=req.access_token),
            )  # fmt: skip
            now = time.time()
            record = SandboxRecord(
                sandbox_id=sandbox_id, template=template, build_id=build_id,
                slot_index=slot.index, slot_address=slot.router_ip, started_at=now,
                end_at=now + timeout_s, memory_mb=resources.memory_mb, cpus=resources.cpus,
                pids=resources.pids, disk_mb=resources.disk_mb, allow_internet=req.allow_internet,
                metadata=dict(req.metadata or {}), env_vars=dict(req.env_vars or {}),
                on_timeout=req.on_timeout, access_token=req.access_token,
                container_id=container_id,
            )  # fmt: skip
            await self._save(record)
        except BaseException:
            if egress:  # cancelling a finished one does nothing
                egress.cancel()
                await asyncio.gather(egress, return_exceptions=True)
            self._unguard(container_id)
            await runtime.delete(container_id)
            await self.pool.release(slot)
            await asyncio.to_thread(disk.discard, directory)
            raise
        self.sandboxes[sandbox_id] = record
        return record

    async def kill(self, sandbox_id: str) -> None:
        async with self._locked(sandbox_id) as record:
            await self._destroy(record)

    async def _destroy(self, record: SandboxRecord) -> None:
        """Stop the sandbox now; delete its container and free its slot in the background.

        `runsc delete` takes over a second (it waits for the cgroup to drain), while killing
        every process takes milliseconds. Removing the record first is crash-safe: a container
        or slot without a record is cleaned up by the next start.
        """
        self._unguard(record.container_id)
        await self._rt().kill(record.container_id)
        self.sandboxes.pop(record.sandbox_id, None)
        for listener in self.on_destroyed:
            listener(record.sandbox_id)
        self._locks.pop(record.sandbox_id, None)
        directory = self.records.container_dir(record.container_id)
        (directory / "record.json").unlink(missing_ok=True)
        task = asyncio.create_task(self._finish_destroy(record, directory))
        self._cleanups.add(task)
        task.add_done_callback(self._cleanups.discard)

    async def _finish_destroy(self, record: SandboxRecord, directory: Path) -> None:
        try:
            await self._rt().delete(record.container_id)
            await self.pool.release(self.pool.range.slot(record.slot_index))
            await asyncio.to_thread(disk.discard, directory)
        except Exception:
            log.exception("cleanup of sandbox %s failed; the next start retries it",
                          record.sandbox_id)  # fmt: skip

    async def _drain_cleanups(self) -> None:
        if self._cleanups:
            await asyncio.gather(*self._cleanups, return_exceptions=True)

    # -- pause and resume ------------------------------------------------------------------

    async def pause(self, sandbox_id: str) -> Snapshot:
        """Checkpoint the sandbox (memory, processes, filesystem changes) into its snapshot and
        free its resources. If the checkpoint fails, the sandbox keeps running unchanged."""
        async with self._locked(sandbox_id) as record:
            return await self._pause(record)

    async def _pause(self, record: SandboxRecord) -> Snapshot:
        runtime = self._rt()
        sandbox_id = record.sandbox_id
        self._check_snapshot_space(record)
        await asyncio.to_thread(self.snapshots.check)  # the remote store, if any, is reachable
        # runsc saves what programs inside do with the network: listening servers and
        # connections inside the sandbox resume as they were; a connection over its interface
        # is cut at the save (--net-disconnect-ok), so the proxy ends its own first, cleanly.
        # Only a connection still being opened cannot be saved: _checkpoint waits for those.
        record.state = "pausing"
        for listener in self.on_destroyed:
            listener(sandbox_id)
        slot = self.pool.range.slot(record.slot_index)
        staging = await asyncio.to_thread(self.snapshots.staging, sandbox_id)
        try:
            await self._checkpoint(record, slot, staging / "checkpoint")
            version = runtime.probe.runsc_version
            snapshot = await asyncio.to_thread(
                self.snapshots.commit, sandbox_id, staging, record.to_json(), version
            )
        except BaseException as exc:
            if isinstance(exc, SnapshotNotStored):  # sealed here, but not stored remotely
                await self._put_back(record, staging, exc)
            await asyncio.to_thread(self.snapshots.discard, staging)
            if await asyncio.shield(self._thaw(record, slot)):
                record.state = "running"
                if isinstance(exc, CheckpointFailed):
                    hint = "; ".join(filter(None, ["it keeps running, unchanged", exc.hint]))
                    raise CannotSave(f"sandbox {sandbox_id} could not be saved: {exc.message}",
                                     hint) from None  # fmt: skip
                raise RuntimeFailure(f"pausing sandbox {sandbox_id} failed: {exc}",
                                     "it keeps running, unchanged") from None  # fmt: skip
            if isinstance(exc, asyncio.CancelledError):
                raise
            # The checkpoint stopped it but the snapshot could not be written (disk full?):
            # restarting would lose what was in memory, so say exactly what happened.
            self._event(record, f"pause failed after the sandbox was stopped: {exc}")
            await self._destroy(record)
            lost = "the sandbox was stopped and could not be saved"
            raise RuntimeFailure(f"pausing sandbox {sandbox_id} failed: {exc}", lost) from None
        await self._destroy(record)  # the checkpoint stopped it: free the slot and container
        log.info("sandbox %s paused (%d MiB snapshot)", sandbox_id, snapshot.size >> 20)
        return snapshot

    async def _checkpoint(self, record: SandboxRecord, slot: Slot, image: Path) -> None:
        """Save the sandbox into `image`, stopping it. New connections are refused meanwhile,
        and the save waits for the handshakes under way to end (handshakes.py)."""
        runtime = self._rt()
        self._unguard(record.container_id)  # a frozen init cannot free memory
        await firewall.refuse_new_connections(slot)
        await runtime.pause(record.container_id)
        deadline = time.monotonic() + HANDSHAKE_WAIT_S
        while opening := await handshakes.under_way(slot):
            if time.monotonic() > deadline:
                raise CheckpointFailed(
                    f"a TCP connection is still being opened ({', '.join(opening)}) and this "
                    "runsc cannot save one mid-handshake",
                    "pause again once it is open or has failed",
                )
            await asyncio.sleep(HANDSHAKE_POLL_S)
        await runtime.checkpoint(record.container_id, image)

    async def _put_back(self, record: SandboxRecord, staging: Path, exc: Exception) -> NoReturn:
        """The checkpoint stopped the sandbox and is whole in `staging`, but the remote store
        refused it: restore the sandbox from it, so that the pause fails with the sandbox
        running as before (same id, memory, files), and no snapshot is kept anywhere."""
        sandbox_id = record.sandbox_id
        await self._destroy(record)
        try:
            # The time it had left; an auto-pause that failed is retried after a while.
            timeout_s = max(AUTO_PAUSE_RETRY_S, round(record.end_at - time.time()))
            async with self._start_slot():
                await self._restore_record(record, staging / "checkpoint",
                                           min(timeout_s, self.settings.max_timeout_s))  # fmt: skip
        except BaseException as err:
            self._event(record, f"pause failed ({exc}) and restoring the sandbox failed: {err}")
            lost = "the sandbox was stopped and could not be restored"
            raise RuntimeFailure(f"pausing sandbox {sandbox_id} failed: {exc}", lost) from None
        finally:
            await asyncio.to_thread(self.snapshots.discard, staging)
        log.warning("pause of %s failed (%s); it was restored and keeps running", sandbox_id, exc)
        raise RuntimeFailure(f"pausing sandbox {sandbox_id} failed: {exc}",
                             "it keeps running, restored from its checkpoint; no snapshot was "
                             "kept") from None  # fmt: skip

    def _check_snapshot_space(self, record: SandboxRecord) -> None:
        """A checkpoint that runs out of disk may take the sandbox down with it: refuse up
        front unless the snapshot fits even at its largest (all of the sandbox's memory, and
        every file written to its disk)."""
        stats = memory_stats(record.container_id)
        written = disk.usage(self.records.container_dir(record.container_id))
        need = (
            (stats.usage_bytes if stats else record.memory_mb << 20)
            + (written[0] if written else record.disk_mb << 20)  # the writable layer's files
            + SNAPSHOT_HEADROOM
        )
        free = shutil.disk_usage(self.snapshots.root).free
        if free < need:
            raise CannotSave(
                f"not enough disk space to pause sandbox {record.sandbox_id}: {free >> 20} MiB "
                f"free in {self.snapshots.root}, up to {need >> 20} MiB needed",
                "free some disk space and pause again; the sandbox keeps running",
            )

    async def _thaw(self, record: SandboxRecord, slot: Slot) -> bool:
        """After a pause that did not happen: unfreeze the sandbox and let it connect again.
        False if the sandbox is gone (a failed checkpoint may have ended it)."""
        runtime = self._rt()
        await runtime.resume(record.container_id)  # False as well when it was not frozen
        state = await runtime.state(record.container_id)
        if state is None or state.status != "running":
            return False
        self._guard(record.sandbox_id, record.container_id, record.memory_mb)
        try:
            await firewall.apply_router_rules(slot, record.allow_internet)
        except Exception:
            log.exception("could not let sandbox %s connect again", record.sandbox_id)
        return True

    async def resume(self, sandbox_id: str, timeout_s: int) -> SandboxRecord:
        """Restore a paused sandbox from its verified snapshot, with a new timeout. A failed
        resume leaves the snapshot as it was, ready for another try."""
        if sandbox_id in self.sandboxes:
            raise Conflict(f"sandbox {sandbox_id!r} is already running")
        runtime = self._rt()
        lock = self._locks.setdefault(sandbox_id, asyncio.Lock())
        async with lock:
            if sandbox_id in self.sandboxes:  # resumed meanwhile (by a call that held the lock)
                raise Conflict(f"sandbox {sandbox_id!r} is already running")
            timeout_s = self._timeout(timeout_s)  # a bad timeout before any snapshot I/O
            # No wait for the paused incarnation's `runsc delete`: this one gets its own
            # container id and slot (see _restore). The snapshot is verified (or fetched)
            # outside the start limit: a long download must not hold up other creates.
            snapshot = await asyncio.to_thread(self.snapshots.load, sandbox_id,
                                               runtime.probe.runsc_version)  # fmt: skip
            record = SandboxRecord.from_json(snapshot.record)
            async with self._start_slot():
                restored = await self._restore_record(record, snapshot.checkpoint, timeout_s)
        log.info("sandbox %s resumed", sandbox_id)
        return restored

    async def _restore_record(
        self, record: SandboxRecord, image: Path, timeout_s: int
    ) -> SandboxRecord:
        """A new incarnation of a sandbox from a checkpoint of it, on the template build it was
        created from; the caller holds a start slot."""
        template = self.templates.build(record.template, record.build_id)
        resources = Resources(record.memory_mb, record.cpus, record.pids, record.disk_mb)
        return await self._restore(
            resume_request(record), record.template, record.build_id, template.spec, image,
            resources, timeout_s,
        )  # fmt: skip

    def delete_snapshot(self, sandbox_id: str) -> None:
        """The local copy now; the remote one (if any) in the background: a kill does not wait
        for the store, and one that is down only leaves objects nothing reads again."""
        self.snapshots.delete_local(sandbox_id)
        if self.snapshots.remote is not None:
            task = asyncio.create_task(asyncio.to_thread(self.snapshots.delete_remote, sandbox_id))
            self._remote_deletes.add(task)
            task.add_done_callback(self._remote_deletes.discard)

    async def set_timeout(self, sandbox_id: str, timeout_s: int) -> SandboxRecord:
        async with self._locked(sandbox_id) as record:
            record.end_at = time.time() + self._timeout(timeout_s)
            await self._save(record)
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
            return await self._rt().exec(
                record.container_id, cmd, user=uid_gid, cwd=cwd or home, timeout=timeout_s,
                env=[f"{k}={v}" for k, v in merged.items()],
            )  # fmt: skip
        except TimeoutError:
            raise InvalidArgument(f"command did not finish within {timeout_s:g}s") from None

    async def _save(self, record: SandboxRecord) -> None:
        # The record is fsync'ed: on a disk busy with restores that can take tens of
        # milliseconds, which must not stall the event loop (the API and proxy share it).
        await asyncio.to_thread(self.records.save, record)

    def _guard(self, sandbox_id: str, container_id: str, memory_mb: int) -> None:
        """Contain the sandbox's runaway processes from now on (memory_guard.py)."""
        runtime = self._rt()

        def reaped(before: int, after: int) -> None:
            log.warning("sandbox %s ran out of its %d MiB: its largest process was killed "
                        "(%d MiB in use, then %d MiB)", sandbox_id, memory_mb, before >> 20,
                        after >> 20)  # fmt: skip

        self._unguard(container_id)
        guard = MemoryGuard(container_id, memory_mb << 20,
                            lambda: runtime.signal_init(container_id, "USR1"), reaped)  # fmt: skip
        try:
            guard.arm()
        except OSError as exc:
            guard.disarm()
            hint = "check that the memory cgroup controller is available"
            raise RuntimeFailure(f"could not set the memory limit of {sandbox_id}: {exc}",
                                 hint) from exc  # fmt: skip
        self._guards[container_id] = guard

    def _unguard(self, container_id: str) -> None:
        guard = self._guards.pop(container_id, None)
        if guard is not None:
            guard.disarm()

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

    async def metrics(self, sandbox_id: str) -> dict[str, Any]:
        """envd's view of CPU and memory inside the sandbox, and the host's of its disk."""
        record = self.get(sandbox_id)
        headers = {"X-Access-Token": record.access_token} if record.access_token else {}
        url = f"http://{record.slot_address}:{ENVD_PORT}/metrics"
        try:
            response = await self.http.get(url, headers=headers)
            response.raise_for_status()
            data: dict[str, Any] = response.json()
        except (httpx.HTTPError, ValueError) as exc:
            raise RuntimeFailure(f"sandbox {sandbox_id} did not report metrics: {exc}") from None
        # Inside, statfs reports gVisor's 8 EiB: the disk's real figures are the host's.
        written = disk.usage(self.records.container_dir(record.container_id))
        if written is not None:
            data["disk_used"], data["disk_total"] = written
        return data

    def _event(self, record: SandboxRecord, reason: str) -> None:
        log.warning("sandbox %s ended: %s", record.sandbox_id, reason)
        self.events.append({"sandbox_id": record.sandbox_id, "template": record.template,
                            "reason": reason, "at": time.time()})  # fmt: skip
        del self.events[:-MAX_EVENTS]
        self._tell_ended(record.sandbox_id, reason)

    def _tell_ended(self, sandbox_id: str, reason: str) -> None:
        if self.on_ended is not None:
            try:
                self.on_ended(sandbox_id, reason)
            except Exception:
                log.exception("on_ended listener failed for sandbox %s", sandbox_id)

    async def _check_alive(self) -> None:
        """Clean up sandboxes whose container stopped on its own, and say why."""
        runtime = self._rt()
        suspects, self._suspects = self._suspects, set()
        running = {c.id for c in await runtime.list() if c.status == "running"}
        for record in [r for r in self.sandboxes.values() if r.container_id not in running]:
            # `runsc list` can miss a container whose state file is being rewritten: ask it
            # directly, and act only when a sandbox looked dead in two checks in a row.
            state = await runtime.state(record.container_id)
            if state is not None and state.status == "running":
                continue
            if record.sandbox_id not in suspects:
                self._suspects.add(record.sandbox_id)
                continue
            lock = self._locks.setdefault(record.sandbox_id, asyncio.Lock())
            if lock.locked():
                continue  # being created, killed or changed right now
            async with lock:
                if record.sandbox_id not in self.sandboxes:
                    continue
                stats = memory_stats(record.container_id)
                if stats and stats.oom_kills:
                    reason = f"out of memory: exceeded its {record.memory_mb} MiB limit"
                elif pids_limit_hits(record.container_id):
                    reason = f"hit its limit of {record.pids} processes (fork bomb?)"
                else:
                    reason = "stopped unexpectedly (its init process exited)"
                self._event(record, reason)
                await self._destroy(record)

    async def _reap_expired(self) -> None:
        tick = 0
        while True:
            await asyncio.sleep(REAPER_INTERVAL_S)
            tick += 1
            if tick % LIVENESS_EVERY == 0:
                try:
                    await self._check_alive()
                except Exception:
                    log.exception("liveness check failed")
            now = time.time()
            for record in [r for r in self.sandboxes.values() if r.end_at <= now]:
                await self._expire(record)

    async def _expire(self, record: SandboxRecord) -> None:
        if record.on_timeout == "pause":
            try:
                async with self._locked(record.sandbox_id) as current:
                    log.info("sandbox %s timed out; pausing it", record.sandbox_id)
                    snapshot = await self._pause(current)
            except NotFound:
                return
            except Exception:
                log.exception("auto-pause of %s failed", record.sandbox_id)
                if record.sandbox_id in self.sandboxes:
                    record.end_at = time.time() + AUTO_PAUSE_RETRY_S  # try again later
                return
            if self.on_paused is not None:
                self.on_paused(record.sandbox_id, snapshot)
            return
        log.info("sandbox %s timed out; killing it", record.sandbox_id)
        try:
            await self.kill(record.sandbox_id)
        except NotFound:
            return
        except Exception:
            log.exception("could not kill expired sandbox %s", record.sandbox_id)
            return
        self._tell_ended(record.sandbox_id, "timeout")

    def info(self) -> dict[str, Any]:
        probe = self._rt().probe
        return {
            "runsc_version": probe.runsc_version,
            "platform": probe.platform,
            "netns_workaround": probe.netns_workaround,
            "sandboxes": len(self.sandboxes),
            "max_sandboxes": self.settings.max_sandboxes,
            "slots_in_use": self.pool.in_use,
            "templates": self.templates.names(),
            "events": self.events,
        }

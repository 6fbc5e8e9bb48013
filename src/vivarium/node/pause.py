"""Pause and resume: a sandbox saved whole (memory, processes, files) into its snapshot, and
brought back from it as a new incarnation with the same identity. `checkpoint_sandbox`, `seal`
and `start_again` are also what a team's snapshot and a fork do (team_snapshots.py).

No data is lost on any failure path: a failed pause leaves the sandbox running (thawed, or
restored from its own checkpoint), and a failed resume leaves the snapshot as it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
import time
from pathlib import Path
from typing import TYPE_CHECKING

from vivarium.errors import CannotSave, Conflict, RuntimeFailure
from vivarium.network import firewall, handshakes
from vivarium.network.addressing import Slot
from vivarium.node import file_snapshots
from vivarium.node.records import SandboxRecord
from vivarium.node.request import resume_request
from vivarium.node.snapshots import ObjectStore, Snapshot
from vivarium.node.steps import Steps
from vivarium.runtime import disk
from vivarium.runtime.bundle import Resources
from vivarium.runtime.cgroups import memory_stats
from vivarium.runtime.runsc import CheckpointFailed

if TYPE_CHECKING:
    from vivarium.node.node import Node

log = logging.getLogger(__name__)

AUTO_PAUSE_RETRY_S = 60  # an auto-pause that failed is tried again after this long
SNAPSHOT_HEADROOM = 64 << 20  # bytes kept free beyond a snapshot's largest possible size
# A handshake under way at a pause ends when the peer answers or the sandbox's netstack (which
# runs while its programs are frozen) retransmits the SYN into the refusal: first after 1 s,
# then 2 s later.
HANDSHAKE_WAIT_S = 3.5
HANDSHAKE_POLL_S = 0.02


async def pause_sandbox(node: Node, record: SandboxRecord, *, memory: bool = True) -> Snapshot:
    """Checkpoint the sandbox into its snapshot and free its resources; the caller holds the
    sandbox's lock. If the checkpoint fails, the sandbox keeps running unchanged. Without
    `memory`, only its files are kept (node/file_snapshots.py)."""
    if not memory:
        return await _pause_files(node, record)
    staging = await checkpoint_sandbox(node, record, record.sandbox_id, "pausing")
    sealing = asyncio.ensure_future(_mark_and_seal(node, record, staging))
    try:
        snapshot = await asyncio.shield(sealing)
    except asyncio.CancelledError:
        # The node is stopping. The checkpoint stopped the sandbox: the commit, running on in
        # its thread, must finish (on this disk alone if the store failed it), or the sandbox
        # is lost. The next start finds it paused.
        await asyncio.wait({sealing})
        if sealing.exception() is not None:
            with contextlib.suppress(Exception):
                await seal(node, record, record.sandbox_id, staging, remote=False)
        await node.destroy(record)
        raise
    except Exception as exc:  # the checkpoint is whole: the sandbox goes on from it
        return await _put_back(node, record, staging, exc, "pausing")
    await node.destroy(record)  # the checkpoint stopped it: free the slot and container
    log.info("sandbox %s paused (%d MiB image, %.1f MiB stored anew)", record.sandbox_id,
             snapshot.size >> 20, snapshot.stored / (1 << 20))  # fmt: skip
    return snapshot


async def _pause_files(node: Node, record: SandboxRecord) -> Snapshot:
    """Keep only the sandbox's files as its snapshot, then stop it. If saving them fails it
    keeps running, unchanged."""
    # No request through the proxy from here on: a file written after the capture would be
    # acknowledged, then dropped with the sandbox.
    record.state = "pausing"
    node.tell_destroyed(record.sandbox_id)
    try:
        staging = await capture_files(node, record, record.sandbox_id)
        try:
            snapshot = await seal(node, record, record.sandbox_id, staging,
                                  mode=file_snapshots.MODE)  # fmt: skip
        except BaseException:
            await asyncio.to_thread(node.snapshots.discard, staging)
            raise
    except BaseException:
        record.state = "running"
        raise
    await node.destroy(record)
    log.info("sandbox %s paused, files only (%d MiB)", record.sandbox_id, snapshot.size >> 20)
    return snapshot


async def capture_files(node: Node, record: SandboxRecord, key: str) -> Path:
    """The running sandbox's files in a new staging directory for the snapshot `key`; it
    keeps running."""
    _check_snapshot_space(node, record)
    await asyncio.to_thread(node.snapshots.check)
    await node.share_template_of(record)
    staging = await asyncio.to_thread(node.snapshots.staging, key)
    try:
        await file_snapshots.capture(node, record, staging / "checkpoint")
    except BaseException:
        await asyncio.to_thread(node.snapshots.discard, staging)
        raise
    return staging


async def checkpoint_sandbox(
    node: Node, record: SandboxRecord, key: str, doing: str, *, remote: bool = True
) -> Path:
    """Checkpoint the running sandbox into a new staging directory for the snapshot `key`,
    returned whole. The checkpoint stops it: the caller (holding its lock) seals the snapshot
    and destroys the sandbox or starts it again. If the checkpoint fails the sandbox keeps
    running unchanged, or the error says it could not be kept."""
    sandbox_id = record.sandbox_id
    _check_snapshot_space(node, record)
    if remote:
        await asyncio.to_thread(node.snapshots.check)  # the remote store, if any, is reachable
        await node.share_template_of(record)
    # runsc saves what programs inside do with the network: listening servers and connections
    # inside the sandbox resume as they were; a connection over its interface is cut at the
    # save (--net-disconnect-ok), so the proxy ends its own first, cleanly. Only a connection
    # still being opened cannot be saved: _checkpoint waits for those.
    record.state = "pausing"
    node.tell_destroyed(sandbox_id)
    slot = node.pool.range.slot(record.slot_index)
    staging = await asyncio.to_thread(node.snapshots.staging, key)
    try:
        await _checkpoint(node, record, slot, staging / "checkpoint",
                          compress=node.snapshots.compressed(key))  # fmt: skip
    except BaseException as exc:
        await asyncio.to_thread(node.snapshots.discard, staging)
        if await asyncio.shield(_thaw(node, record, slot)):
            record.state = "running"
            if isinstance(exc, asyncio.CancelledError):  # running as before: the stop goes on
                raise
            if isinstance(exc, CheckpointFailed):
                hint = "; ".join(filter(None, ["it keeps running, unchanged", exc.hint]))
                raise CannotSave(f"sandbox {sandbox_id} could not be saved: {exc.message}",
                                 hint) from None  # fmt: skip
            raise RuntimeFailure(f"{doing} sandbox {sandbox_id} failed: {exc}",
                                 "it keeps running, unchanged") from None  # fmt: skip
        if isinstance(exc, asyncio.CancelledError):
            raise
        # The checkpoint stopped it and did not finish: what was in memory is lost.
        node.record_event(record, f"{doing} failed after the sandbox was stopped: {exc}")
        await node.destroy(record)
        lost = "the sandbox was stopped and could not be saved"
        raise RuntimeFailure(f"{doing} sandbox {sandbox_id} failed: {exc}", lost) from None
    return staging


async def seal(
    node: Node, record: SandboxRecord, key: str, staging: Path, *, remote: bool = True,
    mode: str = "full",
) -> Snapshot:  # fmt: skip
    """The checkpoint in `staging` as the snapshot `key` (snapshots.py: checksummed, fsync'ed,
    stored remotely first if `remote` and there is a store, then renamed into place)."""
    version = node.rt().probe.runsc_version
    return await asyncio.to_thread(node.snapshots.commit, key, staging, record.to_json(), version,
                                   remote=remote, mode=mode)  # fmt: skip


async def _mark_and_seal(node: Node, record: SandboxRecord, staging: Path) -> Snapshot:
    """Seal a pause's checkpoint, marked first as whole: a crash before the seal is done
    leaves it for the next start to seal (SnapshotStore.sweep_staging)."""
    await asyncio.to_thread(node.snapshots.mark_checkpointed, staging, record.to_json(),
                            node.rt().probe.runsc_version)  # fmt: skip
    # Its container is no longer one to adopt: runsc would call it running after a `runsc
    # resume`, with nothing running inside (seen after a crash here).
    node.records.drop(record.container_id)
    return await seal(node, record, record.sandbox_id, staging)


async def start_again(node: Node, record: SandboxRecord, image: Path, doing: str) -> SandboxRecord:
    """After a checkpoint that was not a pause: the same sandbox (id, token, end time) as a new
    incarnation from `image`, at once; the caller holds its lock. Meanwhile the sandbox stays
    the node's, `pausing` (the proxy holds its requests). If the restore fails it has ended,
    and the error says so."""
    sandbox_id = record.sandbox_id
    teardown = await node.stop_incarnation(record)
    if not node.pool.has_room:  # a full node: the slot it had is the one it gets again
        await asyncio.gather(teardown, return_exceptions=True)
    # The time it had left; at least a while, so that its caller can still reach it.
    timeout_s = min(max(AUTO_PAUSE_RETRY_S, round(record.end_at - time.time())),
                    node.settings.max_timeout_s)  # fmt: skip
    try:
        steps = Steps(f"restore of {sandbox_id} after {doing} it")
        return await _restore_record(node, record, image, timeout_s, steps, again=True)
    except BaseException as err:
        node.forget(record)
        node.record_event(record, f"{doing} stopped it, and restoring it failed: {err}")
        lost = "the sandbox was stopped and could not be restored"
        raise RuntimeFailure(f"{doing} sandbox {sandbox_id} failed: {err}", lost) from None


async def resume_sandbox(
    node: Node, sandbox_id: str, timeout_s: int, *, reboot: bool = False,
    source: ObjectStore | None = None,
) -> SandboxRecord:  # fmt: skip
    """Restore a paused sandbox from its verified snapshot, with a new timeout. A failed resume
    leaves the snapshot as it was, ready for another try. A filesystem-only snapshot, or any
    with `reboot`, starts the template afresh with the sandbox's files (E2B's
    `on_resume="reboot"`): from a full one, its files are first taken from it, restored."""
    if sandbox_id in node.sandboxes:
        raise Conflict(f"sandbox {sandbox_id!r} is already running")
    runtime = node.rt()
    async with node.lock(sandbox_id):
        if sandbox_id in node.sandboxes:  # resumed meanwhile (by a call that held the lock)
            raise Conflict(f"sandbox {sandbox_id!r} is already running")
        timeout_s = node.timeout(timeout_s)  # a bad timeout before any snapshot I/O
        steps = Steps(f"resume of {sandbox_id}")
        # No wait for the paused incarnation's `runsc delete`: this one gets its own container
        # id and slot (see Node.restore). The snapshot is verified (or fetched) outside the
        # start limit: a long download must not hold up other creates.
        snapshot = await load_snapshot(node, sandbox_id, runtime.probe.runsc_version, source)
        try:
            record = SandboxRecord.from_json(snapshot.record)
            steps.done("snapshot loaded")
            restored = await _restore_record(node, record, snapshot, timeout_s, steps)
        finally:
            await asyncio.to_thread(node.snapshots.release, snapshot)
        if reboot and snapshot.mode != file_snapshots.MODE:
            steps = Steps(f"reboot of {sandbox_id}")
            try:
                await _pause_files(node, restored)
            except BaseException:
                # Its files could not be taken: the full snapshot is still whole, and the
                # sandbox stays paused on it (not running, which the catalog would not know).
                await asyncio.shield(node.destroy(restored))
                raise
            snapshot = await load_snapshot(node, sandbox_id, runtime.probe.runsc_version)
            try:
                restored = await _restore_record(node, record, snapshot, timeout_s, steps)
            finally:
                await asyncio.to_thread(node.snapshots.release, snapshot)
    log.info("sandbox %s resumed", sandbox_id)
    return restored


async def load_snapshot(node: Node, key: str, runsc_version: str,
                        source: ObjectStore | None = None) -> Snapshot:  # fmt: skip
    """SnapshotStore.load in a thread. If the caller is cancelled meanwhile, what the load
    rebuilt is released once it is done, not left on disk until the next start."""
    loading = asyncio.ensure_future(
        asyncio.to_thread(node.snapshots.load, key, runsc_version, source)
    )
    try:
        return await asyncio.shield(loading)
    except asyncio.CancelledError:

        def release(done: asyncio.Future[Snapshot]) -> None:
            if not done.cancelled() and done.exception() is None:
                node.snapshots.release(done.result())

        loading.add_done_callback(release)
        raise


async def _restore_record(
    node: Node, record: SandboxRecord, image: Path | Snapshot, timeout_s: int, steps: Steps,
    *, again: bool = False,
) -> SandboxRecord:  # fmt: skip
    """A new incarnation of a sandbox from a checkpoint or snapshot of it, on the template
    build it was created from, once a start slot is free (or at once: Node.restore_in_turn)."""
    template = await node.template_build(record.template, record.build_id)
    resources = Resources(record.memory_mb, record.cpus, record.pids, record.disk_mb)
    files = None
    if isinstance(image, Snapshot):
        if image.mode == file_snapshots.MODE:  # the template afresh, the files laid over it
            files, image = image.checkpoint, template.checkpoint
        else:
            image = image.checkpoint
    return await node.restore_in_turn(resume_request(record), template, image, resources,
                                      timeout_s, steps, again=again, files=files)  # fmt: skip


MEMORY_CALM_S = 15.0  # how long a pause waits for the memory guard to stop a runaway process


async def _checkpoint(
    node: Node, record: SandboxRecord, slot: Slot, image: Path, *, compress: bool
) -> None:
    """Save the sandbox into `image`, stopping it. New connections are refused meanwhile, and
    the save waits for the handshakes under way to end (handshakes.py)."""
    runtime = node.rt()
    # A frozen init cannot free memory: a runaway process is killed first, or the pause waits.
    if not await node.guards.calm(record.container_id, MEMORY_CALM_S):
        raise CheckpointFailed(
            f"a process is using all of the sandbox's {record.memory_mb} MiB and is being killed",
            "pause again in a moment",
        )
    await firewall.refuse_new_connections(slot)
    await runtime.pause(record.container_id)
    node.guards.frozen_for_save(record.container_id)
    deadline = time.monotonic() + HANDSHAKE_WAIT_S
    while opening := await handshakes.under_way(slot):
        if time.monotonic() > deadline:
            raise CheckpointFailed(
                f"a TCP connection is still being opened ({', '.join(opening)}) and this runsc "
                "cannot save one mid-handshake",
                "pause again once it is open or has failed",
            )
        await asyncio.sleep(HANDSHAKE_POLL_S)
    await runtime.checkpoint(record.container_id, image, compress=compress)


async def _put_back(
    node: Node, record: SandboxRecord, staging: Path, exc: Exception, doing: str
) -> Snapshot:
    """The checkpoint stopped the sandbox and is whole in `staging`, but sealing it failed (the
    remote store refused it, the disk filled): restore the sandbox from it, so that the pause
    fails with the sandbox running as before (same id, memory, files), and no snapshot is kept
    anywhere. If it cannot be restored either, the checkpoint is its last copy: kept on this
    node's disk alone, it is the sandbox's snapshot after all (returned: the pause happened)."""
    try:
        await start_again(node, record, staging / "checkpoint", doing)
    except RuntimeFailure as err:
        try:
            snapshot = await seal(node, record, record.sandbox_id, staging, remote=False)
        except Exception:
            await asyncio.to_thread(node.snapshots.discard, staging)
            raise RuntimeFailure(f"{doing} sandbox {record.sandbox_id} failed: {exc}",
                                 err.hint) from None  # fmt: skip
        log.warning("%s %s: the snapshot could not be stored (%s) nor the sandbox restored "
                    "(%s); it is paused with its snapshot on this node's disk only", doing,
                    record.sandbox_id, exc, err)  # fmt: skip
        return snapshot
    await asyncio.to_thread(node.snapshots.discard, staging)
    log.warning("%s %s failed (%s); it was restored and keeps running", doing,
                record.sandbox_id, exc)  # fmt: skip
    raise RuntimeFailure(f"{doing} sandbox {record.sandbox_id} failed: {exc}",
                         "it keeps running, restored from its checkpoint; no snapshot was "
                         "kept") from None  # fmt: skip


def _check_snapshot_space(node: Node, record: SandboxRecord) -> None:
    """A checkpoint that runs out of disk may take the sandbox down with it: refuse up front
    unless the snapshot fits even at its largest (all of the sandbox's memory, and every file
    written to its disk; twice that for a chunked one: the image, then its new chunks)."""
    stats = memory_stats(record.container_id)
    written = disk.usage(node.records.container_dir(record.container_id))
    image = (stats.usage_bytes if stats else record.memory_mb << 20) + (
        written[0] if written else record.disk_mb << 20  # the writable layer's files
    )
    copies = 2 if node.snapshots.chunked(record.sandbox_id) else 1
    need = copies * image + SNAPSHOT_HEADROOM
    free = shutil.disk_usage(node.snapshots.root).free
    if free < need:
        raise CannotSave(
            f"not enough disk space to pause sandbox {record.sandbox_id}: {free >> 20} MiB free "
            f"in {node.snapshots.root}, up to {need >> 20} MiB needed",
            "free some disk space and pause again; the sandbox keeps running",
        )


async def _thaw(node: Node, record: SandboxRecord, slot: Slot) -> bool:
    """After a pause that did not happen: unfreeze the sandbox and let it connect again. False
    if the sandbox is gone (a failed checkpoint may have ended it)."""
    runtime = node.rt()
    await runtime.resume(record.container_id)  # False as well when it was not frozen
    state = await runtime.state(record.container_id)
    if state is None or state.status != "running":
        return False
    node.guards.arm(runtime, record.sandbox_id, record.container_id, record.memory_mb)
    try:
        await node.apply_egress(slot, record.rules)
    except Exception:
        log.exception("could not let sandbox %s connect again", record.sandbox_id)
    return True

"""Snapshots of running sandboxes, and new sandboxes started from them: a team's snapshots
(create one, then create sandboxes from it) and forks (one snapshot, N children at once).

A snapshot is a checkpoint like a pause's, stored the same way (snapshots.py); the sandbox it
came from is started again from it at once, with its id, token and end time, while the
snapshot is sealed (checksummed, fsync'ed, uploaded), so that it stops only for the checkpoint
and that restore. The caller has its snapshot once it is sealed: a restore takes longer than
the checkpoint (this runsc stops a sandbox to checkpoint it), and whoever snapshots a sandbox
to start others from it need not wait for it. A sandbox started from a snapshot is a new sandbox
(new id and token) with the source's memory, processes and files, on the template build the
source was created from.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING

from vivarium.errors import RuntimeFailure, VivariumError
from vivarium.node import file_snapshots
from vivarium.node.pause import (
    capture_files,
    checkpoint_sandbox,
    load_snapshot,
    seal,
    start_again,
)
from vivarium.node.records import SandboxRecord
from vivarium.node.request import CreateRequest, mounts_of
from vivarium.node.snapshots import ObjectStore, Snapshot
from vivarium.node.steps import Steps
from vivarium.runtime.bundle import Resources

if TYPE_CHECKING:
    from vivarium.node.node import Node

log = logging.getLogger(__name__)

DOING = "snapshotting"


async def snapshot_sandbox(
    node: Node, sandbox_id: str, key: str, *, remote: bool, memory: bool = True
) -> Snapshot:
    """Save the running sandbox as the snapshot `key`, and start it again from the checkpoint
    while the snapshot is sealed, so that it is stopped only for the checkpoint and that
    restore. Returns once the snapshot is sealed, perhaps before the sandbox runs again: its
    lock is held until it does (the proxy holds its requests meanwhile), so whatever the caller
    does with it next waits for that. If the checkpoint fails it keeps running unchanged; if
    only sealing fails, it runs on and no snapshot is kept; if only starting it again fails,
    the snapshot is still made (it holds everything the sandbox had) and the sandbox's end is
    an event, as when one dies."""
    if not memory:
        async with node.locked(sandbox_id) as record:  # its files, read while it runs on
            staging = await capture_files(node, record, key)
            try:
                return await seal(node, record, key, staging, remote=remote,
                                  mode=file_snapshots.MODE)  # fmt: skip
            except BaseException:
                await asyncio.to_thread(node.snapshots.discard, staging)
                raise
    sealed: asyncio.Future[Snapshot] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(_snapshot_and_restart(node, sandbox_id, key, remote, sealed))
    node.restarts.add(task)
    task.add_done_callback(node.restarts.discard)
    snapshot = await asyncio.shield(sealed)
    log.info("sandbox %s saved as %s (%d MiB)", sandbox_id, key, snapshot.size >> 20)
    return snapshot


async def _snapshot_and_restart(
    node: Node, sandbox_id: str, key: str, remote: bool, sealed: asyncio.Future[Snapshot]
) -> None:
    """snapshot_sandbox's work: `sealed` gets the snapshot (or why there is none) as soon as
    it is known; the sandbox's lock is held until it runs again."""

    def outcome(result: Snapshot | BaseException) -> None:
        if sealed.done():
            return
        if isinstance(result, BaseException):
            sealed.set_exception(result)
        else:
            sealed.set_result(result)

    try:
        async with node.locked(sandbox_id) as record:
            staging = await checkpoint_sandbox(node, record, key, DOING, remote=remote)
            # Side by side: the restore reads the checkpoint under a name of its own, since
            # sealing renames the staging directory (one after the other if it cannot).
            try:
                image = await asyncio.to_thread(node.snapshots.linked_image, staging)
            except OSError as exc:
                log.warning("restoring %s before sealing its snapshot: %s", sandbox_id, exc)
                await _restart(node, record, staging / "checkpoint", key)
                outcome(await _sealed(node, record, key, staging, remote))
                return
            restarting = asyncio.create_task(_restart(node, record, image, key))
            try:
                outcome(await _sealed(node, record, key, staging, remote))
            finally:
                await asyncio.gather(restarting, return_exceptions=True)
                await asyncio.to_thread(node.snapshots.discard, image)
    except BaseException as exc:
        outcome(exc)
        if not isinstance(exc, Exception):
            raise


async def _sealed(node: Node, record: SandboxRecord, key: str, staging: Path,
                  remote: bool) -> Snapshot | BaseException:  # fmt: skip
    """The snapshot sealed, or the error that says it was not (its staging removed)."""
    try:
        return await seal(node, record, key, staging, remote=remote)
    except Exception as exc:
        await asyncio.to_thread(node.snapshots.discard, staging)
        if isinstance(exc, VivariumError):
            return exc
        return RuntimeFailure(f"snapshot of sandbox {record.sandbox_id} not stored: {exc}",
                              "it keeps running; take the snapshot again")  # fmt: skip


async def _restart(node: Node, record: SandboxRecord, image: Path, key: str) -> None:
    try:
        await start_again(node, record, image, DOING)
    except Exception as exc:  # start_again recorded its end as an event
        log.error("sandbox %s ended while its snapshot %s was taken: %s", record.sandbox_id,
                  key, exc)  # fmt: skip


async def start_from_snapshot(node: Node, req: CreateRequest, key: str,
                              source: ObjectStore | None = None) -> SandboxRecord:  # fmt: skip
    """A new sandbox restored from the snapshot `key`: the source's memory, processes, files and
    resources; the request's id, token, environment and timeout. The snapshot stays as it was
    (several may start from it at once, and deleting it waits for them). `source`: another
    node's part of the store, which holds it (its node is draining or lost): it is fetched,
    and this node's copy dropped once the sandboxes starting from it have started."""
    timeout_s = node.timeout(req.timeout_s)
    try:
        with node.snapshot_in_use(key):
            return await _start(node, req, key, source, timeout_s)
    finally:
        if source is not None:
            node.drop_copy(key)


async def _start(node: Node, req: CreateRequest, key: str, source: ObjectStore | None,
                 timeout_s: int) -> SandboxRecord:  # fmt: skip
    version = node.rt().probe.runsc_version
    snapshot = await load_snapshot(node, key, version, source)
    origin = SandboxRecord.from_json(snapshot.record)
    # envd keeps the source's variables (they are in the checkpoint); the request's add to
    # them. Its volume mounts are in the checkpoint too: the same volumes go in the hub.
    req = replace(req, env_vars={**origin.env_vars, **(req.env_vars or {})},
                  volume_mounts=mounts_of(origin))  # fmt: skip
    template = await node.template_build(origin.template, origin.build_id)
    resources = Resources(origin.memory_mb, origin.cpus, origin.pids, origin.disk_mb)
    steps = Steps(f"create from snapshot {key}")
    # A filesystem-only snapshot: the template afresh, with the source's files laid over it.
    files = snapshot.checkpoint if snapshot.mode == file_snapshots.MODE else None
    image = template.checkpoint if files is not None else snapshot.checkpoint
    try:
        return await node.restore_in_turn(req, template, image, resources, timeout_s, steps,
                                          files=files)  # fmt: skip
    finally:
        await asyncio.to_thread(node.snapshots.release, snapshot)

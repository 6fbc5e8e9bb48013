"""Snapshots of running sandboxes, and new sandboxes started from them: a team's snapshots
(create one, then create sandboxes from it) and forks (one snapshot, N children at once).

A snapshot is a checkpoint like a pause's, stored the same way (snapshots.py); the sandbox it
came from is started again from it at once, with its id, token and end time, before the
snapshot is sealed (checksummed, fsync'ed, uploaded), so that it stops only for the checkpoint
and that restore. A sandbox started from a snapshot is a new sandbox
(new id and token) with the source's memory, processes and files, on the template build the
source was created from.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
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
from vivarium.node.snapshots import Snapshot
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
    restore. If the checkpoint fails it keeps running unchanged; if only sealing fails, it runs
    on and no snapshot is kept; if only starting it again fails, the snapshot is still made (it
    holds everything the sandbox had) and the sandbox's end is an event, as when one dies."""
    async with node.locked(sandbox_id) as record:
        if not memory:  # its files, read while it runs on (node/file_snapshots.py)
            staging = await capture_files(node, record, key)
            try:
                return await seal(node, record, key, staging, remote=remote,
                                  mode=file_snapshots.MODE)  # fmt: skip
            except BaseException:
                await asyncio.to_thread(node.snapshots.discard, staging)
                raise
        staging = await checkpoint_sandbox(node, record, key, DOING, remote=remote)
        # Side by side: the restore reads the checkpoint under a name of its own, since
        # sealing renames the staging directory (one after the other if it cannot have one).
        try:
            image, linked = await asyncio.to_thread(node.snapshots.linked_image, staging), True
        except OSError as exc:
            log.warning("restoring %s before sealing its snapshot: %s", sandbox_id, exc)
            image, linked = staging / "checkpoint", False
        restarting = start_again(node, record, image, DOING)
        sealing = seal(node, record, key, staging, remote=remote)
        try:
            if linked:
                restarted, sealed = await asyncio.gather(restarting, sealing,
                                                         return_exceptions=True)  # fmt: skip
            else:  # sealing moves the checkpoint: one after the other
                (restarted,) = await asyncio.gather(restarting, return_exceptions=True)
                (sealed,) = await asyncio.gather(sealing, return_exceptions=True)
        finally:
            if linked:
                await asyncio.to_thread(node.snapshots.discard, image)
        if isinstance(restarted, BaseException):
            log.error("sandbox %s ended while its snapshot %s was taken: %s", sandbox_id, key,
                      restarted)  # fmt: skip
        if isinstance(sealed, BaseException):
            await asyncio.to_thread(node.snapshots.discard, staging)
            if isinstance(sealed, VivariumError):
                raise sealed
            raise RuntimeFailure(f"snapshot of sandbox {sandbox_id} not stored: {sealed}",
                                 "it keeps running; take the snapshot again") from None  # fmt: skip
        snapshot = sealed
    log.info("sandbox %s saved as %s (%d MiB)", sandbox_id, key, snapshot.size >> 20)
    return snapshot


async def start_from_snapshot(node: Node, req: CreateRequest, key: str) -> SandboxRecord:
    """A new sandbox restored from the snapshot `key`: the source's memory, processes, files and
    resources; the request's id, token, environment and timeout. The snapshot stays as it was
    (several may start from it at once, and deleting it waits for them)."""
    timeout_s = node.timeout(req.timeout_s)
    with node.snapshot_in_use(key):
        version = node.rt().probe.runsc_version
        snapshot = await load_snapshot(node, key, version)
        source = SandboxRecord.from_json(snapshot.record)
        # envd keeps the source's variables (they are in the checkpoint); the request's add to
        # them. Its volume mounts are in the checkpoint too: the same volumes go in the hub.
        req = replace(req, env_vars={**source.env_vars, **(req.env_vars or {})},
                      volume_mounts=mounts_of(source))  # fmt: skip
        template = node.templates.build(source.template, source.build_id)
        resources = Resources(source.memory_mb, source.cpus, source.pids, source.disk_mb)
        steps = Steps(f"create from snapshot {key}")
        # A filesystem-only snapshot: the template afresh, with the source's files laid over it.
        files = snapshot.checkpoint if snapshot.mode == file_snapshots.MODE else None
        image = template.checkpoint if files is not None else snapshot.checkpoint
        try:
            return await node.restore_in_turn(req, template, image, resources, timeout_s, steps,
                                              files=files)  # fmt: skip
        finally:
            await asyncio.to_thread(node.snapshots.release, snapshot)

"""The node's background round: sandboxes past their timeout are killed or paused, those whose
container stopped on its own (out of memory, crash) are cleaned up with the reason, and the
chunks of deleted snapshots are collected."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from vivarium.errors import NotFound
from vivarium.node.pause import AUTO_PAUSE_RETRY_S, pause_sandbox
from vivarium.node.records import SandboxRecord
from vivarium.runtime.cgroups import memory_stats, pids_limit_hits
from vivarium.telemetry import timed

if TYPE_CHECKING:
    from vivarium.node.node import Node

log = logging.getLogger(__name__)

INTERVAL_S = 0.5
LIVENESS_EVERY = 4  # rounds between checks that every container still runs
COLLECT_EVERY = 60  # rounds between collections of the chunks deleted snapshots left


class Reaper:
    def __init__(self, node: Node) -> None:
        self.node = node
        # Containers (not sandboxes: a pause or snapshot gives a sandbox a new one) that looked
        # dead in the last check.
        self._suspects: set[str] = set()

    async def run(self) -> None:
        tick = 0
        while True:
            await asyncio.sleep(INTERVAL_S)
            tick += 1
            if tick % LIVENESS_EVERY == 0:
                try:
                    await self.check_alive()
                except Exception:
                    log.exception("liveness check failed")
            if tick % COLLECT_EVERY == 0:
                self.node.collect_chunks_soon()
            now = time.time()
            for record in [r for r in self.node.sandboxes.values() if r.end_at <= now]:
                await self.expire(record)

    async def check_alive(self) -> None:
        """Clean up sandboxes whose container stopped on its own, and say why."""
        node = self.node
        runtime = node.rt()
        suspects, self._suspects = self._suspects, set()
        running = {c.id for c in await runtime.list() if c.status == "running"}
        node.warm.prune(running)
        for record in [r for r in node.sandboxes.values() if r.container_id not in running]:
            lock = node.lock(record.sandbox_id)
            if lock.locked():
                continue  # being created, killed, paused or snapshotted: its container changes
            # `runsc list` can miss a container whose state file is being rewritten (and the
            # list may predate a new incarnation): ask it directly, and act only when the same
            # container looked dead in two checks in a row.
            state = await runtime.state(record.container_id)
            if state is not None and state.status == "running":
                continue
            if record.container_id not in suspects:
                self._suspects.add(record.container_id)
                continue
            if lock.locked():
                continue
            async with lock:
                current = node.sandboxes.get(record.sandbox_id)
                if current is None or current.container_id != record.container_id:
                    continue  # gone, or started again in another container meanwhile
                stats = memory_stats(record.container_id)
                if stats and stats.oom_kills:
                    reason = f"out of memory: exceeded its {record.memory_mb} MiB limit"
                elif pids_limit_hits(record.container_id):
                    reason = f"hit its limit of {record.pids} processes (fork bomb?)"
                else:
                    reason = "stopped unexpectedly (its init process exited)"
                node.record_event(record, reason)
                await node.destroy(record)

    async def expire(self, record: SandboxRecord) -> None:
        node = self.node
        if record.on_timeout == "pause":
            try:
                async with node.locked(record.sandbox_id) as current:
                    if current.end_at > time.time():  # given more time meanwhile (a snapshot)
                        return
                    log.info("sandbox %s timed out; pausing it", record.sandbox_id)
                    with timed("auto_pause"):
                        snapshot = await pause_sandbox(node, current,
                                                       memory=current.pause_memory)  # fmt: skip
            except NotFound:
                return
            except Exception:
                log.exception("auto-pause of %s failed", record.sandbox_id)
                if record.sandbox_id in node.sandboxes:
                    record.end_at = time.time() + AUTO_PAUSE_RETRY_S  # try again later
                return
            if node.on_paused is not None:
                node.on_paused(record.sandbox_id, snapshot)
            return
        log.info("sandbox %s timed out; killing it", record.sandbox_id)
        try:
            await node.kill(record.sandbox_id)
        except NotFound:
            return
        except Exception:
            log.exception("could not kill expired sandbox %s", record.sandbox_id)
            return
        node.tell_ended(record.sandbox_id, "timeout")

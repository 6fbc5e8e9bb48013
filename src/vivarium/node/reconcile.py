"""What a starting node finds: sandboxes still running from before a restart or crash are
adopted; everything else left over (containers, records, directories) is removed."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass, field

from vivarium.node.records import RecordStore, SandboxRecord
from vivarium.node.warm import CONTAINER_PREFIX as WARM_PREFIX
from vivarium.runtime import disk
from vivarium.runtime.runsc import Runsc

log = logging.getLogger(__name__)


@dataclass
class Found:
    adopted: dict[str, SandboxRecord] = field(default_factory=dict)  # by sandbox id
    lost: list[tuple[SandboxRecord, str]] = field(default_factory=list)  # with what happened


async def reconcile(runtime: Runsc, records: RecordStore) -> Found:
    found = Found()
    saved, strays = records.load_all()
    containers = {c.id: c for c in await runtime.list()}
    # Newest incarnation first: an older record of the same sandbox (never expected: a record
    # goes before the next incarnation starts) is only removed, never reported.
    for record in sorted(saved, key=lambda r: r.started_at, reverse=True):
        container = containers.pop(record.container_id, None)
        # Frozen by a pause that the restart cut short: thaw it. That fails if its checkpoint
        # had already ended it (runsc still says "paused" then).
        paused = container is not None and container.status == "paused"
        if paused and await runtime.resume(record.container_id):
            container = await runtime.state(record.container_id) or container
        if record.sandbox_id not in found.adopted:
            if container is not None and container.status == "running":
                found.adopted[record.sandbox_id] = record
                continue
            state = container.status if container else "missing"
            found.lost.append((record, f"not running after node restart (container {state})"))
        if container is not None:  # only by its exact id: runsc would take a prefix
            await runtime.delete(record.container_id)
        await asyncio.to_thread(disk.discard, records.container_dir(record.container_id))
    for cid in containers:
        if cid.startswith(f"{WARM_PREFIX}-"):  # kept warm by the previous run: not adopted
            log.info("removing warm sandbox %s of the previous run", cid)
        else:
            log.warning("removing orphaned container %s", cid)
        await runtime.delete(cid)
    for stray in strays:
        await asyncio.to_thread(disk.discard, stray)
    return found

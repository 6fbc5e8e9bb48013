"""A container restored from a checkpoint and running, before it is any sandbox: the part of a
start that needs no identity. A create goes on to hand it over at once; the warm pool (warm.py)
keeps some waiting."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from vivarium.network.addressing import Slot
from vivarium.runtime.bundle import Resources


@dataclass
class Launched:
    container_id: str
    directory: Path  # the container's files and disk (records.container_dir)
    slot: Slot
    resources: Resources
    internet: bool  # whether its egress is open (or being opened by `egress`)
    egress: asyncio.Task[None] | None  # opening its egress, if asked at launch
    held_back: bool = False  # the disk's slack already taken back (runtime/disk.py)
    files: bool = False  # a filesystem-only snapshot waits in its hub (node/file_snapshots.py)
    fresh: bool = False  # restored from its template's checkpoint: nothing of a sandbox in it

"""Disks made ahead of time, so that a create or resume does not wait for mkfs and a loop mount
(~30 ms, runtime/disk.py) on its way to `runsc restore`.

A ready disk is a directory holding a fresh image, already mounted. Taking one renames that
directory into the container's place (a directory holding a mount point can be renamed; the
mount moves with it). Only the node's default size is kept ready: a template with a size of its
own gets its disk made on the spot. A disk is never reused: each is made, handed out once, and
removed with its container.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from pathlib import Path

from vivarium.runtime import disk

log = logging.getLogger(__name__)


class DiskPool:
    def __init__(self, root: Path, size_mb: int, ready: int) -> None:
        self.root = root
        self.size_mb = size_mb
        self.ready = ready
        self._free: list[Path] = []
        self._filling: asyncio.Task[None] | None = None

    async def start(self) -> None:
        """Remove what an earlier run left (it may be half made), then make the ready ones."""
        await asyncio.to_thread(self._clear)
        self._fill_soon()

    async def stop(self) -> None:
        if self._filling:
            self._filling.cancel()
            await asyncio.gather(self._filling, return_exceptions=True)
        self._free.clear()
        await asyncio.to_thread(self._clear)

    async def take(self, directory: Path, size_mb: int) -> Path:
        """A fresh disk of `size_mb` for the container whose files go in `directory` (which
        must not exist yet); returns where runsc's filestore goes."""
        try:
            if size_mb == self.size_mb and self._free:
                entry = self._free.pop()
                try:
                    # A rename waits for the journal on a busy disk: not in the event loop.
                    await asyncio.to_thread(entry.rename, directory)
                    return disk.mount_point(directory)
                except OSError:
                    log.warning("could not use ready disk %s; making one", entry, exc_info=True)
                    await asyncio.to_thread(disk.discard, entry)
            return await asyncio.to_thread(disk.create, directory, size_mb << 20)
        finally:
            self._fill_soon()

    @property
    def filling(self) -> bool:
        return self._filling is not None and not self._filling.done()

    def _fill_soon(self) -> None:
        if len(self._free) < self.ready and (self._filling is None or self._filling.done()):
            self._filling = asyncio.create_task(self._fill())

    async def _fill(self) -> None:
        while len(self._free) < self.ready:
            entry = self.root / uuid.uuid4().hex
            try:
                await asyncio.to_thread(disk.create, entry, self.size_mb << 20)
            except asyncio.CancelledError:
                await asyncio.to_thread(disk.discard, entry)
                raise
            except Exception:
                # A restore makes its own then; the next take tries again.
                log.warning("could not make a ready disk", exc_info=True)
                await asyncio.to_thread(disk.discard, entry)
                return
            self._free.append(entry)

    def _clear(self) -> None:
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        for entry in self.root.iterdir():
            disk.discard(entry)

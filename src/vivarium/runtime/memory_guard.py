"""A runaway process loses only itself: the guest-OOM a VM would give, built from host cgroups.

gVisor has no OOM killer of its own: the sandbox's memory is charged to one host cgroup, and the
host kernel at that cgroup's limit kills the whole sandbox (the sentry). So the limit a sandbox
is given (its `memory_mb`) is a threshold, and the cgroup's hard limit sits `headroom` above it.
When usage crosses the threshold the guard signals the sandbox's init (SIGUSR1), which kills
the process group using the most memory inside (guest/init.c); it keeps doing so every
`RETRY_S` while usage stays above, since a bomb may have several culprits. The headroom
must absorb what is allocated meanwhile: measured on this machine kind, a single bomb never
came near 256 MiB past the threshold, four at once came within 512 MiB.

What counts is the sandbox's working set: the cgroup's usage less the host page cache of its
disk (file pages, which the kernel reclaims at the limit rather than kill anything). gVisor's
own memory is a memfd, so the sandbox's processes show as shmem, which does count. cgroup v1
delivers a crossing of the usage on an eventfd (memory.usage_in_bytes through
cgroup.event_control); while the usage stays above, page cache or not, the guard polls the
working set. cgroup v2 has no such event: there the guard always polls.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

from vivarium.runtime.bundle import cgroup_path
from vivarium.runtime.cgroups import CGROUP_ROOT

log = logging.getLogger(__name__)

MIN_HEADROOM = 512 << 20
RETRY_S = 0.15  # after a signal, how long usage may take to drop before the next one
MAX_SIGNALS = 40  # per crossing: a process that cannot be killed must not make us spin
POLL_S = 0.02  # while the usage is above the threshold (always, under cgroup v2)


def headroom(limit_bytes: int) -> int:
    return max(MIN_HEADROOM, limit_bytes // 4)


class MemoryGuard:
    """Watches one sandbox's cgroup. `reap` signals the sandbox's init; `on_reaped` is told the
    usage before and after each episode (for the sandbox's log)."""

    def __init__(
        self,
        container_id: str,
        limit_bytes: int,
        reap: Callable[[], Awaitable[None]],
        on_reaped: Callable[[int, int], None],
        root: Path = CGROUP_ROOT,
    ) -> None:
        self.limit = limit_bytes
        self._reap_signal = reap
        self._on_reaped = on_reaped
        rel = cgroup_path(container_id).lstrip("/")
        # The layout is fixed for the host: decided once, not on every read of the poll loop.
        self._v1 = (root / "memory" / rel).is_dir()
        self._dir = root / "memory" / rel if self._v1 else root / rel
        self._usage_file = self._dir / ("memory.usage_in_bytes" if self._v1 else "memory.current")
        self._file_keys = (
            ("total_active_file", "total_inactive_file") if self._v1
            else ("active_file", "inactive_file")
        )  # fmt: skip
        self._fds: list[int] = []
        self._episode: asyncio.Task[None] | None = None
        self._registering: asyncio.Future[int] | None = None

    def usage(self) -> int:
        """What the cgroup is charged, page cache included."""
        try:
            return int(self._usage_file.read_text())
        except (OSError, ValueError):
            return 0

    def working_set(self) -> int:
        """The usage less the page cache of files (the disk), which the kernel can drop."""
        try:
            stat = (self._dir / "memory.stat").read_text()
        except OSError:
            return 0
        fields = dict(line.split(" ", 1) for line in stat.splitlines() if " " in line)
        return self.usage() - sum(int(fields.get(key, 0)) for key in self._file_keys)

    def arm(self) -> None:
        """Raise the hard limit above the threshold and start watching (after start/restore:
        runsc sets the cgroup's limit from the spec, which says `limit`)."""
        hard = str(self.limit + headroom(self.limit))
        loop = asyncio.get_running_loop()
        if self._v1:
            (self._dir / "memory.limit_in_bytes").write_text(hard)
            event = os.eventfd(0, os.EFD_CLOEXEC | os.EFD_NONBLOCK)
            usage = os.open(self._usage_file, os.O_RDONLY | os.O_CLOEXEC)
            self._fds = [event, usage]
            loop.add_reader(event, self._crossed)
            # The kernel takes an RCU grace period to register a threshold (8-18 ms measured
            # here): in a worker thread, so that a create does not wait for it.
            control = f"{event} {usage} {self.limit}"
            self._registering = loop.run_in_executor(
                None, (self._dir / "cgroup.event_control").write_text, control
            )
            self._registering.add_done_callback(self._registered)
        else:
            (self._dir / "memory.max").write_text(hard)
            self._episode = loop.create_task(self._watch(forever=True))

    def _registered(self, registering: asyncio.Future[int]) -> None:
        if registering.cancelled() or not self._fds:  # disarmed meanwhile
            return
        if (failure := registering.exception()) is not None:
            log.warning("no memory threshold event for %s (%s): polling instead", self._dir,
                        failure)  # fmt: skip
            forever = True
        elif self.usage() >= self.limit:  # already above (a resumed sandbox): no crossing
            forever = False
        else:
            return
        if self._episode is None or self._episode.done():
            self._episode = asyncio.get_running_loop().create_task(self._watch(forever))

    def widen(self) -> None:
        """More room for a save: the frozen sandbox allocates nothing more, but the sentry's
        checkpoint does, and at the hard limit the kernel killed it mid-save (the sandbox was
        lost: seen with a memory bomb frozen near the limit on a loaded host). `arm` sets the
        usual limit again."""
        hard = str(self.limit + 2 * headroom(self.limit))
        (self._dir / ("memory.limit_in_bytes" if self._v1 else "memory.max")).write_text(hard)

    async def calm(self, timeout_s: float) -> bool:
        """Wait (at most `timeout_s`) until the working set is below the threshold, i.e. the
        guard has killed whatever was running away; False if it is still above."""
        deadline = time.monotonic() + timeout_s
        while self.working_set() >= self.limit:
            if time.monotonic() > deadline:
                return False
            await asyncio.sleep(POLL_S)
        return True

    def disarm(self) -> None:
        fds, self._fds = self._fds, []
        if fds:
            asyncio.get_running_loop().remove_reader(fds[0])
        if self._registering is not None and not self._registering.done():
            # The worker still writes these numbers: closed now, they could name another file.
            self._registering.add_done_callback(lambda _: _close(fds))
        else:
            _close(fds)
        if self._episode is not None:
            self._episode.cancel()

    def _crossed(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self._fds[0])  # either direction: _watch looks at the usage
        if self._episode is None or self._episode.done():
            self._episode = asyncio.get_running_loop().create_task(self._watch(forever=False))

    async def _watch(self, forever: bool) -> None:
        """Poll while the usage is above the threshold (or forever); contain when the working
        set is."""
        while forever or self.usage() >= self.limit:
            if self.working_set() >= self.limit:
                await self._contain()
            await asyncio.sleep(POLL_S)

    async def _contain(self) -> None:
        before = self.working_set()
        signals = 0
        while self.working_set() >= self.limit and signals < MAX_SIGNALS:
            try:
                await self._reap_signal()
            except Exception:
                log.exception("could not signal a sandbox's init to free memory")
            signals += 1
            deadline = time.monotonic() + RETRY_S
            while self.working_set() >= self.limit and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
        if signals:
            self._on_reaped(before, self.working_set())


def _close(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)

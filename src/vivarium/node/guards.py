"""The memory guard of every running container (runtime/memory_guard.py), armed while it runs
and disarmed before it is frozen or stopped."""

from __future__ import annotations

import logging

from vivarium.errors import RuntimeFailure
from vivarium.runtime.memory_guard import MemoryGuard
from vivarium.runtime.runsc import Runsc

log = logging.getLogger(__name__)


class Guards:
    def __init__(self) -> None:
        self._by_container: dict[str, MemoryGuard] = {}

    def arm(self, runtime: Runsc, sandbox_id: str, container_id: str, memory_mb: int) -> None:
        """Contain the sandbox's runaway processes from now on."""

        def reaped(before: int, after: int) -> None:
            log.warning("sandbox %s ran out of its %d MiB: its largest process was killed "
                        "(%d MiB in use, then %d MiB)", sandbox_id, memory_mb, before >> 20,
                        after >> 20)  # fmt: skip

        self.disarm(container_id)
        guard = MemoryGuard(container_id, memory_mb << 20,
                            lambda: runtime.signal_init(container_id, "USR1"), reaped)  # fmt: skip
        try:
            guard.arm()
        except OSError as exc:
            guard.disarm()
            hint = "check that the memory cgroup controller is available"
            raise RuntimeFailure(f"could not set the memory limit of {sandbox_id}: {exc}",
                                 hint) from exc  # fmt: skip
        self._by_container[container_id] = guard

    def disarm(self, container_id: str) -> None:
        guard = self._by_container.pop(container_id, None)
        if guard is not None:
            guard.disarm()

    async def calm(self, container_id: str, timeout_s: float) -> bool:
        """Whether the sandbox is below its memory threshold, waiting (at most `timeout_s`)
        for its guard, still watching, to kill a runaway process first."""
        guard = self._by_container.get(container_id)
        return guard is None or await guard.calm(timeout_s)

    def frozen_for_save(self, container_id: str) -> None:
        """The sandbox is frozen for a save: stop watching it, and give the save room above
        its hard limit (MemoryGuard.widen); `arm` again if it thaws."""
        guard = self._by_container.get(container_id)
        self.disarm(container_id)
        if guard is None:
            return
        try:
            guard.widen()
        except OSError as exc:  # the usual limit stays: the save may still fit
            log.warning("could not widen the memory limit of %s for a save: %s",
                        container_id, exc)  # fmt: skip

"""Coarse timers for idle sandboxes: what lets a 2-core host keep hundreds of them running.

runsc's systrap platform wakes every sentry every 400 µs for as long as it runs, to tune its
fast path (controlFastPath in gVisor's pkg/sentry/platform/systrap). With Go's scheduler around
each wakeup an idle sandbox costs ~50 ms of CPU a second: 100 idle sandboxes kept this 2-core
host 97% busy, and beside 199 of them `commands.run` took 1.3 s at p50 and 9 s at p95.

The kernel's timer slack lets it defer a thread's timed wakeups by up to the slack, to batch
them. With 20 ms on every host thread of an idle sandbox it costs 4–8 ms of CPU a second; the
same 199 sandboxes left the host 43% busy and answered in 0.16 s p50, 0.31 s p95. Wakeups by
events (a request arriving, a process exiting) are not deferred, but starting a process does
wait on timers: `commands.run("true")` takes ~60 ms instead of ~40 in a coarse sandbox.

So a sandbox is made precise again (the kernel's default slack) before anything is done with it:
the proxy forwarding a request, an operation of the node (pause, snapshot, kill, timeout), a
create claiming it from the warm pool. It also becomes precise when it uses more than
ACTIVE_CORES of CPU with nobody talking to it (a build left running; seen in the node's
periodic samples), and coarse again after IDLE_AFTER_S without either. Warm-pool sandboxes wait
coarse. Inside a coarse sandbox a sleep may end up to the slack late.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

from vivarium.node.metrics_history import INTERVAL_S as SAMPLE_INTERVAL_S
from vivarium.node.metrics_history import Sample
from vivarium.node.records import SandboxRecord
from vivarium.runtime.cgroups import DEFAULT_TIMER_SLACK_NS, set_timer_slack, thread_ids

log = logging.getLogger(__name__)

# Short: each sandbox a request made precise costs ~50 ms of CPU a second until it is coarse
# again. A sweep of one command into each of 200 idle sandboxes (4 at a time) kept ~100 of
# them precise with 10 s here, and its slowest answer took 3.9 s; with 1 s, 1.2 s.
IDLE_AFTER_S = 1.0
CHECK_S = 0.5
ACTIVE_CORES = 0.2  # an idle sandbox with precise timers uses ~0.05


class IdleTimers:
    def __init__(self, idle_slack_ns: int) -> None:
        self.idle_slack_ns = idle_slack_ns  # 0: timers stay precise
        self._coarse: set[str] = set()  # container ids whose threads have the idle slack
        self._busy_until: dict[str, float] = {}  # container id -> monotonic time
        self._held: Counter[str] = Counter()  # node operations under way, by container id
        # busy() runs on the event loop, check() in a thread: a decision and its write are one
        # step, or a sandbox being made precise for a request could be made coarse under it.
        self._lock = threading.Lock()

    @property
    def coarse(self) -> int:
        return len(self._coarse)

    def busy(self, container_id: str) -> None:
        """Something is done with the sandbox: precise timers, now (cheap unless coarse)."""
        with self._lock:
            self._busy_until[container_id] = time.monotonic() + IDLE_AFTER_S
            if container_id in self._coarse:
                self._set(container_id, DEFAULT_TIMER_SLACK_NS)

    @contextmanager
    def held(self, container_id: str) -> Iterator[None]:
        """Precise for as long as a node operation on the sandbox runs (a pause, an exec),
        however long it is quiet."""
        self.busy(container_id)
        self._held[container_id] += 1
        try:
            yield
        finally:
            self._held[container_id] -= 1
            if not self._held[container_id]:
                del self._held[container_id]
            self.busy(container_id)  # and IDLE_AFTER_S beyond

    def idle(self, container_id: str) -> None:
        """The sandbox waits with nothing to do (a warm one, one adopted at start): coarse
        timers now, or precise ones if the idle slack is off (a previous run's may be on)."""
        with self._lock:
            self._busy_until.pop(container_id, None)
            self._set(container_id, self.idle_slack_ns or DEFAULT_TIMER_SLACK_NS)

    def forget(self, container_id: str) -> None:
        """Its container is being removed."""
        with self._lock:
            self._coarse.discard(container_id)
            self._busy_until.pop(container_id, None)

    def check(self, running: list[tuple[str, float]]) -> None:
        """One pass over the running sandboxes, given as (container id, cores used lately)."""
        for container_id, cores in running:
            if cores > ACTIVE_CORES or container_id in self._held:
                self.busy(container_id)
                continue
            with self._lock:
                now = time.monotonic()
                # One first seen now (just started) had a last chance to be busy now.
                until = self._busy_until.setdefault(container_id, now + IDLE_AFTER_S)
                if self.idle_slack_ns and container_id not in self._coarse and now >= until:
                    self._set(container_id, self.idle_slack_ns)
        with self._lock:  # those removed while this pass ran were added back by it
            ids = {container_id for container_id, _ in running}
            for container_id in [c for c in self._busy_until if c not in ids]:
                del self._busy_until[container_id]
            for container_id in [c for c in self._coarse if c not in ids]:
                if not thread_ids(container_id):  # gone, not waiting in the warm pool
                    self._coarse.discard(container_id)

    async def run(
        self, records: Callable[[], list[SandboxRecord]],
        latest: Callable[[str], Sample | None],
    ) -> None:  # fmt: skip
        """check() every CHECK_S, with the CPU use of the node's periodic samples."""
        loop = asyncio.get_running_loop()
        # A thread of its own: behind a busy default executor the checks would come late.
        with ThreadPoolExecutor(1, thread_name_prefix="idle-timers") as checker:
            while True:
                await asyncio.sleep(CHECK_S)
                fresh_after = time.time() - 2 * SAMPLE_INTERVAL_S
                running = []
                for record in records():
                    sample = latest(record.sandbox_id)
                    cores = (sample.cpu_used_pct / 100 * record.cpus
                             if sample is not None and sample.ts >= fresh_after
                             else 0.0)  # fmt: skip
                    running.append((record.container_id, cores))
                try:
                    await loop.run_in_executor(checker, self.check, running)
                except Exception:
                    log.exception("adjusting idle sandboxes' timers failed")

    def _set(self, container_id: str, slack_ns: int) -> None:
        try:
            changed = set_timer_slack(container_id, slack_ns)
        except PermissionError as exc:  # no CAP_SYS_NICE (a node in an unprivileged container)
            if self.idle_slack_ns:
                log.warning("cannot set sandboxes' timer slack (%s): idle sandboxes cost ~50 ms "
                            "of CPU a second each", exc)  # fmt: skip
            self.idle_slack_ns = 0
            return
        if slack_ns == DEFAULT_TIMER_SLACK_NS or not changed:
            self._coarse.discard(container_id)
        else:
            self._coarse.add(container_id)

"""Each running sandbox's CPU, memory and disk, sampled every few seconds and kept for E2B's
`get_metrics(start, end)`.

Read on the host, from the sandbox's cgroup and disk, never by asking envd: a request into an
idle sandbox wakes its guest, which costs the sentry milliseconds each time, for every sandbox.
The figures are the ones its limits are enforced on: memory is all the sandbox costs the host
(its processes, the sentry, the page cache of its disk) against its memory limit; CPU is the
share of its CPUs used since the last sample.

Samples stay for the sandbox's life (paused included) up to MAX_SAMPLES, and for
`retention_s` after it is killed. They are the node's, in memory: a restart starts them anew.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from vivarium.node.records import SandboxRecord
from vivarium.runtime import cgroups, disk

log = logging.getLogger(__name__)

INTERVAL_S = 5.0
MAX_SAMPLES = 1440  # two hours at INTERVAL_S; older samples go first


@dataclass(frozen=True)
class Sample:
    ts: float
    cpu_count: int
    cpu_used_pct: float
    mem_used: int
    mem_total: int
    mem_cache: int
    disk_used: int
    disk_total: int

    def to_json(self) -> dict[str, float | int]:
        return {
            "ts": self.ts, "cpu_count": self.cpu_count, "cpu_used_pct": self.cpu_used_pct,
            "mem_used": self.mem_used, "mem_total": self.mem_total, "mem_cache": self.mem_cache,
            "disk_used": self.disk_used, "disk_total": self.disk_total,
        }  # fmt: skip


@dataclass
class _Series:
    samples: deque[Sample] = field(default_factory=lambda: deque(maxlen=MAX_SAMPLES))
    cpu: tuple[float, int] | None = None  # (when, ns used) at the last sample, for the rate


class MetricsHistory:
    def __init__(self, retention_s: float, directory_of: Callable[[str], Path]) -> None:
        self.retention_s = retention_s
        self._series: dict[str, _Series] = {}
        self._killed: dict[str, float] = {}
        self._directory_of = directory_of

    def sample(self, records: Iterable[SandboxRecord], now: float | None = None) -> None:
        """One sample of every running sandbox (blocking: cgroup and statvfs reads)."""
        now = time.time() if now is None else now
        running = set()
        for record in records:
            running.add(record.sandbox_id)
            series = self._series.setdefault(record.sandbox_id, _Series())
            try:
                taken = _read(record, series, now, self._directory_of(record.container_id))
            except OSError:  # its disk or cgroup going away under us: the others still count
                log.debug("no sample of %s", record.sandbox_id, exc_info=True)
                continue
            if taken is not None:
                series.samples.append(taken)
        for sandbox_id, series in list(self._series.items()):
            if sandbox_id in running:
                continue
            series.cpu = None  # a resumed sandbox is a new container: its counter starts anew
            killed = self._killed.get(sandbox_id)
            if killed is not None and now - killed > self.retention_s:
                del self._series[sandbox_id]
                del self._killed[sandbox_id]

    def killed(self, sandbox_id: str, now: float | None = None) -> None:
        """Its samples are kept for `retention_s` from now, then dropped."""
        if sandbox_id in self._series:
            self._killed[sandbox_id] = time.time() if now is None else now

    def now(self, record: SandboxRecord) -> Sample | None:
        """A sample taken now (blocking) for one answer, not kept: a page polling for current
        figures would otherwise crowd the history out of its MAX_SAMPLES."""
        series = self._series.setdefault(record.sandbox_id, _Series())
        return _read(record, series, time.time(), self._directory_of(record.container_id))

    def latest(self, sandbox_id: str) -> Sample | None:
        series = self._series.get(sandbox_id)
        return series.samples[-1] if series and series.samples else None

    def between(self, sandbox_id: str, start: float | None, end: float | None) -> list[Sample]:
        series = self._series.get(sandbox_id)
        if series is None:
            return []
        # Sorted: a sample taken on request (now()) may land beside the sampler's own.
        return sorted((s for s in series.samples
                       if (start is None or s.ts >= start) and (end is None or s.ts <= end)),
                      key=lambda s: s.ts)  # fmt: skip

    async def run(self, records: Callable[[], list[SandboxRecord]]) -> None:
        # A thread of its own: behind a busy default executor (disks being made, snapshots
        # copied) the samples would come late and sparse. A fixed cadence, not a fixed pause,
        # so a slow sample does not stretch the interval.
        loop = asyncio.get_running_loop()
        with ThreadPoolExecutor(1, thread_name_prefix="metrics") as sampler:
            due = loop.time()
            while True:
                try:
                    await loop.run_in_executor(sampler, self.sample, records())
                except Exception:
                    log.exception("sampling sandboxes' metrics failed")
                due = max(due + INTERVAL_S, loop.time())
                await asyncio.sleep(due - loop.time())


def _read(record: SandboxRecord, series: _Series, now: float, directory: Path) -> Sample | None:
    used_ns = cgroups.cpu_usage_ns(record.container_id)
    memory = cgroups.memory_stats(record.container_id)
    if used_ns is None or memory is None:  # its container is gone or not there yet
        return None
    pct = 0.0
    if series.cpu is not None and now > series.cpu[0]:
        elapsed_ns = (now - series.cpu[0]) * 1e9
        pct = max(0.0, min(100.0, 100.0 * (used_ns - series.cpu[1]) / (elapsed_ns * record.cpus)))
    series.cpu = (now, used_ns)
    written = disk.usage(directory)
    used, total = written if written is not None else (0, record.disk_mb << 20)
    return Sample(
        ts=now, cpu_count=max(1, round(record.cpus)), cpu_used_pct=round(pct, 2),
        mem_used=memory.usage_bytes, mem_total=record.memory_mb << 20,
        mem_cache=cgroups.memory_cache_bytes(record.container_id),
        disk_used=used, disk_total=total,
    )  # fmt: skip

"""A sandbox's host cgroup: memory use, whether the kernel OOM-killed it, its CPU weight, and
the timer slack of its threads.

runsc creates the cgroup from the spec's cgroupsPath (see bundle.cgroup_path); v1 (per-controller
hierarchies) and v2 (unified) hosts lay the files out differently.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from vivarium.runtime.bundle import RUNNING_CPU_SHARES, cgroup_path

CGROUP_ROOT = Path("/sys/fs/cgroup")


@dataclass(frozen=True)
class MemoryStats:
    usage_bytes: int
    limit_bytes: int
    oom_kills: int


def _read_int(path: Path) -> int:
    try:
        raw = path.read_text().strip()
    except OSError:
        return 0
    return int(raw) if raw.isdigit() else 0


def _read_keyed(path: Path, key: str) -> int:
    try:
        for line in path.read_text().splitlines():
            name, _, value = line.partition(" ")
            if name == key and value.strip().isdigit():
                return int(value)
    except OSError:
        pass
    return 0


def pids_limit_hits(container_id: str, root: Path = CGROUP_ROOT) -> int:
    """How often the sandbox hit its process limit (a fork bomb, typically)."""
    rel = cgroup_path(container_id).lstrip("/")
    for events in (root / "pids" / rel / "pids.events", root / rel / "pids.events"):
        if events.exists():
            return _read_keyed(events, "max")
    return 0


def memory_stats(container_id: str, root: Path = CGROUP_ROOT) -> MemoryStats | None:
    rel = cgroup_path(container_id).lstrip("/")
    v1 = root / "memory" / rel
    if v1.is_dir():
        return MemoryStats(
            usage_bytes=_read_int(v1 / "memory.usage_in_bytes"),
            limit_bytes=_read_int(v1 / "memory.limit_in_bytes"),
            # oom_kill appears in memory.oom_control on 4.13+; failcnt is the fallback signal.
            oom_kills=_read_keyed(v1 / "memory.oom_control", "oom_kill"),
        )
    v2 = root / rel
    if (v2 / "memory.current").exists():
        return MemoryStats(
            usage_bytes=_read_int(v2 / "memory.current"),
            limit_bytes=_read_int(v2 / "memory.max"),
            oom_kills=_read_keyed(v2 / "memory.events", "oom_kill"),
        )
    return None


def cpu_usage_ns(container_id: str, root: Path = CGROUP_ROOT) -> int | None:
    """CPU time the sandbox has used, all its host tasks together (sentry, gofer, platform)."""
    rel = cgroup_path(container_id).lstrip("/")
    v1 = root / "cpuacct" / rel / "cpuacct.usage"
    if v1.exists():
        return _read_int(v1)
    v2 = root / rel / "cpu.stat"
    if v2.exists():
        return _read_keyed(v2, "usage_usec") * 1000
    return None


def memory_cache_bytes(container_id: str, root: Path = CGROUP_ROOT) -> int:
    """Page cache charged to the sandbox (its disk's files, mostly): reclaimable."""
    rel = cgroup_path(container_id).lstrip("/")
    for path, key in ((root / "memory" / rel / "memory.stat", "total_cache"),
                      (root / rel / "memory.stat", "file")):  # fmt: skip
        if path.exists():
            return _read_keyed(path, key)
    return 0


def settle_cpu(container_id: str, root: Path = CGROUP_ROOT) -> bool:
    """Give a sandbox that is up the CPU weight of a running one (it started with more, see
    bundle.STARTING_CPU_SHARES); False if its cgroup is gone."""
    rel = cgroup_path(container_id).lstrip("/")
    # v2 has weights (1..10000), which runsc derives from the spec's shares as runc does.
    weight = 1 + ((RUNNING_CPU_SHARES - 2) * 9999) // 262142
    for path, value in ((root / "cpu" / rel / "cpu.shares", RUNNING_CPU_SHARES),
                        (root / rel / "cpu.weight", weight)):  # fmt: skip
        if path.exists():
            try:
                path.write_text(str(value))
            except OSError:
                return False
            return True
    return False


# The kernel's own default (prctl(2)); a thread made while a coarser slack was set has that as
# its "default", so precision is restored with this value, not by writing 0.
DEFAULT_TIMER_SLACK_NS = 50_000


def thread_ids(container_id: str, root: Path = CGROUP_ROOT) -> list[int]:
    """Every host thread of a sandbox (sentry, gofer, platform stubs); empty once it is gone."""
    rel = cgroup_path(container_id).lstrip("/")
    for tasks in (root / "cpuacct" / rel / "tasks", root / rel / "cgroup.threads"):
        try:
            return [int(tid) for tid in tasks.read_text().split()]
        except OSError:
            continue
    return []


def set_timer_slack(container_id: str, slack_ns: int, root: Path = CGROUP_ROOT) -> int:
    """Let the kernel defer the timed wakeups of every host thread of a sandbox by up to
    `slack_ns`, to batch them; threads they make later inherit it. Returns the threads changed:
    0 if the cgroup is gone. PermissionError without CAP_SYS_NICE."""
    done: set[int] = set()
    for _ in range(3):  # a thread made while the list was written is in the next read
        new = [tid for tid in thread_ids(container_id, root) if tid not in done]
        if not new:
            break
        for tid in new:
            done.add(tid)
            try:
                with open(f"/proc/{tid}/timerslack_ns", "w") as f:
                    f.write(str(slack_ns))
            except PermissionError:
                raise
            except OSError:
                done.discard(tid)  # exited meanwhile
    return len(done)

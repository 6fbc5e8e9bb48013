"""The metrics history (node/metrics_history.py): host-side samples, the CPU share between two
samples, ranges, and how long samples are kept."""

from __future__ import annotations

from pathlib import Path

import pytest

from vivarium.node import metrics_history
from vivarium.node.metrics_history import MetricsHistory
from vivarium.node.records import SandboxRecord
from vivarium.runtime.cgroups import MemoryStats


def _record(sandbox_id: str, cpus: float = 2.0) -> SandboxRecord:
    return SandboxRecord(
        sandbox_id=sandbox_id, template="base", build_id="b", slot_index=0, slot_address="x",
        started_at=0, end_at=1e12, memory_mb=512, cpus=cpus, pids=64, allow_internet=False,
        disk_mb=1024,
    )  # fmt: skip


@pytest.fixture
def host(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """What the cgroup and disk readers answer, per container id (cpu ns)."""
    cpu: dict[str, int] = {}
    monkeypatch.setattr(metrics_history.cgroups, "cpu_usage_ns", lambda cid: cpu.get(cid))
    monkeypatch.setattr(
        metrics_history.cgroups,
        "memory_stats",
        lambda cid: MemoryStats(300 << 20, 512 << 20, 0) if cid in cpu else None,
    )
    monkeypatch.setattr(metrics_history.cgroups, "memory_cache_bytes", lambda cid: 7 << 20)
    monkeypatch.setattr(metrics_history.disk, "usage", lambda d: (5 << 20, 1 << 30))
    return cpu


def test_samples_hold_the_cpu_share_memory_and_disk(host: dict[str, int]) -> None:
    history = MetricsHistory(60, lambda cid: Path("/nowhere") / cid)
    a = _record("ia")
    host["ia"] = 0
    history.sample([a], now=100.0)
    host["ia"] = int(5e9)  # 5 s of CPU in 5 s over 2 CPUs: half
    history.sample([a], now=105.0)
    first, second = history.between("ia", None, None)
    assert first.cpu_used_pct == 0.0 and second.cpu_used_pct == 50.0
    assert (second.cpu_count, second.mem_used, second.mem_total) == (2, 300 << 20, 512 << 20)
    assert (second.mem_cache, second.disk_used, second.disk_total) == (7 << 20, 5 << 20, 1 << 30)
    assert [s.ts for s in history.between("ia", 101, 200)] == [105.0]
    assert history.between("ia", 0, 99) == [] and history.between("nobody", None, None) == []
    assert second.to_json()["cpu_used_pct"] == 50.0


def test_samples_outlive_a_pause_and_go_some_time_after_a_kill(host: dict[str, int]) -> None:
    history = MetricsHistory(60, lambda cid: Path("/nowhere") / cid)
    host["ia"] = 0
    history.sample([_record("ia")], now=100.0)
    history.sample([], now=1000.0)  # paused: not running, still its samples
    assert len(history.between("ia", None, None)) == 1
    history.killed("ia", now=1000.0)
    history.sample([], now=1030.0)
    assert len(history.between("ia", None, None)) == 1
    history.sample([], now=1061.0)
    assert history.between("ia", None, None) == []


def test_a_container_not_there_gives_no_sample_and_history_is_bounded(
    host: dict[str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(metrics_history, "MAX_SAMPLES", 3)
    history = MetricsHistory(60, lambda cid: Path("/nowhere") / cid)
    history.sample([_record("ib")], now=1.0)  # no cgroup yet
    assert history.between("ib", None, None) == []
    host["ib"] = 0
    for t in range(10):
        history.sample([_record("ib")], now=10.0 + t)
    assert [s.ts for s in history.between("ib", None, None)] == [17.0, 18.0, 19.0]

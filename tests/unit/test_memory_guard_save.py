"""A pause of a sandbox at its memory limit: the guard stops the runaway process first, and the
save gets room above the hard limit (runtime/memory_guard.py, node/guards.py), on a cgroup v2
layout made in a temporary directory."""

from __future__ import annotations

import asyncio
from pathlib import Path

from vivarium.node.guards import Guards
from vivarium.runtime.bundle import cgroup_path
from vivarium.runtime.memory_guard import MemoryGuard, headroom

LIMIT = 1 << 30


def _cgroup(root: Path, cid: str, usage: int) -> Path:
    directory = root / cgroup_path(cid).lstrip("/")
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "memory.current").write_text(str(usage))
    (directory / "memory.stat").write_text("active_file 0\ninactive_file 0\n")
    (directory / "memory.max").write_text(str(LIMIT + headroom(LIMIT)))
    return directory


async def _noop() -> None:
    return None


def _guards(root: Path, cid: str) -> Guards:
    guards = Guards()
    guard = MemoryGuard(cid, LIMIT, _noop, lambda before, after: None, root=root)
    guards._by_container[cid] = guard  # armed, without its watch task
    return guards


def test_a_sandbox_above_its_limit_is_not_frozen_until_it_is_below(tmp_path: Path) -> None:
    directory = _cgroup(tmp_path, "c1", LIMIT + (100 << 20))
    guards = _guards(tmp_path, "c1")
    assert asyncio.run(guards.calm("c1", 0.1)) is False
    assert "c1" in guards._by_container  # still watched: the runaway process is still there
    assert int((directory / "memory.max").read_text()) == LIMIT + headroom(LIMIT)

    async def freed_meanwhile() -> bool:
        asyncio.get_running_loop().call_later(
            0.05, (directory / "memory.current").write_text, str(LIMIT // 2)
        )
        return await guards.calm("c1", 5)

    assert asyncio.run(freed_meanwhile()) is True
    assert "c1" in guards._by_container  # still watched until it is frozen
    guards.frozen_for_save("c1")
    assert "c1" not in guards._by_container
    assert int((directory / "memory.max").read_text()) == LIMIT + 2 * headroom(LIMIT)


def test_a_sandbox_without_a_guard_is_saved_as_it_is(tmp_path: Path) -> None:
    assert asyncio.run(Guards().calm("nobody", 0.1)) is True
    Guards().frozen_for_save("nobody")


def test_a_guard_on_cgroup_v1_registers_its_threshold_and_contains_a_sandbox_already_above(
    tmp_path: Path,
) -> None:
    directory = tmp_path / "memory" / cgroup_path("c1").lstrip("/")
    directory.mkdir(parents=True)
    usage = directory / "memory.usage_in_bytes"
    usage.write_text(str(LIMIT + (100 << 20)))  # a resumed sandbox: no crossing to come
    (directory / "memory.stat").write_text("total_active_file 0\ntotal_inactive_file 0\n")
    (directory / "cgroup.event_control").write_text("")
    reaped: list[tuple[int, int]] = []

    async def reap() -> None:  # what the sandbox's init does when signalled
        usage.write_text(str(LIMIT // 2))

    async def armed() -> str:
        guard = MemoryGuard("c1", LIMIT, reap, lambda *seen: reaped.append(seen), root=tmp_path)
        guard.arm()
        for _ in range(200):
            if reaped:
                break
            await asyncio.sleep(0.01)
        guard.disarm()
        return (directory / "cgroup.event_control").read_text()

    event, usage_fd, threshold = asyncio.run(armed()).split()
    assert int(threshold) == LIMIT and event != usage_fd
    assert reaped == [(LIMIT + (100 << 20), LIMIT // 2)]
    assert int((directory / "memory.limit_in_bytes").read_text()) == LIMIT + headroom(LIMIT)

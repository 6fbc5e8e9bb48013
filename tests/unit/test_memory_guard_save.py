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

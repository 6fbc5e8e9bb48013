"""Sandbox disks (runtime/disk.py) and the node's ready ones (node/disks.py): real loop mounts."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import pytest

from vivarium.node.disks import DiskPool
from vivarium.runtime import disk


@pytest.fixture(autouse=True)
def _root() -> None:
    if os.geteuid() != 0:
        pytest.fail("mounts loop devices: needs root (`make test`)")


def _mounted_under(path: Path) -> list[str]:
    with open("/proc/self/mounts") as f:
        return [line.split()[1] for line in f if line.split()[1].startswith(str(path))]


def test_a_disk_keeps_its_slack_from_the_sandbox_and_out_of_its_figures(tmp_path: Path) -> None:
    target = disk.create(tmp_path, 64 << 20)
    try:
        disk.hold_back(tmp_path)
        used, total = disk.usage(tmp_path) or (0, 0)
        assert used < 1 << 20 and 54 << 20 < total <= 64 << 20
        with open(target / "filestore", "wb") as f, pytest.raises(OSError):
            f.write(b"x" * (128 << 20))  # stops at what was asked for, not at the image's size
        used, total = disk.usage(tmp_path) or (0, 0)
        assert 54 << 20 < used <= total <= 64 << 20
    finally:
        disk.remove(tmp_path)
    assert not (tmp_path / disk.IMAGE).exists() and not _mounted_under(tmp_path)


def test_ready_disks_are_handed_out_once_and_removed_at_stop(tmp_path: Path) -> None:
    async def scenario() -> None:
        pool = DiskPool(tmp_path / "ready", 64, ready=2)
        await pool.start()
        try:
            while len(pool._free) < 2:
                await asyncio.sleep(0.01)
            ready = set(pool._free)
            first = await pool.take(tmp_path / "a", 64)
            assert os.path.ismount(first)
            assert len(ready - set((tmp_path / "ready").iterdir())) == 1  # renamed, not copied
            other = await pool.take(tmp_path / "b", 32)  # another size: made on the spot
            assert os.path.ismount(other)
            assert (disk.usage(tmp_path / "b") or (0, 1 << 40))[1] < (32 << 20) + disk.SLACK
        finally:
            for name in ("a", "b"):
                disk.remove(tmp_path / name)
            await pool.stop()
        assert not _mounted_under(tmp_path) and not list((tmp_path / "ready").iterdir())

    asyncio.run(scenario())

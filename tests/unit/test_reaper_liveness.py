"""The liveness check ends a sandbox only when the same container looked dead twice in a row:
never while the sandbox is being changed, and a suspicion of the container a pause, snapshot or
fork replaced never counts against the new one (a snapshot under load once lost its sandbox to
that: `runsc state` of the new container failed once, right after the old one was suspected)."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field

from vivarium.node.reaper import Reaper
from vivarium.node.records import SandboxRecord
from vivarium.runtime.runsc import ContainerState


@dataclass
class FakeRuntime:
    running: set[str] = field(default_factory=set)

    async def list(self) -> list[ContainerState]:
        return [ContainerState(cid, "running", 1, "") for cid in self.running]

    async def state(self, cid: str) -> ContainerState | None:
        return None  # as when `runsc state` fails under load


class FakeWarm:
    def prune(self, running: set[str]) -> None:
        pass


class FakeNode:
    def __init__(self, record: SandboxRecord) -> None:
        self.runtime = FakeRuntime()
        self.warm = FakeWarm()
        self.sandboxes = {record.sandbox_id: record}
        self.locks: dict[str, asyncio.Lock] = {}
        self.ended: list[tuple[str, str]] = []

    def rt(self) -> FakeRuntime:
        return self.runtime

    def lock(self, sandbox_id: str) -> asyncio.Lock:
        return self.locks.setdefault(sandbox_id, asyncio.Lock())

    def record_event(self, record: SandboxRecord, reason: str) -> None:
        self.ended.append((record.container_id, reason))

    async def destroy(self, record: SandboxRecord) -> None:
        del self.sandboxes[record.sandbox_id]


def _record(container_id: str) -> SandboxRecord:
    return SandboxRecord("isandbox", "base", "b1", 0, "10.0.0.1", 0.0, 1e12, 512, 1.0, 100,
                         False, container_id=container_id)  # fmt: skip


def test_a_new_incarnation_is_not_ended_for_its_predecessor() -> None:
    async def scenario() -> None:
        node = FakeNode(_record("isandbox-old"))
        reaper = Reaper(node)  # type: ignore[arg-type]
        async with node.lock("isandbox"):  # a snapshot checkpointed it: stopped, lock held
            await reaper.check_alive()
        await reaper.check_alive()  # not judged while held; first suspicion now
        assert node.ended == []
        # Started again in a new container, which one failed `runsc state` makes look dead.
        node.sandboxes["isandbox"] = _record("isandbox-new")
        await reaper.check_alive()
        assert node.ended == [] and "isandbox" in node.sandboxes
        await reaper.check_alive()  # the same container dead twice in a row: it has ended
        assert [cid for cid, _ in node.ended] == ["isandbox-new"]
        assert "isandbox" not in node.sandboxes

    asyncio.run(scenario())

"""A pause's last resorts (node/pause.py), where a sandbox stopped by its checkpoint could
otherwise be lost: the checkpoint is kept as its snapshot when it can be neither stored nor
restored, and a node stopping mid-commit lets the commit finish. The runtime is faked here;
tests/pause/test_s3.py runs the path where the sandbox is restored, under runsc."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from vivarium.errors import RuntimeFailure
from vivarium.node import pause


class FakeSnapshots:
    def __init__(self) -> None:
        self.discarded: list[Path] = []

    def discard(self, staging: Path) -> None:
        self.discarded.append(staging)

    def mark_checkpointed(self, staging: Path, record: Any, runsc_version: str) -> None:
        pass


class FakeNode:
    def __init__(self) -> None:
        self.snapshots = FakeSnapshots()
        self.destroyed: list[Any] = []

        self.records = type("Records", (), {"drop": lambda self, container_id: None})()

    def rt(self) -> Any:
        return type("Runtime", (), {"probe": type("Probe", (), {"runsc_version": "test"})})

    async def destroy(self, record: Any) -> None:
        self.destroyed.append(record)


class Record:
    sandbox_id = "isbx"
    container_id = "isbx-000000"

    def to_json(self) -> dict[str, str]:
        return {"sandbox_id": self.sandbox_id}


def _seals(monkeypatch: pytest.MonkeyPatch, *results: object, delay: float = 0.0) -> list[bool]:
    """Make seal() answer `results` in turn (an exception is raised); the calls' `remote`."""
    remotes: list[bool] = []
    answers = list(results)

    async def seal(node: Any, record: Any, key: str, staging: Path, *, remote: bool = True,
                   mode: str = "full") -> object:  # fmt: skip
        remotes.append(remote)
        await asyncio.sleep(delay)
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    monkeypatch.setattr(pause, "seal", seal)
    return remotes


def _restore_fails(monkeypatch: pytest.MonkeyPatch) -> None:
    async def start_again(*args: object) -> None:
        raise RuntimeFailure("restore failed", "the sandbox was stopped and could not be restored")

    monkeypatch.setattr(pause, "start_again", start_again)


def test_a_checkpoint_neither_stored_nor_restored_is_kept_as_the_snapshot(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _restore_fails(monkeypatch)
    remotes = _seals(monkeypatch, "kept here")
    node = FakeNode()
    refused = RuntimeFailure("the store refused it")
    kept = asyncio.run(pause._put_back(node, Record(), tmp_path, refused, "pausing"))  # type: ignore[arg-type]
    assert kept == "kept here" and remotes == [False] and node.snapshots.discarded == []


def test_a_checkpoint_that_cannot_be_kept_at_all_fails_the_pause(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    _restore_fails(monkeypatch)
    _seals(monkeypatch, OSError("disk full"))
    node = FakeNode()
    with pytest.raises(RuntimeFailure, match="could not be restored"):
        asyncio.run(pause._put_back(node, Record(), tmp_path, OSError("disk full"), "pausing"))  # type: ignore[arg-type]
    assert node.snapshots.discarded == [tmp_path]


@pytest.mark.parametrize("stored", [True, False])
def test_a_node_stopping_mid_commit_lets_it_finish(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, stored: bool
) -> None:
    async def checkpointed(*args: object) -> Path:
        return tmp_path

    monkeypatch.setattr(pause, "checkpoint_sandbox", checkpointed)
    first = "stored" if stored else RuntimeFailure("the store went away")
    remotes = _seals(monkeypatch, first, "kept here", delay=0.2)
    node = FakeNode()

    async def stop_mid_commit() -> None:
        pausing = asyncio.create_task(pause.pause_sandbox(node, Record()))  # type: ignore[arg-type]
        await asyncio.sleep(0.05)
        pausing.cancel()
        with pytest.raises(asyncio.CancelledError):
            await pausing

    asyncio.run(stop_mid_commit())
    # The commit ran to its end (a second, local one if the store failed it), the stopped
    # sandbox was cleaned up, and its checkpoint was not thrown away.
    assert remotes == ([True] if stored else [True, False])
    assert len(node.destroyed) == 1 and node.snapshots.discarded == []

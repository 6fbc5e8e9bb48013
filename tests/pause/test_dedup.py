"""Paused sandboxes' snapshots as deduplicated chunks (VIVARIUM_SNAPSHOT_DEDUP=1), with the
official client: sandboxes of one template share their chunks, each comes back whole, and a
damaged chunk refuses only the resume that needs it."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from e2b import Sandbox, SandboxState

from tests.integration.support import Server, running_server, sdk_options
from vivarium.node.chunks import ChunkStore
from vivarium.node.snapshots import named_chunks

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with running_server("dedup", "vd", "10.251.0.0/24", 3130, snapshot_dedup="1") as srv:
        yield srv


def _chunks(server: Server, sandbox_id: str) -> set[str]:
    manifest = server.state_dir / "snapshots" / sandbox_id / "manifest.json"
    return named_chunks(
        json.loads(manifest.read_text()), ChunkStore(manifest.parent.parent / "chunks")
    )


def test_paused_sandboxes_share_chunks_and_a_damaged_one_refuses_only_its_resume(
    server: Server,
) -> None:  # fmt: skip
    opts = sdk_options(server)
    damaged, intact = (Sandbox.create(timeout=120, **opts) for _ in range(2))  # type: ignore[arg-type]
    for sbx in (damaged, intact):
        sbx.files.write("/home/user/own.txt", sbx.sandbox_id)
        sbx.commands.run("sleep 600", background=True, timeout=0)
        assert sbx.pause()
    snapshots = server.state_dir / "snapshots"
    assert not (snapshots / damaged.sandbox_id / "checkpoint").exists()  # chunks only
    # The two share most chunks (one template); one of the first's own is damaged.
    shared = _chunks(server, damaged.sandbox_id) & _chunks(server, intact.sandbox_id)
    own = sorted(_chunks(server, damaged.sandbox_id) - shared)
    assert len(shared) > len(own) > 0
    chunk = snapshots / "chunks" / own[0][:2] / own[0]
    original = chunk.read_bytes()
    chunk.write_bytes(original[:-1] + bytes([original[-1] ^ 0xFF]))
    with pytest.raises(Exception, match="corrupt"):
        Sandbox.connect(damaged.sandbox_id, **opts)  # type: ignore[arg-type]
    assert Sandbox.get_info(damaged.sandbox_id, **opts).state == SandboxState.PAUSED  # type: ignore[arg-type]
    back = Sandbox.connect(intact.sandbox_id, **opts)  # type: ignore[arg-type]
    assert back.files.read("/home/user/own.txt") == intact.sandbox_id
    assert "sleep 600" in back.commands.run("ps -eo args").stdout
    back.kill()
    chunk.write_bytes(original)  # repaired: the same snapshot resumes, memory and files
    back = Sandbox.connect(damaged.sandbox_id, **opts)  # type: ignore[arg-type]
    assert back.files.read("/home/user/own.txt") == damaged.sandbox_id
    assert "sleep 600" in back.commands.run("ps -eo args").stdout
    back.kill()

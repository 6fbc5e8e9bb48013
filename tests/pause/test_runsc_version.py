"""A snapshot made by another runsc version (on the local disk; tests/pause/test_s3.py does the
same for a stored one): resuming it is refused with both versions named, the snapshot and the
paused sandbox are kept unchanged, and once the manifest is back the sandbox resumes."""

from __future__ import annotations

import json

import pytest
from e2b import Sandbox, SandboxState
from e2b.exceptions import SandboxException

from tests.integration.support import Server
from tests.pause.conftest import opts as _opts
from vivarium.node.chunks import ChunkStore
from vivarium.node.snapshots import named_chunks

pytestmark = pytest.mark.timeout(600)


def test_a_snapshot_of_another_runsc_version_is_refused_and_kept(server: Server) -> None:
    opts = _opts(server)
    sbx = Sandbox.create(timeout=120, **opts)  # type: ignore[arg-type]
    sbx.files.write("/home/user/work.txt", "kept")
    sbx.commands.run("sleep 600", background=True, timeout=0)
    assert sbx.pause()
    snapshots = server.state_dir / "snapshots"
    manifest_file = snapshots / sbx.sandbox_id / "manifest.json"
    original = manifest_file.read_text()
    manifest = json.loads(original)
    ours, theirs = manifest["runsc_version"], "0.0~20991231.0"
    manifest_file.write_text(json.dumps({**manifest, "runsc_version": theirs}))
    chunks = ChunkStore(snapshots / "chunks")
    named = named_chunks(manifest, chunks)

    for _ in range(2):  # refused again the same way: the first refusal changed nothing
        with pytest.raises(SandboxException) as refused:
            Sandbox.connect(sbx.sandbox_id, **opts)  # type: ignore[arg-type]
        assert refused.value.status_code == 409  # type: ignore[attr-defined]
        assert f"made by runsc {theirs}, this node runs {ours}" in str(refused.value)
        assert Sandbox.get_info(sbx.sandbox_id, **opts).state == SandboxState.PAUSED  # type: ignore[arg-type]
        assert sorted(p.name for p in snapshots.iterdir()) == ["chunks", sbx.sandbox_id]
        assert all(chunks.path(digest).exists() for digest in named)  # kept as it was

    manifest_file.write_text(original)  # back on a node with its runsc version, so to speak
    back = Sandbox.connect(sbx.sandbox_id, **opts)  # type: ignore[arg-type]
    assert back.files.read("/home/user/work.txt") == "kept"
    assert "sleep 600" in back.commands.run("ps -eo args").stdout
    back.kill()

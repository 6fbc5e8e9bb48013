"""Template builds shared between nodes (node/template_share.py), against a real S3 server:
a built-in template's tree and a team template's sparse image go up once and come back on
another "node" (another template directory) byte for byte, with owners, modes, file
capabilities and holes, the spec pointing at the new home; a corrupt copy is refused and
leaves nothing behind; a delete removes every build."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.s3server import CREDENTIALS, bucket_server
from vivarium.errors import NotFound, RuntimeFailure
from vivarium.node.shelf import ARCHIVE
from vivarium.node.template_share import TemplateShare
from vivarium.runtime import disk
from vivarium.templates.custom import ROOTFS_IMAGE
from vivarium.templates.store import Template, TemplateStore, sha256_dir

S3_PORT = 5131
BUCKET = "vivarium-templates"
KEY = b"the cluster's signing key"


@pytest.fixture(scope="module")
def share() -> Iterator[TemplateShare]:
    os.environ.update(CREDENTIALS)
    with bucket_server(S3_PORT, BUCKET) as server:
        yield TemplateShare(f"s3://{BUCKET}/cluster/templates", server.endpoint, KEY)


def _build(store: TemplateStore, name: str, build_id: str, *, image: bool) -> Template:
    """A build as the builders leave one: manifest, spec naming its rootfs, a checkpoint."""
    build_dir = store.builds_dir(name) / build_id
    (build_dir / "checkpoint").mkdir(parents=True)
    (build_dir / "checkpoint" / "checkpoint.img").write_bytes(os.urandom(4096))
    rootfs = build_dir / "rootfs"
    if image:
        disk.make_filesystem(build_dir / ROOTFS_IMAGE, 256 << 20, journal=True)
        disk.mount(build_dir / ROOTFS_IMAGE, rootfs)
    else:
        rootfs.mkdir()
    (rootfs / "home").mkdir()
    (rootfs / "home" / "notes.txt").write_text("lesson seven\n")
    os.chown(rootfs / "home" / "notes.txt", 1000, 1000)
    ping = rootfs / "ping"
    ping.write_bytes(b"\x7fELF")
    ping.chmod(0o4755)
    subprocess.run(["setcap", "cap_net_raw+ep", str(ping)], check=True)
    hub = {"destination": "/hub", "source": str(build_dir / "volume-hub")}
    spec = {"root": {"path": str(rootfs)},
            "mounts": [{"destination": "/proc", "source": "proc"}, hub]}  # fmt: skip
    (build_dir / "spec.json").write_text(json.dumps(spec))
    manifest = {"build_id": build_id, "checkpoint_sha256": sha256_dir(build_dir / "checkpoint")}
    (build_dir / "manifest.json").write_text(json.dumps(manifest))
    return store.build(name, build_id)


@pytest.mark.parametrize("image", [False, True], ids=["tree", "image"])
def test_a_build_goes_up_once_and_comes_back_whole_on_another_node(
    share: TemplateShare, tmp_path: Path, image: bool
) -> None:
    here, there = TemplateStore(tmp_path / "a"), TemplateStore(tmp_path / "b")
    name = "lesson-image" if image else "base"
    made = _build(here, name, "b1", image=image)
    try:
        size = share.publish(made)
        assert size > 0 and share.publish(made) == size  # once: the second finds it there
        fetched = asyncio.run(share.fetch(there, name, "b1"))
        try:
            root = fetched.rootfs
            assert (root / "home" / "notes.txt").read_text() == "lesson seven\n"
            assert (root / "home" / "notes.txt").stat().st_uid == 1000
            assert (root / "ping").stat().st_mode & 0o7777 == 0o4755
            caps = subprocess.run(["getcap", str(root / "ping")], capture_output=True, text=True)
            assert "cap_net_raw" in caps.stdout
            assert fetched.spec["root"]["path"] == str(there.builds_dir(name) / "b1" / "rootfs")
            assert fetched.spec["mounts"][1]["source"] == str(fetched.build_dir / "volume-hub")
            if image:  # mounted as the builder's is, and as sparse as it was
                assert root.is_mount()
                stat = (fetched.build_dir / ROOTFS_IMAGE).stat()
                assert stat.st_blocks * 512 < stat.st_size // 4
        finally:
            disk.discard(there.builds_dir(name) / "b1")
    finally:
        disk.discard(made.build_dir)
        share.delete(name)
    with pytest.raises(NotFound):
        asyncio.run(share.fetch(TemplateStore(tmp_path / "c"), name, "b1"))


def test_a_corrupt_or_foreign_copy_is_refused_and_leaves_nothing(
    share: TemplateShare, tmp_path: Path
) -> None:
    here, there = TemplateStore(tmp_path / "a"), TemplateStore(tmp_path / "b")
    made = _build(here, "corrupt", "b1", image=False)
    share.publish(made)
    share.shelf.objects.write("corrupt/b1/" + ARCHIVE, b"not the archive")
    try:
        with pytest.raises(RuntimeFailure, match="corrupt"):
            asyncio.run(share.fetch(there, "corrupt", "b1"))
        assert list(there.builds_dir("corrupt").iterdir()) == []
        # Stored by whoever can write to the bucket, without the cluster secret: refused.
        other = TemplateShare(share.shelf.url, share.shelf.objects.endpoint_url, b"another key")
        other.publish(_build(TemplateStore(tmp_path / "c"), "foreign", "b1", image=False))
        with pytest.raises(RuntimeFailure, match="not stored by a node of this cluster"):
            asyncio.run(share.fetch(there, "foreign", "b1"))
        assert list(there.builds_dir("foreign").iterdir()) == []
    finally:
        share.delete("corrupt")
        share.delete("foreign")

"""Volumes on the node (node/volumes.py): names and mount paths checked, an image of their own,
and a container's teardown that never deletes what its volumes hold."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from vivarium.errors import InvalidArgument, NotFound
from vivarium.node.volumes import (
    VolumeMount,
    VolumeStore,
    check_mount_path,
    check_mounts,
    check_name,
    new_volume_id,
)
from vivarium.runtime import disk


@pytest.mark.parametrize("name", ["data", "a", "my-vol_1.2", "9lives", "x" * 63])
def test_good_names(name: str) -> None:
    assert check_name(name) == name


@pytest.mark.parametrize("name", ["", "-x", ".x", "a/b", "a b", "x" * 64, "ü", "..", "a\0"])
def test_bad_names(name: str) -> None:
    with pytest.raises(InvalidArgument):
        check_name(name)


@pytest.mark.parametrize("path", ["/mnt/data", "/data", "/home/user/work", "/opt/other"])
def test_good_mount_paths(path: str) -> None:
    assert check_mount_path(path) == path


@pytest.mark.parametrize(
    "path",
    ["/", "", "mnt", "/mnt/../etc", "/mnt/", "//mnt", "/mnt//x", "/a\0b", "/proc", "/proc/x",
     "/sys/fs", "/dev", "/opt/vivarium", "/opt/vivarium/volumes/x", "/" + "a" * 1100,
     "/opt", "/run", "/run/vivarium/x"],
)  # fmt: skip
def test_bad_mount_paths(path: str) -> None:
    with pytest.raises(InvalidArgument):
        check_mount_path(path)


def test_mounts_must_not_overlap_or_repeat() -> None:
    vid = new_volume_id()
    check_mounts([VolumeMount("a", "/mnt/a", vid), VolumeMount("b", "/mnt/ab", vid)])
    with pytest.raises(InvalidArgument, match="overlap"):
        check_mounts([VolumeMount("a", "/mnt", vid), VolumeMount("b", "/mnt/b", vid)])
    with pytest.raises(InvalidArgument, match="overlap"):
        check_mounts([VolumeMount("a", "/mnt", vid), VolumeMount("b", "/mnt", vid)])
    with pytest.raises(InvalidArgument, match="only once"):
        check_mounts([VolumeMount("a", "/x", vid), VolumeMount("a", "/y", vid)])
    with pytest.raises(InvalidArgument, match="at most"):
        check_mounts([VolumeMount(f"v{i}", f"/m/{i}", vid) for i in range(17)])


@pytest.fixture
def store(tmp_path: Path):  # type: ignore[no-untyped-def]
    if os.geteuid() != 0:
        pytest.fail("volume tests mount images and need root (`make test`)")
    volumes = VolumeStore(tmp_path / "volumes", size_mb=32)
    yield volumes
    for entry in (tmp_path / "volumes").iterdir() if (tmp_path / "volumes").exists() else []:
        volumes.delete(entry.name)


def test_a_volume_is_a_bounded_file_system_owned_by_the_sandbox_user(store: VolumeStore) -> None:
    vid = new_volume_id()
    store.create(vid)
    data = store.data(vid)
    assert os.path.ismount(data.parent) and os.listdir(data) == []  # no lost+found in sight
    assert (data.stat().st_uid, data.stat().st_gid) == (1000, 1000)
    used, total = store.usage(vid)
    assert 20 << 20 < total <= 32 << 20
    with pytest.raises(OSError, match="No space"), open(data / "big", "wb") as f:
        f.write(b"\0" * (40 << 20))
        f.flush()
        os.fsync(f.fileno())
    store.delete(vid)
    with pytest.raises(NotFound):
        store.data(vid)


def test_volumes_are_mounted_again_after_a_host_restart(store: VolumeStore) -> None:
    vid = new_volume_id()
    store.create(vid)
    (store.data(vid) / "kept").write_text("yes")
    disk.run_sync(["umount", str(store.data(vid).parent)])
    with pytest.raises(NotFound):
        store.data(vid)
    (store.root / new_volume_id()).mkdir()  # half made: no image
    assert store.mount_all() == 1
    assert (store.data(vid) / "kept").read_text() == "yes"


def test_unknown_or_malformed_ids_are_not_found(store: VolumeStore) -> None:
    for bad in ("../x", "", "v" * 20, new_volume_id()):
        with pytest.raises(NotFound):
            store.data(bad)


def test_tearing_down_a_container_never_deletes_its_volumes(
    store: VolumeStore, tmp_path: Path
) -> None:
    """The hub on a container's disk holds bind mounts of volumes: removing the container's
    directory detaches them first, and the volumes' files stay."""
    vid = new_volume_id()
    store.create(vid)
    (store.data(vid) / "precious").write_text("keep me")
    container = tmp_path / "sandboxes" / "c1"
    filestore = disk.create(container, 64 << 20)
    hub = store.attach(filestore, [VolumeMount("data", "/mnt/data", vid)])
    assert (hub / "data" / "precious").read_text() == "keep me"
    (hub / "data" / "written-through-hub").write_text("also")
    assert disk.mounts_under(container)[-1] == filestore  # deepest first: the bind, then disk
    disk.discard(container)
    assert not container.exists()
    assert sorted(os.listdir(store.data(vid))) == ["precious", "written-through-hub"]


def test_a_missing_volume_fails_the_attach(store: VolumeStore, tmp_path: Path) -> None:
    filestore = tmp_path / "fs"
    filestore.mkdir()
    with pytest.raises(NotFound):
        store.attach(filestore, [VolumeMount("gone", "/mnt/gone", new_volume_id())])

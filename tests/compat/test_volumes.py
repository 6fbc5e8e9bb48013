"""Volumes through the official client: a class's shared data set mounted by several sandboxes
at once, kept on the node's disk across kill, pause, fork and restart, with the client's own
file operations on it (`Volume`, the volume content API at E2B_VOLUME_API_URL)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator

import httpx
import pytest
from e2b import (
    NotFoundException,
    Sandbox,
    Volume,
    VolumeNotFoundException,
    VolumePathNotFoundException,
)

from tests.compat.conftest import Compat

pytestmark = pytest.mark.timeout(600)


def _name(what: str) -> str:
    return f"{what}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def volume(compat: Compat) -> Iterator[Volume]:
    vol = Volume.create(_name("data"))
    yield vol
    Volume.destroy(vol.volume_id)


def _status(call: object) -> int:
    """The HTTP status of the error the client raised (its messages start with it)."""
    try:
        call()  # type: ignore[operator]
    except Exception as exc:  # noqa: BLE001 - the client's classes differ by status
        code = getattr(exc, "status_code", None)
        return int(code) if code else int(str(exc).split(":")[0])
    raise AssertionError("the call succeeded")


def test_volume_lifecycle_and_file_operations(compat: Compat) -> None:
    name = _name("lesson")
    vol = Volume.create(name)
    assert vol.name == name and vol.token and vol.volume_id
    assert (vol.volume_id, name) in {(v.volume_id, v.name) for v in Volume.list()}
    info = Volume.get_info(vol.volume_id)
    assert (info.name, info.token) == (name, vol.token)
    vol = Volume.connect(vol.volume_id)

    made = vol.make_dir("/data")
    assert (made.type.value, made.path, made.uid, made.gid) == ("directory", "/data", 1000, 1000)
    written = vol.write_file("/data/a.txt", "hello")
    assert (written.type.value, written.size, written.mode) == ("file", 5, 0o644)
    assert vol.read_file("/data/a.txt") == "hello"
    vol.write_file("/data/b.bin", bytes(range(256)) * 4096)  # replaced whole, in one piece
    assert vol.read_file("/data/b.bin", format="bytes") == bytes(range(256)) * 4096
    assert b"".join(vol.read_file("/data/b.bin", format="stream")) == bytes(range(256)) * 4096
    assert [e.path for e in vol.list("/")] == ["/data"]
    assert [e.path for e in vol.list("/", depth=2)] == ["/data", "/data/a.txt", "/data/b.bin"]
    assert vol.update_metadata("/data/a.txt", mode=0o600).mode == 0o600
    assert vol.get_info("/data/a.txt").mode == 0o600
    assert vol.exists("/data/a.txt") and not vol.exists("/data/nope")
    with pytest.raises(VolumePathNotFoundException):
        vol.read_file("/data/nope")
    with pytest.raises(VolumePathNotFoundException):
        vol.write_file("/deep/er/file", "x")  # no such directory, and no `force`
    assert vol.write_file("/deep/er/file", "x", force=True).path == "/deep/er/file"
    vol.remove("/deep")
    assert not vol.exists("/deep/er/file")
    with pytest.raises(VolumePathNotFoundException):
        vol.remove("/deep")

    assert Volume.destroy(vol.volume_id) is True
    assert Volume.destroy(vol.volume_id) is False
    with pytest.raises(VolumeNotFoundException):
        Volume.get_info(vol.volume_id)


def test_two_sandboxes_share_a_volume_that_outlives_them(compat: Compat, volume: Volume) -> None:
    first = Sandbox.create(timeout=120, volume_mounts={"/mnt/data": volume})
    try:
        second = Sandbox.create(timeout=120, volume_mounts={"/home/user/shared": volume.name})
    except BaseException:
        first.kill()
        raise
    try:
        # As the sandbox's default user: the volume's root is theirs.
        first.commands.run("echo from-first > /mnt/data/notes.txt")
        assert second.commands.run("cat /home/user/shared/notes.txt").stdout == "from-first\n"
        second.files.write("/home/user/shared/answer.txt", "from-second")
        assert first.files.read("/mnt/data/answer.txt") == "from-second"
        assert volume.read_file("/notes.txt") == "from-first\n"
        volume.write_file("/from-api.txt", "api")
        assert first.files.read("/mnt/data/from-api.txt") == "api"
        mounts = Sandbox.get_info(first.sandbox_id).volume_mounts
        assert mounts == [{"name": volume.name, "path": "/mnt/data"}]
        # Mounted: it cannot be deleted (a paused sandbox would lose it at its resume).
        assert _status(lambda: Volume.destroy(volume.volume_id)) == 409
    finally:
        first.kill()
        second.kill()
    assert sorted(e.name for e in volume.list("/")) == ["answer.txt", "from-api.txt", "notes.txt"]
    third = Sandbox.create(timeout=60, volume_mounts={"/data": volume})
    try:
        assert third.files.read("/data/notes.txt") == "from-first\n"
    finally:
        third.kill()


def test_pause_resume_and_fork_keep_the_mount(compat: Compat, volume: Volume) -> None:
    sandbox = Sandbox.create(timeout=120, volume_mounts={"/mnt/data": volume})
    children: list[Sandbox] = []
    try:
        # A process holding the volume's file open, writing a line every 0.1 s.
        sandbox.commands.run(
            "bash -c 'exec 3>>/mnt/data/ticks; while true; do echo t >&3; sleep 0.1; done'",
            background=True,
        )
        _grows(volume, "/ticks")
        sandbox.pause()
        paused_at = _lines(volume, "/ticks")
        time.sleep(0.5)
        assert _lines(volume, "/ticks") == paused_at  # frozen
        volume.write_file("/while-paused.txt", "written while it slept")
        sandbox = Sandbox.connect(sandbox.sandbox_id, timeout=120)
        assert sandbox.files.read("/mnt/data/while-paused.txt") == "written while it slept"
        _grows(volume, "/ticks")  # the same process, through the same open file, into the volume
        children = [c for c in sandbox.fork(count=1, timeout=60) if isinstance(c, Sandbox)]
        assert len(children) == 1
        children[0].files.write("/mnt/data/from-child.txt", "child")
        assert sandbox.files.read("/mnt/data/from-child.txt") == "child"
    finally:
        for child in children:
            child.kill()
        sandbox.kill()


def _grows(volume: Volume, path: str) -> None:
    start = _lines(volume, path)
    deadline = time.monotonic() + 20
    while _lines(volume, path) < start + 3:
        assert time.monotonic() < deadline, f"{path} stopped growing"
        time.sleep(0.1)


def _lines(volume: Volume, path: str) -> int:
    try:
        return len(volume.read_file(path).splitlines())
    except VolumePathNotFoundException:  # not yet made
        return 0


def test_a_full_volume_refuses_writes_and_the_sandbox_lives_on(
    compat: Compat, volume: Volume
) -> None:
    # The compat server's volumes are 64 MiB.
    assert _status(lambda: volume.write_file("/big", b"\0" * (80 << 20))) == 507
    assert not volume.exists("/big")  # nothing half-written is left
    sandbox = Sandbox.create(timeout=60, volume_mounts={"/mnt/data": volume})
    try:
        result = sandbox.commands.run(
            "dd if=/dev/zero of=/mnt/data/fill bs=1M count=100 2>&1; echo rc=$?"
        )
        assert "No space left" in result.stdout and "rc=1" in result.stdout, result.stdout
        assert sandbox.commands.run("echo alive").stdout == "alive\n"
        sandbox.commands.run("rm /mnt/data/fill")
    finally:
        sandbox.kill()


def test_bad_volume_requests(compat: Compat, volume: Volume) -> None:
    assert _status(lambda: Volume.create("bad name")) == 400
    assert _status(lambda: Volume.create(volume.name)) == 409
    missing = _name("missing")
    assert _status(lambda: Sandbox.create(timeout=30, volume_mounts={"/mnt": missing})) == 404
    for path in ("/", "relative", "/proc/x", "/opt/vivarium", "/mnt/../etc"):
        assert _status(lambda p=path: Sandbox.create(timeout=30, volume_mounts={p: volume})) == 400
    # The content API takes the volume's token, and only its own.
    other = Volume.create(_name("other"))
    try:
        wrong = Volume(volume.volume_id, volume.name, token=other.token)
        assert _status(lambda: wrong.read_file("/x")) == 401
        with httpx.Client(base_url=compat.api_url) as http:
            answer = http.get(f"/volumecontent/{volume.volume_id}/dir", params={"path": "/"})
            assert answer.status_code == 401 and answer.json()["code"] == 401
            # Not a word of whether an id exists to one without its token; any token is bytes.
            for volume_id in (volume.volume_id, "vol-nobody-has-this"):
                answer = http.get(f"/volumecontent/{volume_id}/dir", params={"path": "/"},
                                  headers={"Authorization": "Bearer é".encode()})  # fmt: skip
                assert answer.status_code == 401 and answer.json()["code"] == 401
            for bad in ("/../etc", "/a\0b"):
                answer = http.get(f"/volumecontent/{volume.volume_id}/path",
                                  params={"path": bad},
                                  headers={"Authorization": f"Bearer {volume.token}"})  # fmt: skip
                assert answer.status_code == 400, answer.text
    finally:
        Volume.destroy(other.volume_id)


def test_another_team_cannot_see_or_use_a_volume(compat: Compat, volume: Volume) -> None:
    key = compat.new_team(_name("team"), max_sandboxes=2)
    assert volume.volume_id not in {v.volume_id for v in Volume.list(api_key=key)}
    with pytest.raises(NotFoundException):
        Volume.get_info(volume.volume_id, api_key=key)
    assert Volume.destroy(volume.volume_id, api_key=key) is False
    assert _status(lambda: Sandbox.create(timeout=30, api_key=key,
                                          volume_mounts={"/mnt": volume.name})) == 404  # fmt: skip
    assert Volume.get_info(volume.volume_id).name == volume.name  # untouched


def test_a_team_has_at_most_its_quota_of_volumes(compat: Compat) -> None:
    key = compat.new_team(_name("quota"), max_sandboxes=1)
    made = [Volume.create(_name("q"), api_key=key) for _ in range(6)]  # the server's limit
    try:
        assert _status(lambda: Volume.create(_name("q"), api_key=key)) == 429
    finally:
        for vol in made:
            Volume.destroy(vol.volume_id, api_key=key)
    Volume.destroy(Volume.create(_name("q"), api_key=key).volume_id, api_key=key)

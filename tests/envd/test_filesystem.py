"""envd's filesystem.Filesystem service and HTTP /files, driven by the official `e2b` client
(plus raw HTTP for wire details the client hides: status codes, headers, gzip on the wire)."""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import os
import pwd
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from e2b import (
    AsyncSandbox,
    FileNotFoundException,
    FileType,
    InvalidArgumentException,
    NotEnoughSpaceException,
    Sandbox,
    SandboxException,
)
from e2b.sandbox.filesystem.watch_handle import FilesystemEvent, FilesystemEventType

from tests.envd.connect_wire import connect_stream
from vivarium.guest.envd.entry_info import go_mode_string, protobuf_timestamp
from vivarium.guest.envd.files_headers import accept_gzip, part_filename
from vivarium.guest.envd.watch import DirWatch

pytestmark = pytest.mark.timeout(300)

NOBODY = "nobody"
DENIED = "(?i)permission[ _]denied"  # RPC errors carry the code, HTTP ones the text


@pytest.fixture
def work() -> Iterator[Path]:
    """A fresh directory every user may enter (but only root may write to)."""
    path = Path(tempfile.mkdtemp(prefix="envd-fs-", dir="/tmp"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _envd_pid(envd_url: str) -> int:
    port = envd_url.rsplit(":", 1)[1].encode()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                args = f.read().split(b"\0")
        except OSError:
            continue
        if b"vivarium.guest.envd" in args and port in args[1:] and b"--port" in args:
            return int(entry)
    raise AssertionError("envd process not found")


def _rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def _xattrs_supported(directory: Path) -> bool:
    probe = directory / ".xattr-probe"
    probe.write_bytes(b"")
    try:
        os.setxattr(probe, "user.probe", b"1")
        return True
    except OSError:
        return False
    finally:
        probe.unlink()


# --- read / write ---------------------------------------------------------------------------------


def test_write_and_read_text_bytes_and_stream(sbx: Sandbox, work: Path) -> None:
    info = sbx.files.write(f"{work}/deep/er/hello.txt", "héllo wörld\n")
    assert (info.name, info.type, info.path) == (
        "hello.txt",
        FileType.FILE,
        f"{work}/deep/er/hello.txt",
    )
    assert sbx.files.read(f"{work}/deep/er/hello.txt") == "héllo wörld\n"

    blob = bytes(range(256)) * 1000
    sbx.files.write(f"{work}/blob.bin", blob)
    assert sbx.files.read(f"{work}/blob.bin", format="bytes") == bytearray(blob)
    with sbx.files.read(f"{work}/blob.bin", format="stream") as stream:
        assert b"".join(stream) == blob
    assert (work / "blob.bin").read_bytes() == blob

    # File-like and iterable data go as streamed application/octet-stream uploads.
    sbx.files.write(f"{work}/from-io.bin", io.BytesIO(blob))
    sbx.files.write(
        f"{work}/from-iter.bin", (blob[i : i + 4096] for i in range(0, len(blob), 4096))
    )
    sbx.files.write(f"{work}/empty.txt", "")
    assert (work / "from-io.bin").read_bytes() == blob
    assert (work / "from-iter.bin").read_bytes() == blob
    assert sbx.files.read(f"{work}/empty.txt") == ""

    # Overwriting keeps the file's mode and owner; no temp files are left behind.
    (work / "blob.bin").chmod(0o600)
    sbx.files.write(f"{work}/blob.bin", "short")
    assert (work / "blob.bin").read_text() == "short"
    assert stat.S_IMODE((work / "blob.bin").stat().st_mode) == 0o600
    assert sorted(p.name for p in work.iterdir()) == [
        "blob.bin", "deep", "empty.txt", "from-io.bin", "from-iter.bin",
    ]  # fmt: skip


def test_write_files_multipart_with_several_parts(sbx: Sandbox, work: Path) -> None:
    infos = sbx.files.write_files([
        {"path": f"{work}/one.txt", "data": "1"},
        {"path": f"{work}/sub/two.bin", "data": b"\x00\x02"},
        {"path": f'{work}/we "ird" \\ name.txt', "data": "3"},
        {"path": "relative/to/home.txt", "data": "4"},
    ])  # fmt: skip
    home = pwd.getpwnam("root").pw_dir
    try:
        assert [i.path for i in infos] == [
            f"{work}/one.txt", f"{work}/sub/two.bin", f'{work}/we "ird" \\ name.txt',
            f"{home}/relative/to/home.txt",
        ]  # fmt: skip
        assert (work / "sub" / "two.bin").read_bytes() == b"\x00\x02"
        assert (work / 'we "ird" \\ name.txt').read_text() == "3"
        assert Path(home, "relative/to/home.txt").read_text() == "4"
    finally:
        shutil.rmtree(Path(home, "relative"), ignore_errors=True)


def test_write_through_symlink_and_to_a_device(sbx: Sandbox, work: Path) -> None:
    (work / "real.txt").write_text("old")
    (work / "link.txt").symlink_to(work / "real.txt")
    sbx.files.write(f"{work}/link.txt", "new")
    assert (work / "link.txt").is_symlink()
    assert (work / "real.txt").read_text() == "new"
    # A device is written to, not replaced by a regular file.
    sbx.files.write("/dev/null", "discarded")
    assert stat.S_ISCHR(os.stat("/dev/null").st_mode)


def test_gzip_both_ways(sbx: Sandbox, envd_url: str, work: Path) -> None:
    text = "compress me " * 10000
    sbx.files.write(f"{work}/z.txt", text, gzip=True)
    assert (work / "z.txt").read_text() == text
    assert sbx.files.read(f"{work}/z.txt", gzip=True) == text

    # On the wire: gzip when asked (by q-value), identity with a length otherwise.
    with httpx.Client(base_url=envd_url) as client:
        raw = client.get("/files", params={"path": f"{work}/z.txt"},
                         headers={"Accept-Encoding": "gzip"})  # fmt: skip
        assert raw.headers["content-encoding"] == "gzip"
        assert raw.headers["content-type"] == "application/octet-stream"
        assert len(raw.content) == len(text)  # httpx decoded it
        plain = client.get("/files", params={"path": f"{work}/z.txt"},
                           headers={"Accept-Encoding": "identity"})  # fmt: skip
        assert "content-encoding" not in plain.headers
        assert plain.headers["content-length"] == str(len(text))
        refused = client.get("/files", params={"path": f"{work}/z.txt"},
                             headers={"Accept-Encoding": "br, identity;q=0"})  # fmt: skip
        assert refused.status_code == 406

        # Several gzip members in one body are one stream, as gunzip sees it.
        body = gzip.compress(b"first ") + gzip.compress(b"second")
        r = client.post("/files", params={"path": f"{work}/multi.txt"}, content=body,
                        headers={"Content-Type": "application/octet-stream",
                                 "Content-Encoding": "gzip"})  # fmt: skip
        assert r.status_code == 200, r.text
        assert (work / "multi.txt").read_bytes() == b"first second"
        bad = client.post("/files", params={"path": f"{work}/bad.txt"}, content=b"not gzip",
                          headers={"Content-Type": "application/octet-stream",
                                   "Content-Encoding": "gzip"})  # fmt: skip
        assert bad.status_code == 400
        assert not (work / "bad.txt").exists()
        assert [p.name for p in work.iterdir() if p.name.startswith(".")] == []


def test_metadata_is_stored_as_xattrs(sbx: Sandbox, work: Path) -> None:
    assert _xattrs_supported(work), "the test directory's filesystem must support user xattrs"
    info = sbx.files.write(f"{work}/m.txt", "x", metadata={"Owner": "alice", "k": "v"})
    assert info.metadata == {"owner": "alice", "k": "v"}
    assert sbx.files.get_info(f"{work}/m.txt").metadata == {"owner": "alice", "k": "v"}
    os.setxattr(work / "m.txt", "user.e2b.extra", b"set inside")
    assert sbx.files.list(str(work))[0].metadata == {
        "owner": "alice",
        "k": "v",
        "extra": "set inside",
    }
    sbx.files.write(f"{work}/m.txt", "y")  # a plain overwrite leaves no stale metadata
    assert sbx.files.get_info(f"{work}/m.txt").metadata is None


def test_download_and_upload_errors(sbx: Sandbox, envd_url: str, work: Path) -> None:
    with pytest.raises(FileNotFoundException):
        sbx.files.read(f"{work}/missing.txt")
    with pytest.raises(InvalidArgumentException):
        sbx.files.read(str(work))
    with pytest.raises(InvalidArgumentException):
        sbx.files.write(str(work), "a directory is in the way")
    (work / "file").write_text("")
    with pytest.raises(InvalidArgumentException):
        sbx.files.write(f"{work}/file/below", "a file is in the way")
    with pytest.raises(NotEnoughSpaceException):
        sbx.files.write("/dev/full", "no room")  # writes to /dev/full fail with ENOSPC

    with httpx.Client(base_url=envd_url) as client:
        r = client.get("/files", params={"path": f"{work}/missing.txt"})
        assert r.status_code == 404
        assert r.json()["code"] == 404 and "does not exist" in r.json()["message"]
        r = client.get("/files", params={"path": "/etc/hostname", "username": "no-such-user"})
        assert r.status_code == 401
        r = client.post("/files", params={"path": f"{work}/x"}, content=b"x",
                        headers={"Content-Type": "text/plain"})  # fmt: skip
        assert r.status_code == 400
        r = client.post(
            "/files", content=b"x", headers={"Content-Type": "application/octet-stream"}
        )
        assert r.status_code == 400  # raw uploads need ?path=
        r = client.post("/files", params={"path": f"{work}/x"}, content=b"x",
                        headers={b"Content-Type": b"application/octet-stream",
                                 b"X-Metadata-bad": "café".encode()})  # fmt: skip
        assert r.status_code == 400
        # Two parts for one path: refused after the first, as envd does.
        r = client.post(
            "/files", files=[("file", (f"{work}/dup", b"1")), ("file", (f"{work}/dup", b"2"))]
        )
        assert r.status_code == 400 and "multiple files to the same path" in r.json()["message"]


def test_other_user_permissions_and_ownership(sbx: Sandbox, work: Path) -> None:
    nobody = pwd.getpwnam(NOBODY)
    # Writing into /root as an unprivileged user is refused, over HTTP and RPC alike.
    with pytest.raises(SandboxException, match=DENIED):
        sbx.files.write("/root/envd-test-denied.txt", "no", user=NOBODY)
    assert not os.path.exists("/root/envd-test-denied.txt")
    with pytest.raises(SandboxException, match=DENIED):
        sbx.files.make_dir("/root/envd-test-denied", user=NOBODY)
    with pytest.raises(SandboxException, match=DENIED):
        sbx.files.list("/root", user=NOBODY)
    with pytest.raises(SandboxException, match=DENIED):
        sbx.files.get_info("/root/.bashrc", user=NOBODY)
    (work / "secret").write_text("s")
    (work / "secret").chmod(0o600)
    with pytest.raises(SandboxException, match=DENIED):
        sbx.files.read(f"{work}/secret", user=NOBODY)
    with pytest.raises(SandboxException, match=DENIED):
        sbx.files.remove(f"{work}/secret", user=NOBODY)
    with pytest.raises(SandboxException, match=DENIED):
        sbx.files.rename(f"{work}/secret", f"{work}/stolen", user=NOBODY)
    assert (work / "secret").exists()

    # Where the user may write, what it creates is its own (parents included).
    (work / "shared").mkdir(mode=0o777)
    (work / "shared").chmod(0o777)
    sbx.files.write(f"{work}/shared/a/b/c.txt", "mine", user=NOBODY)
    sbx.files.make_dir(f"{work}/shared/d/e", user=NOBODY)
    for created in ("a", "a/b", "a/b/c.txt", "d", "d/e"):
        st = (work / "shared" / created).stat()
        assert (st.st_uid, st.st_gid) == (nobody.pw_uid, nobody.pw_gid), created
    assert sbx.files.get_info(f"{work}/shared/a/b/c.txt").owner == NOBODY
    assert sbx.files.read(f"{work}/shared/a/b/c.txt", user=NOBODY) == "mine"
    sbx.files.rename(f"{work}/shared/a", f"{work}/shared/z", user=NOBODY)
    sbx.files.remove(f"{work}/shared/z", user=NOBODY)
    assert sorted(p.name for p in (work / "shared").iterdir()) == ["d"]

    # Sticky directory: another user's entry cannot be removed even though the dir is writable.
    (work / "shared").chmod(0o1777)
    (work / "shared" / "roots.txt").write_text("r")
    with pytest.raises(SandboxException, match=DENIED):
        sbx.files.remove(f"{work}/shared/roots.txt", user=NOBODY)


# --- Stat, ListDir, MakeDir, Move, Remove --------------------------------------------------------


def test_get_info_exists_make_dir_rename_remove(sbx: Sandbox, work: Path) -> None:
    (work / "f.txt").write_text("12345")
    os.utime(work / "f.txt", ns=(0, 1_700_000_000_123_456_789))
    info = sbx.files.get_info(f"{work}/f.txt")
    assert (info.name, info.type, info.path, info.size) == (
        "f.txt",
        FileType.FILE,
        f"{work}/f.txt",
        5,
    )
    assert (info.mode, info.permissions, info.owner, info.group) == (
        0o644,
        "-rw-r--r--",
        "root",
        "root",
    )
    assert info.modified_time.timestamp() == pytest.approx(1_700_000_000.123456789)
    assert info.symlink_target is None
    root_dir = sbx.files.get_info("/")
    assert (root_dir.name, root_dir.type) == ("/", FileType.DIR)

    assert sbx.files.exists(f"{work}/f.txt")
    assert not sbx.files.exists(f"{work}/nope")
    assert not sbx.files.exists(f"{work}/f.txt/below")
    with pytest.raises(FileNotFoundException):
        sbx.files.get_info(f"{work}/nope")

    assert sbx.files.make_dir(f"{work}/a/b/c") is True
    assert sbx.files.make_dir(f"{work}/a/b/c") is False
    assert sbx.files.make_dir(f"{work}/a") is False
    with pytest.raises(InvalidArgumentException):
        sbx.files.make_dir(f"{work}/f.txt")
    assert (work / "a" / "b" / "c").is_dir()

    moved = sbx.files.rename(f"{work}/f.txt", f"{work}/a/b/c/new/g.txt")
    assert (moved.name, moved.path, moved.size) == ("g.txt", f"{work}/a/b/c/new/g.txt", 5)
    assert not (work / "f.txt").exists()
    with pytest.raises(FileNotFoundException):
        sbx.files.rename(f"{work}/f.txt", f"{work}/h.txt")

    sbx.files.remove(f"{work}/a/b/c/new/g.txt")
    assert not (work / "a/b/c/new/g.txt").exists()
    sbx.files.remove(f"{work}/a")  # a whole tree
    assert not (work / "a").exists()
    sbx.files.remove(f"{work}/a")  # already gone: fine, as with envd's os.RemoveAll


def test_rename_across_filesystems(sbx: Sandbox, work: Path) -> None:
    # /dev/shm is a tmpfs, so rename(2) from there says EXDEV and envd copies instead.
    assert os.path.isdir("/dev/shm") and os.stat("/dev/shm").st_dev != work.stat().st_dev, (
        "needs /dev/shm on a filesystem other than the test directory's"
    )
    src = Path(tempfile.mkdtemp(dir="/dev/shm"))
    try:
        (src / "sub").mkdir()
        (src / "sub" / "f").write_text("x")
        os.chown(src / "sub" / "f", 65534, 65534)
        sbx.files.rename(str(src), f"{work}/moved")
        assert not src.exists()
        assert (work / "moved" / "sub" / "f").read_text() == "x"
        assert (work / "moved" / "sub" / "f").stat().st_uid == 65534
    finally:
        shutil.rmtree(src, ignore_errors=True)


def test_list_with_depth_and_symlinks(sbx: Sandbox, work: Path) -> None:
    (work / "d1" / "d2" / "d3").mkdir(parents=True)
    (work / "d1" / "d2" / "d3" / "deep.txt").write_text("deep")
    (work / "d1" / "f1.txt").write_text("1")
    (work / "top.txt").write_text("t")
    (work / "link-to-d1").symlink_to(work / "d1")
    (work / "dangling").symlink_to(work / "nowhere")

    def listed(depth: int) -> list[str]:
        return [os.path.relpath(e.path, work) for e in sbx.files.list(str(work), depth=depth)]

    assert listed(1) == ["d1", "dangling", "link-to-d1", "top.txt"]
    assert listed(2) == ["d1", "d1/d2", "d1/f1.txt", "dangling", "link-to-d1", "top.txt"]
    assert listed(10) == [
        "d1", "d1/d2", "d1/d2/d3", "d1/d2/d3/deep.txt", "d1/f1.txt", "dangling", "link-to-d1",
        "top.txt",
    ]  # fmt: skip

    entries = {e.name: e for e in sbx.files.list(str(work))}
    assert entries["d1"].type == FileType.DIR and entries["d1"].permissions.startswith("d")
    assert entries["top.txt"].type == FileType.FILE and entries["top.txt"].size == 1
    assert entries["link-to-d1"].type == FileType.SYMLINK
    assert entries["link-to-d1"].symlink_target == f"{work}/d1"
    assert entries["link-to-d1"].permissions == "Lrwxrwxrwx"
    assert entries["dangling"].type == FileType.SYMLINK

    # Listing through a symlink shows paths under the name used.
    assert [e.path for e in sbx.files.list(f"{work}/link-to-d1")] == [
        f"{work}/link-to-d1/d2", f"{work}/link-to-d1/f1.txt",
    ]  # fmt: skip
    with pytest.raises(InvalidArgumentException):
        sbx.files.list(f"{work}/top.txt")
    with pytest.raises(FileNotFoundException):
        sbx.files.list(f"{work}/missing")
    with pytest.raises(InvalidArgumentException):
        sbx.files.list(str(work), depth=0)  # refused by the client itself
    assert sbx.files.list(f"{work}/d1/d2/d3/deep.txt/..") != []  # cleaned lexically, like envd


# --- watching -------------------------------------------------------------------------------------


def _wait_for(events: list[FilesystemEvent], want: set[tuple[str, FilesystemEventType]],
              poll: Callable[[], list[FilesystemEvent]],
              timeout: float = 5) -> set[tuple[str, FilesystemEventType]]:  # fmt: skip
    deadline = time.monotonic() + timeout
    seen: set[tuple[str, FilesystemEventType]] = set()
    while time.monotonic() < deadline:
        events.extend(poll())
        seen = {(e.name, e.type) for e in events}
        if want <= seen:
            return seen
        time.sleep(0.05)
    raise AssertionError(f"wanted {want}, saw {seen}")


def test_watch_dir_polling_handle(sbx: Sandbox, work: Path) -> None:
    handle = sbx.files.watch_dir(str(work))
    events: list[FilesystemEvent] = []
    try:
        sbx.files.write(f"{work}/new.txt", "1")
        sbx.files.write(f"{work}/new.txt", "2")
        (work / "plain.txt").write_text("x")
        (work / "plain.txt").unlink()
        sbx.files.make_dir(f"{work}/sub")
        sbx.files.rename(f"{work}/new.txt", f"{work}/renamed.txt")
        sbx.files.remove(f"{work}/renamed.txt")
        seen = _wait_for(events, {
            ("new.txt", FilesystemEventType.CREATE), ("new.txt", FilesystemEventType.WRITE),
            ("plain.txt", FilesystemEventType.CREATE), ("plain.txt", FilesystemEventType.WRITE),
            ("plain.txt", FilesystemEventType.REMOVE), ("sub", FilesystemEventType.CREATE),
            ("new.txt", FilesystemEventType.RENAME), ("renamed.txt", FilesystemEventType.CREATE),
            ("renamed.txt", FilesystemEventType.REMOVE),
        }, poll=handle.get_new_events)  # fmt: skip
        # Upload temp files never show.
        assert all(name.startswith(("new", "plain", "sub", "renamed")) for name, _ in seen)
        # As envd writes a file: created, given to its user, written; replaced: the same
        # without the creation.
        new_txt = [e.type for e in events if e.name == "new.txt"]
        create, chmod, write = (FilesystemEventType.CREATE, FilesystemEventType.CHMOD,
                                FilesystemEventType.WRITE)  # fmt: skip
        assert new_txt[:5] == [create, chmod, write, chmod, write]
    finally:
        handle.stop()
    with pytest.raises(SandboxException):
        handle.get_new_events()  # stopped


def test_watch_dir_errors(sbx: Sandbox, work: Path) -> None:
    with pytest.raises(FileNotFoundException):
        sbx.files.watch_dir(f"{work}/missing")
    (work / "f").write_text("")
    with pytest.raises(InvalidArgumentException):
        sbx.files.watch_dir(f"{work}/f")


def test_watch_dir_stream_recursive_with_entries(
    envd_url: str, work: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("E2B_DEBUG", "true")
    monkeypatch.setenv("E2B_SANDBOX_URL", envd_url)
    monkeypatch.setenv("E2B_API_KEY", "test")

    async def scenario() -> list[FilesystemEvent]:
        sandbox = await AsyncSandbox.create()
        events: list[FilesystemEvent] = []
        exits: list[Exception | None] = []
        handle = await sandbox.files.watch_dir(
            str(work), on_event=events.append, on_exit=exits.append, recursive=True,
            include_entry=True,
        )  # fmt: skip
        await sandbox.files.make_dir(f"{work}/a/b")
        await asyncio.sleep(0.2)  # let the new directories' watches be added
        await sandbox.files.write(f"{work}/a/b/deep.txt", "deep")
        await asyncio.sleep(0.3)  # so the CREATE finds the file to describe in its entry
        (work / "a" / "b" / "deep.txt").unlink()
        deadline = time.monotonic() + 5
        want = {("a/b/deep.txt", FilesystemEventType.CREATE),
                ("a/b/deep.txt", FilesystemEventType.WRITE),
                ("a/b/deep.txt", FilesystemEventType.REMOVE)}  # fmt: skip
        while time.monotonic() < deadline and not want <= {(e.name, e.type) for e in events}:
            await asyncio.sleep(0.05)
        await handle.stop()
        assert exits == [None]
        return events

    events = asyncio.run(scenario())
    seen = {(e.name, e.type) for e in events}
    assert ("a", FilesystemEventType.CREATE) in seen
    assert ("a/b/deep.txt", FilesystemEventType.REMOVE) in seen
    created = next(e for e in events if e.name == "a/b/deep.txt" and e.type.value == "create")
    assert created.entry is not None and created.entry.path == f"{work}/a/b/deep.txt"
    removed = next(e for e in events if e.type == FilesystemEventType.REMOVE)
    assert removed.entry is None


def test_watch_dir_stream_keepalive_and_start(envd_url: str, work: Path) -> None:
    """Raw stream: the start event comes first, then keepalives at the client's interval."""
    frames: list[dict[str, object]] = []
    stream = connect_stream(
        envd_url,
        "/filesystem.Filesystem/WatchDir",
        {"path": str(work)},
        {"Connect-Protocol-Version": "1", "Keepalive-Ping-Interval": "1"},
    )
    for frame in stream:
        frames.append(frame)
        if len(frames) == 1:
            (work / "poke").write_text("")
        if len(frames) >= 4:
            break
    assert frames[0] == {"start": {}}
    assert {"filesystem": {"name": "poke", "type": "EVENT_TYPE_CREATE"}} in frames
    assert {"keepalive": {}} in frames


def test_polling_fallback_reports_create_write_remove(work: Path) -> None:
    events: list[dict[str, object]] = []
    failures: list[str] = []

    async def scenario() -> None:
        watch = DirWatch(str(work), True, False, events.append, failures.append,
                         force_polling=True)  # fmt: skip
        watch.start()
        assert watch.polling
        try:
            (work / "sub").mkdir()
            (work / "sub" / "f.txt").write_text("1")
            await asyncio.sleep(0.6)
            (work / "sub" / "f.txt").write_text("22")
            await asyncio.sleep(0.6)
            (work / "sub" / "f.txt").unlink()
            await asyncio.sleep(0.6)
        finally:
            watch.close()

    asyncio.run(scenario())
    seen = [(e["name"], e["type"]) for e in events]
    assert ("sub", "EVENT_TYPE_CREATE") in seen
    assert ("sub/f.txt", "EVENT_TYPE_CREATE") in seen
    assert ("sub/f.txt", "EVENT_TYPE_WRITE") in seen
    assert ("sub/f.txt", "EVENT_TYPE_REMOVE") in seen
    assert failures == []


# --- big files ------------------------------------------------------------------------------------


def test_50mb_upload_and_download_stream(sbx: Sandbox, envd_url: str, work: Path) -> None:
    size = 50 * 1024 * 1024
    pid = _envd_pid(envd_url)
    source = work / "source.bin"
    digest = hashlib.sha256()
    with open(source, "wb") as f:
        for _ in range(size // (1024 * 1024)):
            chunk = os.urandom(1024 * 1024)
            digest.update(chunk)
            f.write(chunk)
    rss_before = _rss(pid)
    peak = rss_before

    with open(source, "rb") as f:  # a binary file object: streamed octet-stream upload
        sbx.files.write(f"{work}/up.bin", f)
    peak = max(peak, _rss(pid))
    assert hashlib.sha256((work / "up.bin").read_bytes()).digest() == digest.digest()

    got = hashlib.sha256()
    received = 0
    with sbx.files.read(f"{work}/up.bin", format="stream") as stream:
        for chunk in stream:
            got.update(chunk)
            received += len(chunk)
            if received % (8 * 1024 * 1024) < len(chunk):
                peak = max(peak, _rss(pid))
    assert received == size and got.digest() == digest.digest()

    # The same through a multipart body (bytes data: the client builds the form in memory).
    sbx.files.write(f"{work}/multipart.bin", source.read_bytes())
    peak = max(peak, _rss(pid))
    assert (work / "multipart.bin").stat().st_size == size

    # envd never held a whole file: its RSS grew by far less than the 50 MB that went through.
    assert peak - rss_before < 20 * 1024 * 1024, (rss_before, peak)


# --- wire details -------------------------------------------------------------------------------


def test_entry_info_wire_format(envd_url: str, work: Path) -> None:
    (work / "f").write_text("")
    os.utime(work / "f", ns=(0, 1_700_000_000_000_000_000))
    r = httpx.post(f"{envd_url}/filesystem.Filesystem/Stat", json={"path": f"{work}/f"},
                   headers={"Connect-Protocol-Version": "1"})  # fmt: skip
    assert r.status_code == 200
    assert r.json() == {
        "entry": {
            "name": "f",
            "type": "FILE_TYPE_FILE",
            "path": f"{work}/f",
            "mode": 0o644,
            "permissions": "-rw-r--r--",
            "owner": "root",
            "group": "root",
            "modifiedTime": "2023-11-14T22:13:20Z",
        }
    }  # fmt: skip  (size 0 is a default value: omitted)
    r = httpx.post(f"{envd_url}/filesystem.Filesystem/ListDir", json={"path": f"{work}/f"},
                   headers={"Connect-Protocol-Version": "1"})  # fmt: skip
    assert (r.status_code, r.json()["code"]) == (400, "invalid_argument")
    r = httpx.post(f"{envd_url}/filesystem.Filesystem/GetWatcherEvents", json={"watcherId": "w0"})
    assert (r.status_code, r.json()["code"]) == (404, "not_found")


def test_helpers() -> None:
    assert go_mode_string(0o40755) == "drwxr-xr-x"
    assert go_mode_string(0o41777) == "dtrwxrwxrwx"
    assert go_mode_string(0o104755) == "urwxr-xr-x"  # Go has no "-" before flags
    assert go_mode_string(0o20666) == "Dcrw-rw-rw-"
    assert protobuf_timestamp(1_700_000_000_500_000_000) == "2023-11-14T22:13:20.500Z"
    assert protobuf_timestamp(1_700_000_000_000_001_000) == "2023-11-14T22:13:20.000001Z"
    assert protobuf_timestamp(1) == "1970-01-01T00:00:00.000000001Z"
    assert accept_gzip("gzip, deflate") is True
    assert accept_gzip("") is False
    assert accept_gzip("identity") is False
    assert accept_gzip("gzip;q=0.5, identity") is False
    assert accept_gzip("*, identity;q=0") is True
    assert part_filename('form-data; name="file"; filename="/a/b %22q%22 \\\\x.txt"') == (
        "file", '/a/b "q" \\x.txt',
    )  # fmt: skip
    assert part_filename("form-data; name=file; filename*=utf-8''%C3%A9.txt") == ("file", "é.txt")

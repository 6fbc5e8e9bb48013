"""The volume content API's file operations (node/volume_files.py), on a real directory tree,
with what a hostile sandbox could plant in it: links out of the volume, fifos, swaps."""

from __future__ import annotations

import errno
import os
import stat
import threading
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from vivarium.errors import Conflict, InvalidArgument, NotFound
from vivarium.node import volume_files
from vivarium.node.volume_files import PendingWrite, VolumeFiles, VolumeFull

SECRET = b"host secret"


@pytest.fixture(autouse=True)
def _root() -> None:
    if os.geteuid() != 0:
        pytest.fail("chowns files: needs root (`make test`)")


@pytest.fixture
def root(tmp_path: Path) -> Path:
    data = tmp_path / "data"
    data.mkdir()
    return data


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """A host directory next to the volume that no call may reach."""
    place = tmp_path / "outside"
    place.mkdir()
    (place / "secret").write_bytes(SECRET)
    os.chmod(place / "secret", 0o600)
    return place


@pytest.fixture
def files(root: Path) -> VolumeFiles:
    return VolumeFiles(root)


def _write(files: VolumeFiles, path: str, data: bytes, **kwargs: Any) -> dict[str, Any]:
    with files.open_write(path, **kwargs) as pending:
        pending.write(data)
        return pending.commit()


def _read(files: VolumeFiles, path: str) -> bytes:
    fd, size = files.open_read(path)
    try:
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
    finally:
        os.close(fd)
    data = b"".join(chunks)
    assert len(data) == size
    return data


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _assert_outside_untouched(outside: Path) -> None:
    assert sorted(os.listdir(outside)) == ["secret"]
    assert (outside / "secret").read_bytes() == SECRET
    st = os.stat(outside / "secret")
    assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o600, 0, 0)


# stat


def test_stat_describes_the_root_a_file_a_directory_and_a_link(
    files: VolumeFiles, root: Path
) -> None:
    (root / "file").write_bytes(b"hello")
    os.chmod(root / "file", 0o640)
    (root / "dir").mkdir()
    (root / "link").symlink_to("file")

    top = files.stat("/")
    assert (top["name"], top["type"], top["path"]) == ("/", "directory", "/")
    assert "target" not in top

    entry = files.stat("/file")
    assert entry["name"] == "file"
    assert entry["type"] == "file"
    assert entry["path"] == "/file"
    assert entry["size"] == 5
    assert entry["mode"] == 0o640
    assert (entry["uid"], entry["gid"]) == (0, 0)
    for key in ("atime", "mtime", "ctime"):
        assert entry[key].endswith("Z")
        assert datetime.fromisoformat(entry[key]).timestamp() == pytest.approx(
            getattr(os.stat(root / "file"), f"st_{key}"), abs=1e-5
        )
    assert "target" not in entry

    assert files.stat("dir")["type"] == "directory"
    link = files.stat("/link")
    assert (link["type"], link["target"]) == ("symlink", "file")

    with pytest.raises(NotFound, match="'/missing' not found"):
        files.stat("/missing")


def test_other_kinds_of_entries_are_unknown(files: VolumeFiles, root: Path) -> None:
    os.mkfifo(root / "pipe")
    assert files.stat("/pipe")["type"] == "unknown"


# list_dir


def test_list_dir_sorts_by_name_and_descends_as_deep_as_asked(
    files: VolumeFiles, root: Path
) -> None:
    (root / "b").mkdir()
    (root / "b" / "z").write_bytes(b"z")
    (root / "b" / "y").mkdir()
    (root / "b" / "y" / "deep").write_bytes(b"")
    (root / "a").write_bytes(b"a")
    (root / "c").mkdir()

    assert [e["path"] for e in files.list_dir("/")] == ["/a", "/b", "/c"]
    assert [e["path"] for e in files.list_dir("/", depth=2)] == ["/a", "/b", "/b/y", "/b/z", "/c"]
    assert [e["path"] for e in files.list_dir("/", depth=3)] == [
        "/a",
        "/b",
        "/b/y",
        "/b/y/deep",
        "/b/z",
        "/c",
    ]
    assert [e["name"] for e in files.list_dir("b")] == ["y", "z"]
    assert files.list_dir("/c") == []


def test_list_dir_never_enters_a_linked_directory(
    files: VolumeFiles, root: Path, outside: Path
) -> None:
    (root / "inside").mkdir()
    (root / "inside" / "f").write_bytes(b"")
    (root / "out").symlink_to(outside)
    (root / "again").symlink_to("inside")

    paths = [e["path"] for e in files.list_dir("/", depth=5)]
    assert paths == ["/again", "/inside", "/inside/f", "/out"]
    out = files.list_dir("/")[2]
    assert (out["type"], out["target"]) == ("symlink", str(outside))

    with pytest.raises(NotFound, match="symbolic link"):
        files.list_dir("/out")


def test_list_dir_refuses_what_it_cannot_list(files: VolumeFiles, root: Path) -> None:
    (root / "file").write_bytes(b"")
    with pytest.raises(InvalidArgument, match="not a directory"):
        files.list_dir("/file")
    with pytest.raises(NotFound):
        files.list_dir("/missing")
    for depth in (0, -1, volume_files.MAX_DEPTH + 1):
        with pytest.raises(InvalidArgument, match="depth"):
            files.list_dir("/", depth=depth)


def test_list_dir_caps_its_entries(
    files: VolumeFiles, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(volume_files, "MAX_ENTRIES", 3)
    (root / "d").mkdir()
    for name in ("1", "2", "3"):
        (root / "d" / name).write_bytes(b"")
    assert len(files.list_dir("/d")) == 3
    with pytest.raises(InvalidArgument, match="smaller depth"):
        files.list_dir("/", depth=2)


# make_dir


def test_make_dir_gives_the_default_user_a_755_directory(files: VolumeFiles, root: Path) -> None:
    entry = files.make_dir("/new")
    assert (entry["type"], entry["path"], entry["name"]) == ("directory", "/new", "new")
    assert (entry["uid"], entry["gid"], entry["mode"]) == (1000, 1000, 0o755)
    st = os.stat(root / "new")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1000, 1000, 0o755)


def test_make_dir_takes_an_owner_and_mode(files: VolumeFiles, root: Path) -> None:
    entry = files.make_dir("/shared", uid=0, gid=2000, mode=0o2770)
    assert (entry["uid"], entry["gid"], entry["mode"]) == (0, 2000, 0o2770)
    st = os.stat(root / "shared")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 2000, 0o2770)


def test_make_dir_needs_force_for_missing_parents(files: VolumeFiles, root: Path) -> None:
    with pytest.raises(NotFound, match="'/a' not found"):
        files.make_dir("/a/b/c")
    assert not (root / "a").exists()

    entry = files.make_dir("/a/b/c", force=True, uid=1500, gid=1600, mode=0o700)
    assert entry["path"] == "/a/b/c"
    for made in ("a", "a/b", "a/b/c"):
        st = os.stat(root / made)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1500, 1600, 0o700)
    # Parents that exist are left as they are.
    files.make_dir("/a/b/d", force=True)
    assert stat.S_IMODE(os.stat(root / "a").st_mode) == 0o700


def test_make_dir_refuses_what_exists(files: VolumeFiles, root: Path) -> None:
    (root / "d").mkdir()
    (root / "f").write_bytes(b"")
    for path in ("/d", "/f", "/"):
        with pytest.raises(Conflict, match="already exists"):
            files.make_dir(path)
    with pytest.raises(Conflict):
        files.make_dir("/d", force=True)
    with pytest.raises(InvalidArgument, match="'/f' is not a directory"):
        files.make_dir("/f/sub", force=True)


# writing and reading


def test_a_written_file_reads_back(files: VolumeFiles, root: Path) -> None:
    data = os.urandom(300_000)
    entry = _write(files, "/blob", data)
    assert (entry["type"], entry["path"], entry["size"]) == ("file", "/blob", len(data))
    assert (entry["uid"], entry["gid"], entry["mode"]) == (1000, 1000, 0o644)
    st = os.stat(root / "blob")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1000, 1000, 0o644)
    assert _read(files, "/blob") == data

    assert _write(files, "/empty", b"")["size"] == 0
    assert _read(files, "/empty") == b""


def test_a_write_takes_an_owner_and_mode(files: VolumeFiles, root: Path) -> None:
    entry = _write(files, "/script", b"#!/bin/sh\n", uid=0, gid=0, mode=0o4755)
    assert (entry["uid"], entry["gid"], entry["mode"]) == (0, 0, 0o4755)
    st = os.stat(root / "script")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o4755)


def test_a_write_replaces_a_file_all_at_once(files: VolumeFiles, root: Path) -> None:
    _write(files, "/f", b"old content")
    pending = files.open_write("/f")
    pending.write(b"new ")
    pending.write(b"content, longer")
    # Until the commit, readers see the old file whole, and nothing else by its name.
    assert _read(files, "/f") == b"old content"
    temps = [name for name in os.listdir(root) if name != "f"]
    assert len(temps) == 1 and temps[0].startswith(".f.vivarium-")
    pending.commit()
    assert _read(files, "/f") == b"new content, longer"
    assert os.listdir(root) == ["f"]


def test_a_new_file_appears_only_on_commit(files: VolumeFiles, root: Path) -> None:
    pending = files.open_write("/new")
    pending.write(b"data")
    with pytest.raises(NotFound):
        files.stat("/new")
    pending.commit()
    assert _read(files, "/new") == b"data"
    with pytest.raises(ValueError, match="already ended"):
        pending.write(b"more")
    pending.abort()  # after a commit: nothing to do
    assert _read(files, "/new") == b"data"


def test_an_aborted_write_leaves_nothing(files: VolumeFiles, root: Path) -> None:
    _write(files, "/kept", b"kept")
    pending = files.open_write("/kept")
    pending.write(b"discarded")
    pending.abort()
    pending.abort()
    assert os.listdir(root) == ["kept"]
    assert _read(files, "/kept") == b"kept"

    with pytest.raises(RuntimeError), files.open_write("/never") as pending:
        pending.write(b"x")
        raise RuntimeError
    assert os.listdir(root) == ["kept"]


def test_a_write_needs_force_for_missing_parents(files: VolumeFiles, root: Path) -> None:
    with pytest.raises(NotFound):
        files.open_write("/a/b/f")
    assert os.listdir(root) == []
    _write(files, "/a/b/f", b"x", force=True, uid=0, gid=0, mode=0o600)
    # Made parents belong to the default user whoever the file is for.
    for made in ("a", "a/b"):
        st = os.stat(root / made)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1000, 1000, 0o755)
    st = os.stat(root / "a/b/f")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, 0, 0o600)


def test_a_write_refuses_a_directory_and_the_root(files: VolumeFiles, root: Path) -> None:
    (root / "d").mkdir()
    with pytest.raises(InvalidArgument, match="'/d' is a directory"):
        files.open_write("/d")
    with pytest.raises(InvalidArgument, match="root"):
        files.open_write("/")
    assert os.listdir(root) == ["d"]


def test_a_write_replaces_a_link_without_following_it(
    files: VolumeFiles, root: Path, outside: Path
) -> None:
    (root / "link").symlink_to(outside / "secret")
    _write(files, "/link", b"mine")
    assert not (root / "link").is_symlink()
    assert _read(files, "/link") == b"mine"
    _assert_outside_untouched(outside)


def test_a_long_name_gets_a_temporary_name_that_fits(files: VolumeFiles, root: Path) -> None:
    name = "é" * 127  # 254 bytes
    _write(files, name, b"x")
    assert os.listdir(root) == [name]


def test_a_full_volume_says_so_and_drops_the_partial_file(
    files: VolumeFiles, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pending = files.open_write("/big")
    real_write = os.write

    def full(fd: int, data: Any) -> int:
        if fd == pending.fd:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", full)
    with pytest.raises(VolumeFull) as raised:
        pending.write(b"data")
    monkeypatch.undo()
    assert raised.value.http_status == 507
    assert raised.value.code == "volume_full"
    assert "full" in raised.value.message
    assert raised.value.hint == "delete files from it"
    assert os.listdir(root) == []
    pending.abort()


def test_a_quota_at_commit_is_a_full_volume_too(
    files: VolumeFiles, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pending = files.open_write("/f")
    pending.write(b"data")

    def no_space(fd: int) -> None:
        raise OSError(errno.EDQUOT, os.strerror(errno.EDQUOT))

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(VolumeFull):
        pending.commit()
    assert os.listdir(root) == []


def test_reading_refuses_what_is_not_a_regular_file(files: VolumeFiles, root: Path) -> None:
    (root / "d").mkdir()
    (root / "f").write_bytes(b"")
    (root / "link").symlink_to("f")
    with pytest.raises(InvalidArgument, match="'/d' is a directory"):
        files.open_read("/d")
    with pytest.raises(InvalidArgument, match="directory"):
        files.open_read("/")
    with pytest.raises(InvalidArgument, match="not a regular file") as raised:
        files.open_read("/link")
    assert "symbolic link" in str(raised.value)
    with pytest.raises(NotFound):
        files.open_read("/missing")
    with pytest.raises(InvalidArgument, match="not a directory"):
        files.open_read("/f/x")


def test_reading_a_fifo_is_refused_without_hanging(
    files: VolumeFiles, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    os.mkfifo(root / "pipe")
    with pytest.raises(InvalidArgument, match="not a regular file"):
        files.open_read("/pipe")

    # A fifo swapped in after the first check: the open must not block for a writer.
    checked = volume_files._check_regular
    calls = []

    def first_passes(st: os.stat_result, shown: str) -> None:
        calls.append(shown)
        if len(calls) > 1:
            checked(st, shown)

    monkeypatch.setattr(volume_files, "_check_regular", first_passes)
    outcome: list[BaseException] = []

    def attempt() -> None:
        try:
            files.open_read("/pipe")
        except BaseException as exc:
            outcome.append(exc)

    thread = threading.Thread(target=attempt, daemon=True)
    thread.start()
    thread.join(10)
    assert not thread.is_alive(), "open_read blocked on a fifo"
    assert len(outcome) == 1 and isinstance(outcome[0], InvalidArgument)
    assert len(calls) == 2


# paths


def test_paths_are_normalised(files: VolumeFiles, root: Path) -> None:
    (root / "a").mkdir()
    _write(files, "a/b", b"x")
    for path in ("/a/b", "a/b", "./a/b", "//a/./b/", "/./a//b"):
        assert files.stat(path)["path"] == "/a/b"
    for path in ("", ".", "/", "//", "/./"):
        assert files.stat(path)["path"] == "/"


@pytest.mark.parametrize(
    "path",
    ["/../etc/passwd", "a/../../x", "..", "/a/..", "/a\0b", "/" + "x" * 256, "x" * 4097],
)
def test_escaping_or_malformed_paths_are_refused(files: VolumeFiles, root: Path, path: str) -> None:
    (root / "a").mkdir()
    for call in (
        files.stat,
        files.list_dir,
        files.make_dir,
        files.open_read,
        files.remove,
        files.update,
    ):
        with pytest.raises(InvalidArgument):
            call(path)
    with pytest.raises(InvalidArgument):
        files.open_write(path)
    assert os.listdir(root) == ["a"]


def test_a_name_of_255_bytes_is_fine(files: VolumeFiles) -> None:
    assert files.make_dir("/" + "x" * 255)["name"] == "x" * 255


# links out of the volume


def test_a_link_inside_a_path_is_never_followed(
    files: VolumeFiles, root: Path, outside: Path
) -> None:
    (root / "escape").symlink_to(outside)
    (root / "d").mkdir()
    (root / "d" / "up").symlink_to("../..")

    for base in ("/escape", "/d/up/outside"):
        with pytest.raises(NotFound, match="symbolic link"):
            files.stat(f"{base}/secret")
        with pytest.raises(NotFound, match="symbolic link"):
            files.open_read(f"{base}/secret")
        with pytest.raises(NotFound, match="symbolic link"):
            files.open_write(f"{base}/secret")
        with pytest.raises(NotFound, match="symbolic link"):
            files.open_write(f"{base}/new", force=True)
        with pytest.raises(NotFound, match="symbolic link"):
            files.make_dir(f"{base}/new")
        with pytest.raises(NotFound, match="symbolic link"):
            files.make_dir(f"{base}/new/deeper", force=True)
        with pytest.raises(NotFound, match="symbolic link"):
            files.remove(f"{base}/secret")
        with pytest.raises(NotFound, match="symbolic link"):
            files.update(f"{base}/secret", uid=1000, gid=1000, mode=0o777)
        with pytest.raises(NotFound, match="symbolic link"):
            files.list_dir(base)
    _assert_outside_untouched(outside)
    assert sorted(os.listdir(root)) == ["d", "escape"]


def test_a_link_at_the_end_of_a_path_is_the_link(
    files: VolumeFiles, root: Path, outside: Path
) -> None:
    (root / "secret").symlink_to(outside / "secret")
    (root / "place").symlink_to(outside)

    assert files.stat("/secret")["target"] == str(outside / "secret")
    with pytest.raises(InvalidArgument, match="not a regular file"):
        files.open_read("/secret")
    with pytest.raises(Conflict):
        files.make_dir("/place")

    entry = files.update("/secret", uid=1234, gid=1234, mode=0o777)
    assert (entry["type"], entry["uid"], entry["gid"]) == ("symlink", 1234, 1234)
    assert os.lstat(root / "secret").st_uid == 1234

    files.remove("/secret")
    files.remove("/place")
    assert os.listdir(root) == []
    _assert_outside_untouched(outside)


# remove


def test_remove_takes_files_links_and_whole_trees(
    files: VolumeFiles, root: Path, outside: Path
) -> None:
    (root / "f").write_bytes(b"")
    files.remove("/f")

    tree = root / "tree"
    (tree / "a" / "b" / "c").mkdir(parents=True)
    (tree / "a" / "b" / "c" / "f").write_bytes(b"x")
    (tree / "a" / "g").write_bytes(b"y")
    (tree / "a" / "out").symlink_to(outside)
    (tree / "a" / "b" / "secret").symlink_to(outside / "secret")
    (tree / "a" / "b" / "loop").symlink_to("..")
    os.mkfifo(tree / "pipe")
    os.link(outside / "secret", tree / "hard")
    (tree / "empty").mkdir()
    os.chmod(tree / "a" / "b", 0o000)  # root removes it all the same
    files.remove("tree")

    assert os.listdir(root) == []
    _assert_outside_untouched(outside)

    with pytest.raises(NotFound, match="'/tree' not found"):
        files.remove("/tree")
    with pytest.raises(InvalidArgument, match="root cannot be removed"):
        files.remove("/")
    with pytest.raises(InvalidArgument, match="root cannot be removed"):
        files.remove("/./")


def test_remove_bounds_how_deep_it_goes(
    files: VolumeFiles, root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(volume_files, "MAX_REMOVE_DEPTH", 3)
    (root / "a" / "b" / "c").mkdir(parents=True)
    files.remove("/a")
    (root / "a" / "b" / "c" / "d").mkdir(parents=True)
    with pytest.raises(InvalidArgument, match="more than 3 deep"):
        files.remove("/a")


# update


def test_update_changes_mode_and_owner(files: VolumeFiles, root: Path) -> None:
    (root / "f").write_bytes(b"x")
    (root / "d").mkdir()

    entry = files.update("/f", mode=0o600)
    assert (entry["mode"], entry["uid"], entry["gid"]) == (0o600, 0, 0)
    entry = files.update("/f", uid=1000)
    assert (entry["mode"], entry["uid"], entry["gid"]) == (0o600, 1000, 0)
    entry = files.update("/f", gid=2000)
    assert (entry["mode"], entry["uid"], entry["gid"]) == (0o600, 1000, 2000)
    st = os.stat(root / "f")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (1000, 2000, 0o600)

    entry = files.update("/d", uid=1000, gid=1000, mode=0o1777)
    assert (entry["type"], entry["mode"], entry["uid"]) == ("directory", 0o1777, 1000)

    before = files.stat("/f")
    assert files.update("/f") == before

    top = files.update("/", mode=0o750, uid=1000, gid=1000)
    assert (top["path"], top["mode"], top["uid"]) == ("/", 0o750, 1000)
    assert stat.S_IMODE(os.stat(root).st_mode) == 0o750

    with pytest.raises(NotFound):
        files.update("/missing", mode=0o600)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"mode": 0o10000},
        {"mode": -1},
        {"uid": -1},
        {"gid": -1},
        {"uid": 2**32 - 1},
        {"gid": 2**32},
    ],
)
def test_out_of_range_owners_and_modes_are_refused(
    files: VolumeFiles, root: Path, kwargs: dict[str, Any]
) -> None:
    (root / "f").write_bytes(b"")
    with pytest.raises(InvalidArgument):
        files.update("/f", **kwargs)
    with pytest.raises(InvalidArgument):
        files.make_dir("/d", **kwargs)
    with pytest.raises(InvalidArgument):
        files.open_write("/g", **kwargs)
    assert os.listdir(root) == ["f"]


# descriptors


def test_no_call_leaks_a_descriptor(files: VolumeFiles, root: Path, outside: Path) -> None:
    (root / "escape").symlink_to(outside)
    os.mkfifo(root / "pipe")
    before = _open_fds()
    for _ in range(3):
        _write(files, "/a/b/f", b"x", force=True)
        files.make_dir("/a/c")
        files.list_dir("/", depth=4)
        files.stat("/a/b/f")
        files.update("/a/b/f", mode=0o600)
        assert _read(files, "/a/b/f") == b"x"
        pending: PendingWrite = files.open_write("/a/g")
        pending.abort()
        for failing in (
            lambda: files.stat("/escape/secret"),
            lambda: files.open_read("/pipe"),
            lambda: files.open_read("/a"),
            lambda: files.open_write("/a"),
            lambda: files.make_dir("/a"),
            lambda: files.list_dir("/escape"),
            lambda: files.remove("/missing/x"),
        ):
            with pytest.raises((InvalidArgument, NotFound, Conflict)):
                failing()
        files.remove("/a")
    assert _open_fds() == before


# what else a sandbox can do


def test_a_write_stays_where_its_directory_went(
    files: VolumeFiles, root: Path, outside: Path
) -> None:
    (root / "dir").mkdir()
    pending = files.open_write("/dir/secret")
    pending.write(b"mine")
    # The sandbox moves the directory away and leaves a link out of the volume in its place.
    os.rename(root / "dir", root / "moved")
    (root / "dir").symlink_to(outside)
    pending.commit()
    assert (root / "moved" / "secret").read_bytes() == b"mine"
    _assert_outside_untouched(outside)


def test_names_that_are_not_utf8_are_shown_replaced(files: VolumeFiles, root: Path) -> None:
    os.mkdir(os.path.join(os.fsencode(root), b"bad\xff"))
    (entry,) = files.list_dir("/")
    assert (entry["name"], entry["path"]) == ("bad\ufffd", "/bad\ufffd")
    entry["name"].encode("utf-8")
    # Reachable by the name's bytes all the same.
    assert files.stat(os.fsdecode(b"/bad\xff"))["type"] == "directory"


def test_times_beyond_what_a_date_can_hold_are_clamped(files: VolumeFiles, root: Path) -> None:
    (root / "f").write_bytes(b"")
    os.utime(root / "f", ns=(-(2**62), 2**62))  # what the file system keeps of it varies
    entry = files.stat("/f")
    assert entry["atime"].endswith("Z") and entry["mtime"].endswith("Z")
    # Where a file system keeps 64-bit seconds:
    assert volume_files._time(-(2.0**62)) == "0001-01-01T00:00:00Z"
    assert volume_files._time(2.0**62) == "9999-12-31T23:59:59Z"

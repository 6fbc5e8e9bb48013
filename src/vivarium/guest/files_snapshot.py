"""A sandbox's files as a filesystem-only snapshot: what changed since its template was made,
taken from inside (runsc keeps the writable layer in a format of its own, which the host cannot
read), and laid back over a freshly started template.

The node runs it as root through `runsc exec`, with the template's Python:

    python3 -I /opt/vivarium/guest/files_snapshot.py capture <template time>   (tar to stdout)
    python3 -I /opt/vivarium/guest/files_snapshot.py apply <tar>

`capture` writes every entry whose data or metadata changed after the template's checkpoint
(mtime or ctime later than it: a write, a chmod, a create, an unpacked file with an old mtime
all count) and, as a last member, the listing of every directory that changed. `apply` runs in
a sandbox restored from that template: it extracts the entries, then removes from each listed
directory what the listing does not name (the files the user deleted). Mounts other than the
root (/proc, /dev, volumes, the hub) are neither saved nor touched, nor is /opt/vivarium: the
sandbox's machinery comes from its template, whatever was done to it. Standard library only.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import sys
import tarfile
from typing import BinaryIO

LISTING = "opt/vivarium/files-snapshot/directories.json"
OURS = "/opt/vivarium"


def _unescape(field: str) -> str:
    """A mount point as /proc/self/mountinfo writes it: space, tab, newline, backslash octal."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _skipped() -> set[str]:
    """Mount points other than the root, and our own directory."""
    with open("/proc/self/mountinfo") as f:
        points = {_unescape(line.split()[4]) for line in f}
    points.discard("/")
    return points | {OURS}


def capture(since: float, out: tarfile.TarFile) -> None:
    skip = _skipped()
    listings: dict[str, list[str]] = {}
    pending = ["/"]
    while pending:
        directory = pending.pop()
        try:
            entries = sorted(os.scandir(directory), key=lambda e: e.name)
        except OSError:
            continue  # gone meanwhile, or unreadable: nothing to keep
        try:
            st = os.lstat(directory)
        except OSError:
            continue
        if max(st.st_mtime, st.st_ctime) > since:
            listings[directory] = [e.name for e in entries]
            if directory != "/":
                _add(out, directory)
        for entry in entries:
            if entry.path in skip:
                continue
            try:
                est = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISDIR(est.st_mode):
                pending.append(entry.path)
            elif max(est.st_mtime, est.st_ctime) > since and not stat.S_ISSOCK(est.st_mode):
                _add(out, entry.path)
    data = json.dumps(listings).encode()
    info = tarfile.TarInfo(LISTING)
    info.size = len(data)
    out.addfile(info, _Reader(data))


class _Reader:
    def __init__(self, data: bytes) -> None:
        self.data, self.at = data, 0

    def read(self, size: int = -1) -> bytes:
        end = len(self.data) if size < 0 else self.at + size
        chunk, self.at = self.data[self.at : end], min(end, len(self.data))
        return chunk


class _Exactly:
    """A file read as exactly the size its header says: programs keep running during a
    capture, and a file that shrank meanwhile must not break the stream (it is padded)."""

    def __init__(self, f: BinaryIO) -> None:
        self.f = f

    def read(self, size: int = -1) -> bytes:
        try:
            data = self.f.read(size)
        except OSError:
            data = b""
        return data + b"\0" * (size - len(data))


def _add(out: tarfile.TarFile, path: str) -> None:
    try:
        info = out.gettarinfo(path)
        if info is None:  # a socket or the like
            return
        if not info.isreg() or info.islnk():
            out.addfile(info)
            return
        # Not blocking on a fifo swapped in since the stat, nor following a link.
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC)
        with os.fdopen(fd, "rb") as f:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                return
            out.addfile(info, _Exactly(f))
    except OSError:
        return  # removed, or unreadable, while we read it


def remove_path(path: str) -> None:
    """Remove what is at `path`, never following a link."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path, ignore_errors=True)  # rmtree does not follow symbolic links
    else:
        os.unlink(path)


def apply(archive: tarfile.TarFile) -> None:
    skip = _skipped()
    listings: dict[str, list[str]] = {}
    for member in archive:
        if member.name == LISTING:
            reader = archive.extractfile(member)
            listings = json.loads(reader.read()) if reader else {}
            continue
        target = "/" + member.name.lstrip("/")
        if any(target == p or target.startswith(p + "/") for p in skip):
            continue
        try:  # an entry whose kind changed (a file where a directory was) is replaced
            st = os.lstat(target)
            if stat.S_ISDIR(st.st_mode) != member.isdir():
                remove_path(target)
        except FileNotFoundError:
            pass
        archive.extract(member, "/", set_attrs=True, numeric_owner=True)
    for directory, kept in listings.items():
        if any(directory == p or directory.startswith(p + "/") for p in skip):
            continue
        try:
            present = os.listdir(directory)
        except OSError:
            continue
        keep = set(kept)
        for name in present:
            path = os.path.join(directory, name)
            if name not in keep and path not in skip:
                remove_path(path)


def main(argv: list[str]) -> None:
    if argv[:1] == ["capture"] and len(argv) == 2:
        with tarfile.open(fileobj=sys.stdout.buffer, mode="w|") as out:
            capture(float(argv[1]), out)
    elif argv[:1] == ["apply"] and len(argv) == 2:
        with tarfile.open(argv[1], mode="r:") as archive:
            apply(archive)
    else:
        sys.exit("usage: files_snapshot.py capture <since> | apply <tar>")


if __name__ == "__main__":
    main(sys.argv[1:])

"""The layer cache of team template builds: what each step wrote, kept under a hash of the
step and everything before it, so a rebuild runs again only from its first changed step.

A step runs on an overlayfs: the cached layers below it, read-only, and an empty upper
directory on the build's scratch file system (what one step can write is bounded by it, not by
the host's disk). That upper directory, once the step is done, is the step's layer, in
overlayfs's own format: Docker's layers are the same thing (a deleted file is a "whiteout", a
character device 0:0; a directory that replaced one below is marked opaque).

Layers are shared by the templates of one team that start the same way; a team never gets
another team's layers (what a step fetched may be for that team alone), so the scope of every
chain is the team. The template's own root filesystem is flattened from them: the base's files
with each layer applied in order (`apply`), so a template does not depend on the cache, which
is pruned, least recently used first, past its budget.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vivarium.guest.files_snapshot import remove_path
from vivarium.proc import run_sync

log = logging.getLogger(__name__)

META = "layer.json"
DIFF = "diff"
OPAQUE = "trusted.overlay.opaque"
OVERLAY_XATTRS = "trusted.overlay."
BUDGET_BYTES = 16 << 30  # the cache's size past which the least recently used layers go
TRASH = ".replaced."  # a layer a step replaced, kept while a build may still stand on it
TRASH_AGE_S = 86400.0
# The upper directory holds whiteouts and opaque marks only: no redirects, metacopy or index
# entries, which need the very same lower layers (by file handle) to mean anything.
OVERLAY_OPTIONS = "redirect_dir=off,metacopy=off,index=off,xino=off"


def chain(parent: str, part: str) -> str:
    """The key of a step: its parent's key and what the step is."""
    return hashlib.sha256(f"{parent}\0{part}".encode()).hexdigest()


@dataclass(frozen=True)
class Layer:
    key: str
    path: Path
    context: dict[str, Any]  # what the next step runs with (user, directory, environment)
    size: int

    @property
    def diff(self) -> Path:
        return self.path / DIFF

    @property
    def empty(self) -> bool:
        return not any(self.diff.iterdir())


class LayerCache:
    def __init__(self, root: Path, budget_bytes: int = BUDGET_BYTES) -> None:
        self.root = root
        self.budget = budget_bytes
        self._in_use: dict[str, int] = {}  # keys of layers running builds stand on
        self._lock = threading.Lock()

    def get(self, key: str) -> Layer | None:
        """The layer `key`, held (not pruned) until `release`; None if not kept."""
        path = self.root / key
        with self._lock:  # found and held at once: prune checks holds under the same lock
            try:
                meta = json.loads((path / META).read_text())
                os.utime(path / META)  # used now: the last to be pruned
            except (OSError, ValueError):
                return None
            self._in_use[key] = self._in_use.get(key, 0) + 1
        return Layer(key, path, meta["context"], int(meta["size"]))

    def put(self, key: str, upper: Path | None, context: dict[str, Any]) -> Layer:
        """Keep `upper` (a step's overlayfs upper directory; None for a step that writes no
        files) as the layer `key`, held until `release`. A step that ran replaces what was kept
        under its key (it ran because the cache was skipped, or a step before it changed)."""
        self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
        unique = f"{os.getpid()}.{threading.get_ident()}.{time.monotonic_ns()}"
        partial = self.root / f".{key}.{unique}"
        partial.mkdir()
        try:
            if upper is None:
                (partial / DIFF).mkdir()
            else:  # -a keeps owners, modes, links, devices (whiteouts) and xattrs (opaque marks)
                run_sync(["cp", "-a", "--", str(upper), str(partial / DIFF)], timeout=3600)
            size = _disk_usage(partial / DIFF)
            (partial / META).write_text(json.dumps({"context": context, "size": size}))
            path, old = self.root / key, self.root / f"{TRASH}{key}.{unique}"
            with self._lock:
                held = key in self._in_use
                if path.exists():
                    path.rename(old)  # another build may stand on it: removed by prune later
                partial.rename(path)
                self._in_use[key] = self._in_use.get(key, 0) + 1
        except BaseException:
            shutil.rmtree(partial, ignore_errors=True)
            raise
        if old.exists() and not held:
            shutil.rmtree(old, ignore_errors=True)
        return Layer(key, path, context, size)

    def release(self, key: str) -> None:
        with self._lock:
            self._in_use[key] -= 1
            if not self._in_use[key]:
                del self._in_use[key]

    def prune(self) -> int:
        """Remove the least recently used layers no build stands on until the cache is within
        its budget, and replaced layers a day old; returns how many went."""
        removed = 0
        for old in self.root.glob(f"{TRASH}*"):
            with contextlib.suppress(OSError):
                if time.time() - old.stat().st_mtime > TRASH_AGE_S:
                    shutil.rmtree(old, ignore_errors=True)
                    removed += 1
        layers = []
        for meta in self.root.glob(f"*/{META}"):
            try:
                layers.append((meta.stat().st_mtime, meta.parent,
                               int(json.loads(meta.read_text())["size"])))  # fmt: skip
            except (OSError, ValueError, KeyError):
                continue
        total = sum(size for _, _, size in layers)
        for _, path, size in sorted(layers):
            if total <= self.budget:
                break
            with self._lock:
                if path.name in self._in_use:
                    continue
                (path / META).unlink(missing_ok=True)  # no longer found before it is gone
            shutil.rmtree(path, ignore_errors=True)
            total -= size
            removed += 1
        return removed


def _disk_usage(path: Path) -> int:
    total = path.lstat().st_blocks * 512
    for dirpath, dirnames, filenames in os.walk(path):
        for name in dirnames + filenames:
            total += os.lstat(os.path.join(dirpath, name)).st_blocks * 512
    return total


def mount_overlay(target: Path, lowers: list[Path], upper: Path, work: Path) -> None:
    """`lowers` (topmost first) under `upper`, at `target`. The lower paths go through short
    links beside `work`: the mount's options fit in one page, and a build has up to 512 steps."""
    links = work.parent / "l"
    shutil.rmtree(links, ignore_errors=True)
    links.mkdir()
    for index, lower in enumerate(lowers):
        (links / str(index)).symlink_to(lower)
    lowerdir = ":".join(f"l/{i}" for i in range(len(lowers)))
    options = f"lowerdir={lowerdir},upperdir={upper},workdir={work},{OVERLAY_OPTIONS}"
    target.mkdir(exist_ok=True)
    run_sync(["mount", "-t", "overlay", "overlay", "-o", options, str(target)],
             cwd=links.parent)  # fmt: skip


def _is_whiteout(st: os.stat_result) -> bool:
    return stat.S_ISCHR(st.st_mode) and st.st_rdev == 0


def _opaque(path: str) -> bool:
    try:
        return os.getxattr(path, OPAQUE, follow_symlinks=False) == b"y"
    except OSError:
        return False


def _strip_overlay_marks(path: str) -> None:
    """overlayfs's own attributes (opaque, origin), which mean nothing outside an overlay."""
    with contextlib.suppress(OSError):
        for name in os.listxattr(path, follow_symlinks=False):
            if name.startswith(OVERLAY_XATTRS):
                os.removexattr(path, name, follow_symlinks=False)


def apply(diff: Path, target: Path) -> None:
    """Make `target` (the files below the layer) show what overlayfs shows with `diff` on top.
    The layer is walked from the top, so a directory is settled before what is in it:
    - a whiteout removes what it names;
    - an opaque directory hides what was in the one below;
    - a file replaces the one below, not writing through it (its hard links below keep the old
      contents, as with overlayfs's copy-up), and a change of kind replaces the entry whole.
    Then the layer is copied over with `cp -a`, and the whiteouts and overlayfs marks it brought
    are taken away again. Nothing is followed through a link in `target`: any link there that
    the layer goes through is one it replaced."""
    whiteouts: list[str] = []
    copied: list[str] = []
    for dirpath, dirnames, filenames in os.walk(diff):
        rel = os.path.relpath(dirpath, diff)
        here = os.path.normpath(os.path.join(target, rel))
        opaque = rel != "." and _opaque(dirpath)
        if opaque and os.path.isdir(here) and not os.path.islink(here):
            for entry in os.listdir(here):
                remove_path(os.path.join(here, entry))
        for name in dirnames + filenames:
            st = os.lstat(os.path.join(dirpath, name))
            below = os.path.join(here, name)
            if _is_whiteout(st):
                whiteouts.append(below)
                remove_path(below)
                continue
            copied.append(below)
            try:
                st_below = os.lstat(below)
            except FileNotFoundError:
                continue
            if not (stat.S_ISDIR(st.st_mode) and stat.S_ISDIR(st_below.st_mode)):
                remove_path(below)
    run_sync(["cp", "-a", "--", f"{diff}/.", str(target)], timeout=3600)
    for path in whiteouts:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
    for path in copied:
        _strip_overlay_marks(path)

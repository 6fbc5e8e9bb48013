"""Built templates on disk.

    {templates_root}/{name}/current -> builds/{build_id}
    {templates_root}/{name}/builds/{build_id}/{rootfs/, checkpoint/, spec.json, manifest.json}

A build directory never changes after its manifest is written; `current` is switched atomically.
Old builds stay, because sandboxes restored from them still read their rootfs.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vivarium.errors import InvalidArgument, NotFound, RuntimeFailure

NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}\Z")


@dataclass(frozen=True)
class Template:
    name: str
    build_dir: Path
    manifest: dict[str, Any]

    @property
    def build_id(self) -> str:
        return str(self.manifest["build_id"])

    @property
    def rootfs(self) -> Path:
        return self.build_dir / "rootfs"

    @property
    def checkpoint(self) -> Path:
        return self.build_dir / "checkpoint"

    @functools.cached_property
    def spec(self) -> dict[str, Any]:
        data: dict[str, Any] = json.loads((self.build_dir / "spec.json").read_text())
        return data


def sha256_dir(directory: Path) -> str:
    """One checksum over every file of a directory, in name order."""
    h = hashlib.sha256()
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        h.update(path.relative_to(directory).as_posix().encode())
        with path.open("rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    return h.hexdigest()


def dir_size(directory: Path) -> int:
    total = 0
    for root, _dirs, files in os.walk(directory):
        for name in files:
            try:
                total += os.lstat(os.path.join(root, name)).st_size
            except OSError:
                continue
    return total


def validate_name(name: str) -> str:
    if not NAME_RE.match(name):
        raise InvalidArgument(
            f"invalid template name {name!r}", "use lowercase letters, digits, '.', '_' or '-'"
        )
    return name


class TemplateStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        # Builds never change once published: each is read and verified once per process.
        self._loaded: dict[Path, Template] = {}

    def names(self) -> list[str]:
        if not self.root.exists():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / "current").exists())

    def current(self, name: str) -> Template | None:
        link = self.root / validate_name(name) / "current"
        if not link.exists():
            return None
        build_dir = link.resolve()
        manifest = json.loads((build_dir / "manifest.json").read_text())
        return Template(name, build_dir, manifest)

    def get(self, name: str) -> Template:
        """The current build, its checkpoint verified against the manifest once per process."""
        link = self.root / validate_name(name) / "current"
        if link.exists() and (loaded := self._loaded.get(link.resolve())):
            return loaded  # the hot path of every create: one readlink, no file reads
        template = self.current(name)
        if template is None:
            known = ", ".join(self.names()) or "none"
            raise NotFound(
                f"template {name!r} not found (available: {known})",
                "build it with `vivarium template build NAME`",
            )
        if sha256_dir(template.checkpoint) != template.manifest.get("checkpoint_sha256"):
            raise RuntimeFailure(
                f"template {name!r} checkpoint is corrupt (checksum mismatch)",
                f"rebuild it with `vivarium template build {name} --force`",
            )
        self._loaded[template.build_dir] = template
        return template

    def build(self, name: str, build_id: str) -> Template:
        """A specific build (paused sandboxes resume on the build they were created from)."""
        build_dir = self.builds_dir(name) / build_id
        if build_dir in self._loaded:
            return self._loaded[build_dir]
        try:
            manifest = json.loads((build_dir / "manifest.json").read_text())
        except (OSError, ValueError):
            raise NotFound(f"build {build_id} of template {name!r} is gone",
                           "its sandboxes cannot resume without it") from None  # fmt: skip
        return Template(name, build_dir, manifest)

    def builds_dir(self, name: str) -> Path:
        return self.root / validate_name(name) / "builds"

    def publish(self, name: str, build_dir: Path) -> None:
        link = self.root / name / "current"
        tmp = link.with_name("current.tmp")
        if tmp.is_symlink() or tmp.exists():
            tmp.unlink()
        tmp.symlink_to(build_dir.relative_to(link.parent))
        tmp.rename(link)

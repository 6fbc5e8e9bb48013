"""Building a team's template from the SDK's steps, isolated by gVisor like any sandbox.

Under runsc, in a network slot of the node's:
1. Steps, a container each: its root is an overlayfs of the layers of the steps before it (and
   the base) with an empty upper directory, which becomes the step's layer (layers.py). A step
   the layer cache has kept (the same base and the same steps before it) is not run again.
   Each step is a `runsc exec` as its user, in its directory, with its environment. Uploaded
   files are mounted read-only and unpacked inside. The template's rootfs is then flattened
   from the base and the layers: the lower layer every sandbox shares, not in its checkpoint.
2. Start: the finished rootfs boots as a sandbox does (guest init, envd, the base's services);
   envd gets the template's environment, user and directory, `startCmd` starts, `readyCmd` is
   polled, and the checkpoint is taken with the program running, so every sandbox restored from
   it finds the program up.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import fcntl
import functools
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from vivarium.errors import RuntimeFailure, VivariumError
from vivarium.guest.envd import PORT as ENVD_PORT
from vivarium.guest.envd import wire
from vivarium.network.addressing import Slot
from vivarium.network.pool import reset_sandbox_side
from vivarium.proc import run, run_lines
from vivarium.runtime import disk
from vivarium.runtime.bundle import Resources, for_sandbox, write_bundle
from vivarium.runtime.runsc import Runsc
from vivarium.templates import layers
from vivarium.templates.build_log import BuildLog
from vivarium.templates.build_request import FINALIZE_STEP, BuildRequest, Step, code_version
from vivarium.templates.builder import wait_ready
from vivarium.templates.layers import Layer, LayerCache
from vivarium.templates.recipe import (
    GUEST_PREFIX,
    HOSTNAME,
    SERVICES_FILE,
    TEMPLATE_COMPRESSION,
)
from vivarium.templates.store import Template, TemplateStore, dir_size, sha256_dir

FILES_MOUNT = "/.vivarium-build-files"
ROOTFS_IMAGE = "rootfs.img"
START_LOG = "/tmp/.vivarium-start.log"  # the start command's output, as its user may write
READY_TIMEOUT_S = 300.0
READY_INTERVAL_S = 0.5
STEP_TIMEOUT_S = 3600.0
_VAR = re.compile(r"\$(\w+)|\$\{(\w+)\}")

# COPY with Docker's meaning, run as root inside the build: a lone directory's contents go into
# DEST; a lone file becomes DEST (or goes into it, when DEST ends in / or is a directory); several
# matches go into DEST. Owner and mode are set in the scratch copy, which `cp -a` keeps.
COPY_SCRIPT = r"""set -euo pipefail
archive=$1 src=${2%/} dest=$3 owner=$4 mode=$5
case $dest in /*) ;; *) dest="$PWD/$dest" ;; esac
scratch=$(mktemp -d /tmp/.vivarium-copy.XXXXXX)
trap 'rm -rf "$scratch"' EXIT
tar -xf "$archive" -C "$scratch" --no-same-owner
cd "$scratch"
shopt -s nullglob dotglob globstar
IFS=$'\n'
matches=( $src )
[ ${#matches[@]} -gt 0 ] || { echo "COPY: no uploaded file matches $src" >&2; exit 1; }
for m in "${matches[@]}"; do
  [ -z "$owner" ] || chown -R "$owner" -- "$m"
  [ -z "$mode" ] || chmod -R "$mode" -- "$m"
done
if [ ${#matches[@]} -eq 1 ] && [ -d "${matches[0]}" ]; then
  mkdir -p -- "$dest" && cp -a -- "${matches[0]}/." "$dest/"
elif [ ${#matches[@]} -eq 1 ] && [[ $dest != */ ]] && [ ! -d "$dest" ]; then
  mkdir -p -- "$(dirname -- "$dest")" && cp -a -- "${matches[0]}" "$dest"
else
  mkdir -p -- "$dest"
  for m in "${matches[@]}"; do
    if [ -d "$m" ]; then cp -a -- "$m/." "$dest/"; else cp -a -- "$m" "$dest/"; fi
  done
fi
"""
# An image gets what our templates have: the guest (envd and its init), the user `user` who may
# sudo, the sudo that works under this runsc, and the hostname and hosts every sandbox has.
GUEST_MOUNT = "/.vivarium-guest"
INJECT_SCRIPT = f"""set -e
g={GUEST_MOUNT}
mkdir -p {GUEST_PREFIX}
cp -a "$g{GUEST_PREFIX}/." {GUEST_PREFIX}/
if [ -e "$g/usr/local/bin/sudo" ]; then
  mkdir -p /usr/local/bin
  cp -a "$g/usr/local/bin/sudo" /usr/local/bin/sudo
fi
if ! id -u user >/dev/null 2>&1; then
  if command -v useradd >/dev/null; then
    useradd --create-home --uid 1000 --shell /bin/bash user
  else  # busybox and bare images: the files themselves
    shell=/bin/sh; [ -x /bin/bash ] && shell=/bin/bash
    echo "user:x:1000:1000::/home/user:$shell" >> /etc/passwd
    grep -q '^user:' /etc/group || echo 'user:x:1000:' >> /etc/group
    mkdir -p /home/user && chown 1000:1000 /home/user
  fi
fi
if command -v usermod >/dev/null; then
  grep -q '^sudo:' /etc/group || groupadd sudo
  usermod -aG sudo user
elif ! grep -q '^sudo:' /etc/group; then
  echo 'sudo:x:27:user' >> /etc/group
fi
mkdir -p /etc/sudoers.d
echo 'user ALL=(ALL:ALL) NOPASSWD: ALL' > /etc/sudoers.d/user
chmod 0440 /etc/sudoers.d/user
echo {HOSTNAME} > /etc/hostname
grep -qs localhost /etc/hosts || printf '127.0.0.1 localhost\n::1 localhost\n' >> /etc/hosts
"""
# WORKDIR: made if missing, owned by the user the next steps run as (they write there).
WORKDIR_SCRIPT = 'set -e; [ -d "$1" ] || { mkdir -p -- "$1" && chown -- "$2" "$1"; }'


def make_rootfs(build_dir: Path, size_bytes: int) -> None:
    """An empty, sparse file system of `size_bytes` for a build's rootfs, mounted in place."""
    image = build_dir / ROOTFS_IMAGE
    disk.make_filesystem(image, size_bytes, journal=True)  # a template outlives host crashes
    disk.mount(image, build_dir / "rootfs")


log = logging.getLogger(__name__)
_caching = asyncio.Lock()  # one build makes a base's cached image; the others wait for it


async def fresh_rootfs(base: Template, build_dir: Path, size: int, cache: Path) -> None:
    """The base's files on a rootfs image of the build's own. A built-in base's files are put
    on an image once (per base build and size) and kept in `cache`: each build then copies that
    one sparse file, seconds faster than copying the base's ~15,000 files."""
    if "recipe_hash" not in base.manifest:  # a team's template: its image is mounted, in use
        await asyncio.to_thread(make_rootfs, build_dir, size)
        await run(["cp", "-a", f"{base.rootfs}/.", str(build_dir / "rootfs")],
                  timeout=STEP_TIMEOUT_S)  # fmt: skip
        return
    cached = cache / f"rootfs-{base.name}-{base.build_id}-{size >> 20}.img"
    async with _caching:
        if not cached.exists():
            partial = cache / f".{cached.name}.partial"
            await asyncio.to_thread(disk.discard, partial)
            partial.mkdir(parents=True)
            try:
                await asyncio.to_thread(make_rootfs, partial, size)
                await run(["cp", "-a", f"{base.rootfs}/.", str(partial / "rootfs")],
                          timeout=STEP_TIMEOUT_S)  # fmt: skip
                await run(["umount", str(partial / "rootfs")])
                (partial / ROOTFS_IMAGE).rename(cached)
            finally:
                await asyncio.to_thread(disk.discard, partial)
            for old in cache.glob(f"rootfs-{base.name}-*.img"):
                if old != cached:  # of an earlier build of the base: no build copies it again
                    old.unlink()
    image = build_dir / ROOTFS_IMAGE
    await run(["cp", "--sparse=always", str(cached), str(image)], timeout=STEP_TIMEOUT_S)
    await asyncio.to_thread(disk.mount, image, build_dir / "rootfs")


BUILD_LOCK = ".building"


def _building(build_dir: Path) -> bool:
    """Whether a live process holds the build's lock (builds hold it until they end)."""
    try:
        with (build_dir / BUILD_LOCK).open("a") as f:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    except OSError:
        return False
    return False


def mount_rootfs_images(store: TemplateStore) -> int:
    """Mount the rootfs of every team template build (at a node's start: mounts do not
    survive a host restart); returns how many were mounted. A build a restart cut short (no
    manifest: never published) is removed."""
    mounted = 0
    for image in store.root.glob(f"*/builds/*/{ROOTFS_IMAGE}"):
        if not (image.parent / "manifest.json").exists():
            if not _building(image.parent):  # another server's build, under way
                log.warning("removing %s, a template build that did not finish", image.parent)
                disk.discard(image.parent)
            continue
        rootfs = image.parent / "rootfs"
        if not rootfs.is_mount():
            disk.mount(image, rootfs)
            mounted += 1
    return mounted


HOST_CA = "/.vivarium-host-ca.crt"
# What OpenSSL, curl, git, pip, requests and node read for their trusted CAs.
CA_VARIABLES = ("SSL_CERT_FILE", "CURL_CA_BUNDLE", "GIT_SSL_CAINFO", "PIP_CERT",
                "REQUESTS_CA_BUNDLE", "NODE_EXTRA_CA_CERTS")  # fmt: skip
PROXY_VARIABLES = ("http_proxy", "https_proxy", "no_proxy", "HTTP_PROXY", "HTTPS_PROXY",
                   "NO_PROXY")  # fmt: skip


def _without_userinfo(url: str) -> str:
    return re.sub(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@]*@", r"\1", url)


@dataclass(frozen=True)
class HostAccess:
    """How a build's steps reach package registries the way the host does: the host's CA
    bundle (a TLS-intercepting proxy's CA, say) and its proxy settings. For the steps only: the
    template keeps neither."""

    ca_file: Path | None = None
    proxy: tuple[tuple[str, str], ...] = ()
    step_timeout_s: float = STEP_TIMEOUT_S

    @classmethod
    def of_host(cls, ca_file: Path | None, step_timeout_s: float) -> HostAccess:
        # Without credentials in the URL: the steps are the team's code.
        proxy = tuple((k, _without_userinfo(v)) for k in PROXY_VARIABLES
                      if (v := os.environ.get(k)))  # fmt: skip
        usable = ca_file if ca_file is not None and ca_file.is_file() else None
        return cls(usable, proxy, step_timeout_s)

    def environ(self) -> list[str]:
        env = [f"{k}={v}" for k, v in self.proxy]
        if self.ca_file is not None:
            env += [f"{k}={HOST_CA}" for k in CA_VARIABLES]
        return env


class BuildFailed(VivariumError):
    """A step of the team's own failed (its command, user or files): the build ends in error,
    with the step the client shows its own code for."""

    code = "build_failed"
    http_status = 400

    def __init__(self, message: str, step: str | None) -> None:
        super().__init__(message)
        self.step = step


@dataclass
class Identity:
    uid: int
    gid: int
    home: str

    @property
    def ids(self) -> str:
        return f"{self.uid}:{self.gid}"


@dataclass
class Context:
    """What a step runs with; what it is after the last step, every sandbox starts with."""

    user: str
    identity: Identity
    workdir: str
    env: dict[str, str] = field(default_factory=dict)
    shell: str = "/bin/bash"  # what RUN, the start and the ready command run with

    def environ(self) -> list[str]:
        base = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                "LANG": "C.UTF-8", "HOME": self.identity.home, "USER": self.user}  # fmt: skip
        return [f"{k}={v}" for k, v in {**base, **self.env}.items()]

    def to_json(self) -> dict[str, Any]:
        return {"user": self.user, "uid": self.identity.uid, "gid": self.identity.gid,
                "home": self.identity.home, "workdir": self.workdir, "env": self.env,
                "shell": self.shell}  # fmt: skip

    @classmethod
    def of(cls, data: dict[str, Any]) -> Context:
        identity = Identity(int(data["uid"]), int(data["gid"]), str(data["home"]))
        return cls(str(data["user"]), identity, str(data["workdir"]), dict(data["env"]),
                   str(data["shell"]))  # fmt: skip

    def expand(self, value: str) -> str:
        """`$NAME` and `${NAME}` of earlier ENV steps, as a Dockerfile's ENV would."""
        known = {"PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
                 **self.env}  # fmt: skip
        return _VAR.sub(lambda m: known.get(m.group(1) or m.group(2), ""), value)


class Build:
    """One build: its directory, slot and two containers."""

    def __init__(self, runtime: Runsc, base: Template, build_dir: Path, files: Path, slot: Slot,
                 resources: Resources, log: BuildLog, cache: Path, layer_cache: LayerCache,
                 scope: str, guest: Path | None = None,
                 host: HostAccess = HostAccess()) -> None:  # fmt: skip
        self.runtime, self.base, self.build_dir, self.files = runtime, base, build_dir, files
        self.cache, self.layer_cache = cache, layer_cache
        self.scope = scope  # whose layers the build may use: its team's
        self.guest = guest  # an image's base: our guest, staged to be copied in
        self.host = host
        self.slot, self.resources, self.log = slot, resources, log
        self.rootfs = build_dir / "rootfs"  # the template's
        self.merged = build_dir / "merged"  # a step's: its layers on the base
        self.shell = ["/bin/bash", "-c"]  # the template's (sh in images without bash)
        self.sealed: tuple[int, str] = (0, "")  # the rootfs's bytes, the checkpoint's sha256
        self._held: list[str] = []

    # -- boot 1: the steps, a container each -----------------------------------------------------

    async def apply(self, request: BuildRequest) -> Context:
        """Run the steps from the first one the layer cache has not kept (layers.py), then
        flatten the base and the layers into the template's rootfs."""
        room = self.resources.disk_mb << 20
        # What one step writes lands on the scratch file system: a step can fill that, not the
        # host's disk.
        await asyncio.to_thread(self._scratch, room)
        lowers: list[Layer] = []  # the layers the next step stands on, topmost first
        guest = self.guest.name if self.guest is not None else ""
        key = layers.chain(
            self.scope, f"{self.base.name}/{self.base.build_id}/{guest}/{code_version()}"
        )
        forced = request.force
        key = layers.chain(key, "base")
        layer = None if forced else self._cached(key)
        if layer is None:
            forced = True  # see below: what stood on the old base layer runs again
            layer = await self._in_container(key, lowers, "base", self._prepare)
        lowers.insert(0, layer)
        for index, step in enumerate(request.steps, start=1):
            key = layers.chain(key, json.dumps([step.type, step.args, step.files_hash]))
            # skip_cache(): this step and all after it. A step that runs may leave other files
            # than the kept layer it replaces (apt fetched newer packages, the layer had been
            # pruned): the layers kept after it stood on the old one, so all after it run too.
            forced = forced or step.force
            label, name = f"[{index}/{len(request.steps)}] {step.text}", str(index)
            layer = None if forced else self._cached(key)
            forced = forced or layer is None
            if layer is not None:
                self.log.add(f"{label} (cached)", step=name)
            elif step.type == "ENV":  # no files: no container
                self.log.add(label, step=name)
                ctx = Context.of(lowers[0].context)
                self._set_env(ctx, step)
                layer = await asyncio.to_thread(self.layer_cache.put, key, None, ctx.to_json())
                self._held.append(layer.key)
            else:
                self.log.add(label, step=name)
                run_step = functools.partial(self._step, step=step, name=name)
                layer = await self._in_container(key, lowers, name, run_step)
            lowers.insert(0, layer)
            if (written := sum(layer.size for layer in lowers)) > room:
                raise BuildFailed(f"the steps wrote {written >> 20} MiB in all, over the "
                                  f"{room >> 20} MiB a template may add", name)  # fmt: skip
        await self._flatten(lowers)
        ctx = Context.of(lowers[0].context)
        self.shell = [ctx.shell, "-c"]
        return ctx

    def _cached(self, key: str) -> Layer | None:
        layer = self.layer_cache.get(key)  # held: not pruned under this build
        if layer is not None:
            self._held.append(key)
        return layer

    def _scratch(self, size: int) -> None:
        scratch = self.build_dir / "scratch"
        disk.make_filesystem(self.build_dir / "scratch.img", size, journal=False)
        disk.mount(self.build_dir / "scratch.img", scratch)

    async def _in_container(self, key: str, lowers: list[Layer], name: str,
                            work: Callable[[str, Context | None], Awaitable[Context]],
                            ) -> Layer:  # fmt: skip
        """Run `work` in a container whose root is `lowers` (and the base) with an empty upper
        directory, and keep that directory as the layer `key`. Each step gets a container of
        its own: only a container's end writes back all that runsc caches of its files."""
        scratch = self.build_dir / "scratch"
        upper, workdir = scratch / "upper", scratch / "work"
        for path in (upper, workdir):
            await asyncio.to_thread(shutil.rmtree, path, ignore_errors=True)
            path.mkdir()
        stack = [layer.diff for layer in lowers if not layer.empty] + [self.base.rootfs]
        await asyncio.to_thread(layers.mount_overlay, self.merged, stack, upper, workdir)
        cid = f"tbuild-{self.build_dir.name}-{name}"
        try:
            spec = self._spec(["/bin/sleep", "2147483647"], self.merged)  # busybox: no infinity
            spec["mounts"] += self._step_mounts()
            await self._boot(cid, spec, disk_dir=None)
            try:
                ctx = await work(cid, Context.of(lowers[0].context) if lowers else None)
            finally:
                await self._remove(cid)
        finally:
            await run(["umount", str(self.merged)], check=False)
        self._drop_mount_points(upper)
        layer = await asyncio.to_thread(self.layer_cache.put, key, upper, ctx.to_json())
        self._held.append(layer.key)
        return layer

    def _step_mounts(self) -> list[dict[str, Any]]:
        mounts = [{"destination": FILES_MOUNT, "type": "bind", "source": str(self.files),
                   "options": ["rbind", "ro", "nosuid", "nodev"]}]  # fmt: skip
        if self.host.ca_file is not None:
            mounts.append({"destination": HOST_CA, "type": "bind",
                           "source": str(self.host.ca_file),
                           "options": ["bind", "ro", "nosuid", "nodev"]})  # fmt: skip
        if self.guest is not None:
            mounts.append({"destination": GUEST_MOUNT, "type": "bind", "source": str(self.guest),
                           "options": ["rbind", "ro", "nosuid", "nodev"]})  # fmt: skip
        return mounts

    async def _prepare(self, cid: str, _: Context | None) -> Context:
        """The base made ready for the steps: our guest in an image, and whom steps run as."""
        if self.guest is not None:
            self.log.add("adding the sandbox agent (envd) and the user `user`", step="base")
            root = Context("root", Identity(0, 0, "/root"), "/")
            await self._exec(cid, ["/bin/sh", "-c", INJECT_SCRIPT], root, "base")
        ctx = await self._initial_context(cid)
        bash = await self.runtime.exec(cid, ["/bin/sh", "-c", "[ -x /bin/bash ]"])
        ctx.shell = "/bin/bash" if bash.ok else "/bin/sh"
        return ctx

    async def _flatten(self, lowers: list[Layer]) -> None:
        """The template's rootfs: the base's files (a copy of its cached image) with the
        layers applied, bottom first, on an image with the room of a sandbox's disk to spare."""
        used = int(self.base.manifest.get("rootfs_bytes") or 0)
        added = sum(layer.size for layer in lowers)
        size = used + used // 8 + added + (self.resources.disk_mb << 20)
        self.log.add("writing the template's root filesystem", step=FINALIZE_STEP)
        await asyncio.to_thread(disk.discard, self.build_dir / "scratch")
        (self.build_dir / "scratch.img").unlink(missing_ok=True)
        await fresh_rootfs(self.base, self.build_dir, size, self.cache)
        for layer in reversed(lowers):
            if not layer.empty:
                await asyncio.to_thread(layers.apply, layer.diff, self.rootfs)

    def release_layers(self) -> None:
        for key in self._held:
            self.layer_cache.release(key)
        self._held.clear()

    @staticmethod
    def _drop_mount_points(upper: Path) -> None:
        """The empty files and directories runsc made for a step's mounts: not part of the
        layer. Entries of its top (ours), removed without following links."""
        for point in (FILES_MOUNT, HOST_CA, GUEST_MOUNT):
            path = upper / point.lstrip("/")
            with contextlib.suppress(OSError):
                if path.is_dir() and not path.is_symlink():
                    path.rmdir()
                else:
                    path.unlink()

    async def _initial_context(self, cid: str) -> Context:
        # E2B's templates run as `user` in its home unless told otherwise, unlike Docker. An
        # image's ENV is the template's first (its PATH included).
        env = dict(e.split("=", 1) for e in self.base.manifest.get("env", []) if "=" in e)
        try:
            identity = await self._identity(cid, "user")
            return Context("user", identity, identity.home, env)
        except BuildFailed:
            return Context("root", Identity(0, 0, "/root"), "/root", env)

    async def _identity(self, cid: str, user: str, step: str = "base") -> Identity:
        name, _, group = user.partition(":")
        # `id` and the passwd file: getent is not in every image (busybox has none).
        script = 'id -u "$1" && id -g "$1" && grep "^$1:" /etc/passwd | cut -d: -f6'
        res = await self.runtime.exec(cid, ["/bin/sh", "-c", script, "identity", name])
        fields = res.stdout.split()
        if not res.ok or len(fields) < 2 or not all(f.isdigit() for f in fields[:2]):
            if name.isdigit() and (not group or group.isdigit()):
                return Identity(int(name), int(group or name), "/")
            raise BuildFailed(f"user {name!r} does not exist in the template", step)
        gid = int(fields[1])
        if group:
            found = await self.runtime.exec(cid, ["/bin/sh", "-c",
                                                  'grep "^$1:" /etc/group | cut -d: -f3',
                                                  "group", group])  # fmt: skip
            if group.isdigit():
                gid = int(group)
            elif found.ok and found.stdout.strip().isdigit():
                gid = int(found.stdout.strip())
            else:
                raise BuildFailed(f"group {group!r} does not exist in the template", step)
        return Identity(int(fields[0]), gid, fields[2] if len(fields) > 2 else "/")

    @staticmethod
    def _set_env(ctx: Context, step: Step) -> None:
        pairs = step.args
        for key, value in zip(pairs[0::2], pairs[1::2], strict=True):
            ctx.env[key] = ctx.expand(value)

    async def _step(self, cid: str, ctx: Context | None, *, step: Step, name: str) -> Context:
        assert ctx is not None  # the base's layer is below every step
        self.shell = [ctx.shell, "-c"]
        if step.type == "USER":
            ctx.identity, ctx.user = await self._identity(cid, step.args[0], name), step.args[0]
        elif step.type == "WORKDIR":
            path = step.args[0] if step.args[0].startswith("/") else f"{ctx.workdir}/{step.args[0]}"
            await self._exec(cid, [*self.shell, WORKDIR_SCRIPT, "workdir", path, ctx.identity.ids],
                             ctx, name, as_root=True)  # fmt: skip
            ctx.workdir = path
        elif step.type == "RUN":
            user = step.args[1] if len(step.args) > 1 and step.args[1] else None
            who = await self._identity(cid, user, name) if user else ctx.identity
            await self._exec(cid, [*self.shell, step.args[0]], ctx, name, identity=who)
        elif step.type == "COPY":
            src, dest, owner, mode = (*step.args, "", "")[:4]
            archive = f"{FILES_MOUNT}/{step.files_hash}"
            await self._exec(
                cid,
                [
                    "/bin/bash",
                    "-c",
                    COPY_SCRIPT,
                    "copy",
                    archive,
                    src,
                    dest,
                    owner or ctx.identity.ids,
                    mode,
                ],
                ctx,
                name,
                as_root=True,
            )
        return ctx

    async def _exec(self, cid: str, argv: list[str], ctx: Context, step: str, *,
                    identity: Identity | None = None, as_root: bool = False) -> None:  # fmt: skip
        who = Identity(0, 0, "/root") if as_root else identity or ctx.identity
        env = [*ctx.environ(), f"HOME={who.home}", *self.host.environ()]
        command = self.runtime.exec_argv(cid, argv, user=who.ids, env=env, cwd=ctx.workdir)
        lines = aclosing(run_lines(command, tail=5))  # closing it stops the command
        try:
            async with lines as output, asyncio.timeout(self.host.step_timeout_s):
                async for line in output:
                    self.log.add(line, step=step)
        except TimeoutError:
            raise BuildFailed(f"step {step} ran for more than {self.host.step_timeout_s:.0f} s and "
                              "was stopped", step) from None  # fmt: skip
        except RuntimeFailure as exc:
            raise BuildFailed(f"step {step} failed: {exc.message}", step) from None

    # -- boot 2: start, ready, checkpoint --------------------------------------------------------

    async def start_and_checkpoint(self, request: BuildRequest, ctx: Context) -> None:
        cid = f"tstart-{self.build_dir.name}"
        removal: asyncio.Future[None] | None = None
        spec = self._spec(None, self.rootfs)
        (self.build_dir / "spec.json").write_text(json.dumps(spec, indent=1))
        await self._boot(cid, spec, disk_dir=self.build_dir / "boot")
        try:
            self.log.add("waiting for envd", step=FINALIZE_STEP)
            try:
                await wait_ready(self.slot.router_ip, ENVD_PORT, "envd")
                for name, port in self.services():
                    self.log.add(f"waiting for {name} on port {port}", step=FINALIZE_STEP)
                    await wait_ready(self.slot.router_ip, port, name)
            except RuntimeFailure:
                self._console_tail(cid)
                raise
            await self._init_envd(ctx)
            if request.start_cmd:
                self.log.add(f"starting: {request.start_cmd[:200]}", step=FINALIZE_STEP)
                await self._start_program(request.start_cmd, ctx)
            if request.ready_cmd:
                await self._until_ready(cid, request.ready_cmd, ctx, request.ready_timeout_s)
            self.log.add("checkpointing", step=FINALIZE_STEP)
            checkpoint = self.build_dir / "checkpoint"
            await self.runtime.checkpoint(cid, checkpoint, compress=TEMPLATE_COMPRESSION)
            # The stopped container's teardown (about a second) overlaps the seal.
            removal = asyncio.ensure_future(self._remove(cid))
            size = asyncio.to_thread(dir_size, self.rootfs)
            self.sealed = await asyncio.gather(size, asyncio.to_thread(sha256_dir, checkpoint))
        finally:
            await (removal if removal is not None else self._remove(cid))
            await asyncio.to_thread(disk.discard, self.build_dir / "boot")

    def services(self) -> list[tuple[str, int]]:
        """The guest services to wait for (the interpreter of code-interpreter-v1): a built-in
        base's, read from its rootfs (ours); a team template's, from its manifest; an image's:
        none. A team's or an image's files are never read on the host."""
        if "image" in self.base.manifest:
            return []
        if "recipe_hash" not in self.base.manifest:
            return [(str(n), int(p)) for n, p in self.base.manifest.get("services", [])]
        try:
            lines = (self.base.rootfs / GUEST_PREFIX.lstrip("/") / SERVICES_FILE).read_text()
            fields = [line.split() for line in lines.splitlines()]
            return [(f[0], int(f[3])) for f in fields if len(f) == 4 and int(f[3])]
        except (OSError, ValueError):
            return []

    async def _init_envd(self, ctx: Context) -> None:
        """The template's environment, user and directory, kept in the checkpointed envd: every
        sandbox's commands start with them (a create's own env vars are added at its /init)."""
        body = {"envVars": ctx.env, "defaultUser": ctx.user, "defaultWorkdir": ctx.workdir}
        async with httpx.AsyncClient(timeout=5) as http:
            response = await http.post(f"http://{self.slot.router_ip}:{ENVD_PORT}/init", json=body)
        if not response.is_success:
            raise BuildFailed(f"envd refused the template's settings: {response.text[:200]}",
                              FINALIZE_STEP)  # fmt: skip

    async def _start_program(self, command: str, ctx: Context) -> None:
        """Through envd, as a sandbox's own commands start (a process `runsc exec` starts is
        not restored from a checkpoint on this runsc). Its output goes to START_LOG; the
        stream is closed once it has started, and the program runs on."""
        script = f"exec >>{START_LOG} 2>&1 </dev/null\n{command}"
        body = {"process": {"cmd": self.shell[0], "args": ["-l", "-c", script],
                            "cwd": ctx.workdir}, "tag": "start", "stdin": False}  # fmt: skip
        user = base64.b64encode(f"{ctx.user}:".encode()).decode()
        headers = {"Content-Type": "application/connect+json", "Connect-Protocol-Version": "1",
                   "Authorization": f"Basic {user}"}  # fmt: skip
        url = f"http://{self.slot.router_ip}:{ENVD_PORT}/process.Process/Start"
        deframer = wire.Deframer()
        async with (
            httpx.AsyncClient(timeout=10) as http,
            http.stream("POST", url, content=wire.frame(json.dumps(body).encode()),
                        headers=headers) as response,
        ):  # fmt: skip
            async for chunk in response.aiter_bytes():
                for flags, payload in deframer.feed(chunk):
                    message = json.loads(payload or b"{}")
                    if flags & wire.FLAG_END_STREAM:
                        error = message.get("error", {}).get("message", "it ended at once")
                        raise BuildFailed(f"the start command could not start: {error}",
                                          FINALIZE_STEP)  # fmt: skip
                    if "start" in message.get("event", {}):
                        return
        raise BuildFailed(f"envd did not start the start command (HTTP {response.status_code})",
                          FINALIZE_STEP)  # fmt: skip

    async def _until_ready(self, cid: str, ready_cmd: str, ctx: Context,
                           timeout_s: float | None) -> None:  # fmt: skip
        """Run the ready command until it succeeds. An attempt may take all the time left (the
        client's `wait_for_timeout` is a `sleep`)."""
        limit = timeout_s or min(READY_TIMEOUT_S, self.host.step_timeout_s)
        self.log.add(f"waiting until ready (at most {limit:.0f} s): {ready_cmd[:200]}",
                     step=FINALIZE_STEP)  # fmt: skip
        deadline = time.monotonic() + limit
        while (left := deadline - time.monotonic()) > 0:
            try:
                res = await self.runtime.exec(cid, [*self.shell, ready_cmd],
                                              user=ctx.identity.ids, env=ctx.environ(),
                                              cwd=ctx.workdir, timeout=left)  # fmt: skip
            except (TimeoutError, RuntimeFailure):  # an attempt that hangs is one that failed
                continue
            if res.ok:
                self.log.add("ready", step=FINALIZE_STEP)
                return
            await asyncio.sleep(READY_INTERVAL_S)
        tail = await self.runtime.exec(cid, ["tail", "-n", "20", START_LOG])
        for line in tail.stdout.splitlines():
            self.log.add(f"start command: {line}", "warn", FINALIZE_STEP)
        raise BuildFailed(f"the ready command did not succeed within {limit:.0f} s: "
                          f"{ready_cmd[:200]}", FINALIZE_STEP)  # fmt: skip

    # -- containers -----------------------------------------------------------------------------

    def _spec(self, args: list[str] | None, root: Path) -> dict[str, Any]:
        spec: dict[str, Any] = json.loads(json.dumps(self.base.spec))
        spec["root"]["path"] = str(root)
        if args is not None:
            spec["process"]["args"] = args
        return spec

    async def _boot(self, cid: str, spec: dict[str, Any], disk_dir: Path | None) -> None:
        await reset_sandbox_side(self.slot)  # the last boot's runsc took eth0's address
        hub = self.build_dir / "volume-hub"
        hub.mkdir(exist_ok=True)
        bundle = self.build_dir / f"bundle-{cid}"
        write_bundle(bundle, for_sandbox(spec, Path(self.slot.netns_path), self.resources, cid,
                                         hub))  # fmt: skip
        filestore = None
        if disk_dir is not None:
            filestore = await asyncio.to_thread(disk.create, disk_dir,
                                                self.resources.disk_mb << 20)  # fmt: skip
        try:
            await self.runtime.start(cid, bundle, filestore, self.build_dir / f"{cid}.log")
        except RuntimeFailure:
            self._console_tail(cid)
            with contextlib.suppress(RuntimeFailure):  # a start cut short may leave it behind
                await self.runtime.delete(cid)
            raise
        if disk_dir is not None:
            await asyncio.to_thread(disk.hold_back, disk_dir)

    def _console_tail(self, cid: str, lines: int = 10) -> None:
        """What the container and runsc printed last: why it did not start or answer."""
        try:
            text = (self.build_dir / f"{cid}.log").read_text(errors="replace")
        except OSError:
            return
        for line in text.strip().splitlines()[-lines:]:
            self.log.add(f"console: {line}", "warn", FINALIZE_STEP)

    async def _remove(self, cid: str) -> None:
        await self.runtime.delete(cid)
        shutil.rmtree(self.build_dir / f"bundle-{cid}", ignore_errors=True)


def _built_before(store: TemplateStore, template_id: str, key: str) -> Template | None:
    """A finished build of the template from the very same request, if one is kept."""
    for manifest_file in store.builds_dir(template_id).glob("*/manifest.json"):
        try:
            manifest = json.loads(manifest_file.read_text())
        except (OSError, ValueError):
            continue
        if manifest.get("key") == key:
            return Template(template_id, manifest_file.parent, manifest)
    return None


async def build_template(
    runtime: Runsc, store: TemplateStore, base: Template, template_id: str, build_id: str,
    request: BuildRequest, files: Path, slot: Slot, resources: Resources, log: BuildLog,
    cache: Path, layer_cache: LayerCache, scope: str, guest: Path | None = None,
    host: HostAccess = HostAccess(),
) -> Template:  # fmt: skip
    """Build, checkpoint and publish `template_id`'s build `build_id`; on failure nothing of it
    is left and the template's current build is unchanged."""
    key = request.key(f"{base.name}/{base.build_id}/{guest.name if guest else ''}",
                      f"{runtime.probe.runsc_version}|{runtime.probe.platform}")  # fmt: skip
    forced = request.force or any(step.force for step in request.steps)
    if not forced and (same := _built_before(store, template_id, key)) is not None:
        log.add(f"the same as build {same.build_id}, which is kept: nothing to build "
                "(force a build with skip_cache)", step=FINALIZE_STEP)  # fmt: skip
        store.publish(template_id, same.build_dir)
        return same
    build_dir = store.builds_dir(template_id) / build_id
    build_dir.mkdir(parents=True)
    lock = (build_dir / BUILD_LOCK).open("a")
    fcntl.flock(lock, fcntl.LOCK_EX)  # until this process ends it: see mount_rootfs_images
    try:
        build = Build(runtime, base, build_dir, files, slot, resources, log, cache, layer_cache,
                      scope, guest, host)  # fmt: skip
        try:
            ctx = await build.apply(request)
        finally:
            build.release_layers()
            await asyncio.to_thread(layer_cache.prune)
        await build.start_and_checkpoint(request, ctx)
        manifest: dict[str, Any] = {
            "name": template_id,
            "build_id": build_id,
            "key": key,
            "base": {"name": base.name, "build_id": base.build_id},
            "runsc_version": runtime.probe.runsc_version,
            "platform": runtime.probe.platform,
            "disk_mb": base.manifest.get("disk_mb", 0),
            "created_at": datetime.now(UTC).isoformat(),
            "defaults": {"user": ctx.user, "workdir": ctx.workdir, "env": sorted(ctx.env)},
            "services": build.services(),
            "rootfs_bytes": build.sealed[0],
            "checkpoint_bytes": dir_size(build_dir / "checkpoint"),
            "checkpoint_sha256": build.sealed[1],
        }
        (build_dir / "manifest.json").write_text(json.dumps(manifest, indent=1))
        shutil.rmtree(build_dir / "volume-hub", ignore_errors=True)
    except BaseException:
        await asyncio.to_thread(disk.discard, build_dir)
        raise
    finally:
        lock.close()
    store.publish(template_id, build_dir)
    log.add(
        f"template built: checkpoint {manifest['checkpoint_bytes'] >> 20} MiB, "
        f"root filesystem {manifest['rootfs_bytes'] >> 20} MiB",
        step=FINALIZE_STEP,
    )
    return Template(template_id, build_dir, manifest)

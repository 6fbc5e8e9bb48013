"""Team template builds on this node: uploaded files, the builds running, and their logs.

A build holds a network slot of the node's pool (it counts against capacity like a sandbox)
with the default egress of a sandbox (the internet, none of the host's or private ranges; DNS
through the node's resolver), so `apt-get` and `pip` work and nothing else is reachable. At
most `max_builds` run at once; the others wait in `waiting`. Logs live in memory for the
server's lifetime; the catalog keeps each build's outcome.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TYPE_CHECKING

from vivarium import statedir
from vivarium.errors import InvalidArgument, VivariumError
from vivarium.network.addressing import Slot
from vivarium.network.egress import Egress
from vivarium.runtime import disk
from vivarium.runtime.bundle import base_spec
from vivarium.templates import guest_runtime, oci
from vivarium.templates.build_log import BuildLog
from vivarium.templates.build_request import BASE_STEP, FINALIZE_STEP, BuildRequest
from vivarium.templates.custom import BuildFailed, HostAccess, build_template
from vivarium.templates.layers import LayerCache
from vivarium.templates.recipe import HOSTNAME, INIT
from vivarium.templates.store import Template, dir_size, validate_name

if TYPE_CHECKING:
    from vivarium.node.node import Node

log = logging.getLogger(__name__)

IMAGE_BASE = "image:"  # a base that is an OCI image, not a template: image:<reference>
MAX_BUILDS = 2
MAX_LOGS = 200  # finished builds' logs kept in memory, newest first
BUILD_EGRESS = Egress()


class TemplateBuilds:
    def __init__(self, node: Node, files_root: Path) -> None:
        self.node = node
        self.files_root = files_root
        self.logs: dict[str, BuildLog] = {}
        self.addresses: set[str] = set()  # slots of running builds (their DNS is answered)
        self._turns = asyncio.Semaphore(MAX_BUILDS)
        self.layers = LayerCache(node.settings.cache_dir / "layers")

    def files(self, template_id: str) -> Path:
        return self.files_root / validate_name(template_id)

    def files_size(self, template_id: str) -> int:
        """What the template's uploaded files take (unfinished uploads included)."""
        total = 0
        with contextlib.suppress(FileNotFoundError), os.scandir(self.files(template_id)) as it:
            for entry in it:
                with contextlib.suppress(FileNotFoundError):  # an upload that just failed
                    total += entry.stat().st_size
        return total

    def has_file(self, template_id: str, files_hash: str) -> bool:
        return (self.files(template_id) / files_hash).is_file()

    async def save_file(self, template_id: str, files_hash: str,
                        chunks: AsyncIterator[bytes], limit: int) -> int:  # fmt: skip
        """Store an uploaded archive of a COPY step; written whole or not at all."""
        directory = self.files(template_id)
        await asyncio.to_thread(directory.mkdir, mode=0o700, parents=True, exist_ok=True)
        partial = directory / f".{files_hash}.{os.getpid()}.{id(chunks)}"
        size = 0
        try:
            with partial.open("wb") as f:
                async for chunk in chunks:
                    size += len(chunk)
                    if size > limit:
                        raise InvalidArgument(
                            f"the upload is over {limit >> 20} MiB",
                            "copy fewer files, or install them in a RUN step",
                        )
                    await asyncio.to_thread(f.write, chunk)
            await asyncio.to_thread(statedir.fsync_path, partial)
            partial.rename(directory / files_hash)
        finally:
            partial.unlink(missing_ok=True)
        return size

    def drop_files(self, template_id: str) -> None:
        shutil.rmtree(self.files(template_id), ignore_errors=True)

    def log_of(self, build_id: str) -> BuildLog | None:
        return self.logs.get(build_id)

    def open_log(self, build_id: str) -> BuildLog:
        if len(self.logs) >= MAX_LOGS:
            finished = [k for k, v in self.logs.items() if v.status in ("ready", "error")]
            for key in finished[: len(self.logs) - MAX_LOGS + 1]:
                del self.logs[key]
        self.logs[build_id] = BuildLog()
        return self.logs[build_id]

    async def run(self, template_id: str, build_id: str, base_name: str, request: BuildRequest,
                  scope: str) -> Template:  # fmt: skip
        """Build it (in turn with other builds), with the cached layers of `scope` (the team);
        raises with the log already saying why."""
        build_log = self.logs.get(build_id) or self.open_log(build_id)
        try:
            guest = None
            if base_name.startswith(IMAGE_BASE):
                base = await self._image(base_name.removeprefix(IMAGE_BASE), request, build_log)
                guest = await self._guest(build_log)
            elif "@" in base_name:  # a team template's build (a tag's, maybe)
                name, _, build = base_name.partition("@")
                base = await self.node.template_build(name, build)
            else:  # verified against its checksum once per process: off the loop
                base = await asyncio.to_thread(self.node.templates.get, base_name)
            missing = [h for h in request.files if not self.has_file(template_id, h)]
            if missing:
                raise BuildFailed(f"the files of a COPY step were not uploaded ({missing[0]})",
                                  BASE_STEP)  # fmt: skip
            await asyncio.to_thread(
                self.files(template_id).mkdir, mode=0o700, parents=True, exist_ok=True
            )  # mounted into the build, even if empty
            async with self._turns:
                build_log.status = "building"
                build_log.add(f"building {template_id} from {base_name}", step=BASE_STEP)
                async with self._slot() as slot:
                    runtime = self.node.runtime
                    assert runtime is not None
                    resources = self.node.default_resources(base)
                    room = min(resources.disk_mb, self.node.settings.build_disk_mb)
                    resources = dataclasses.replace(resources, disk_mb=room)
                    template = await build_template(
                        runtime, self.node.templates, base, template_id, build_id, request,
                        self.files(template_id), slot, resources,
                        build_log, self.node.settings.cache_dir, self.layers, scope, guest,
                        HostAccess.of_host(self.node.settings.build_ca_file,
                                           self.node.settings.build_step_timeout_s),
                    )  # fmt: skip
            if (share := self.node.template_share) is not None:
                build_log.add("storing the build for the cluster's other nodes",
                              step=FINALIZE_STEP)  # fmt: skip
                size = await asyncio.to_thread(share.publish, template)
                build_log.add(f"stored ({size >> 20} MiB)", step=FINALIZE_STEP)
        except BuildFailed as exc:
            build_log.fail(exc.message, exc.step)
            raise
        except VivariumError as exc:
            build_log.fail(str(exc), BASE_STEP)
            raise
        except Exception as exc:
            log.exception("template build %s failed", build_id)
            build_log.fail(f"the build failed on the server: {exc}", BASE_STEP)
            raise
        build_log.status = "ready"
        return template

    async def _image(self, image: str, request: BuildRequest, build_log: BuildLog) -> Template:
        """An OCI image as a build's base: pulled once per digest, with the spec our guest boots
        it with (its init runs on the image's own Python 3, for now)."""
        settings = self.node.settings
        registry = oci.Registry(settings.registry_mirror, settings.registry_insecure,
                                request.credentials)  # fmt: skip
        pulled = await oci.pull(registry, image, settings.cache_dir,
                                lambda m: build_log.add(m, step=BASE_STEP))  # fmt: skip
        bundle = pulled.rootfs.parent
        env = [e for e in pulled.env if not e.startswith("PATH=")]
        env += [d for d in ("LANG=C.UTF-8", "HOME=/root")
                if not any(e.startswith(d.split("=")[0] + "=") for e in env)]  # fmt: skip
        spec = base_spec(pulled.rootfs, [INIT, guest_runtime.PYTHON],
                         env, HOSTNAME, settings.default_pids, bundle / "volume-hub")  # fmt: skip
        (bundle / "spec.json").write_text(json.dumps(spec, indent=1))
        sized = bundle / "rootfs-bytes"
        if not sized.exists():
            sized.write_text(str(await asyncio.to_thread(dir_size, pulled.rootfs)))
        digest = pulled.digest.removeprefix("sha256:")
        manifest = {"build_id": digest[:24], "recipe_hash": pulled.digest, "disk_mb": 0,
                    "rootfs_bytes": int(sized.read_text()), "image": pulled.reference,
                    "env": list(pulled.env), "workdir": pulled.workdir}  # fmt: skip
        return Template(f"image-{digest[:12]}", bundle, manifest)

    async def _guest(self, build_log: BuildLog) -> Path:
        """Our guest with its own Python (guest_runtime.py), staged for images once."""
        base = await asyncio.to_thread(self.node.templates.get, "base")
        runtime = self.node.runtime
        assert runtime is not None
        build_log.add("preparing the sandbox agent (envd) for the image", step=BASE_STEP)
        return await asyncio.to_thread(guest_runtime.stage, base, self.node.settings.cache_dir,
                                       runtime.probe.setuid_blocked)  # fmt: skip

    @contextlib.asynccontextmanager
    async def _slot(self) -> AsyncIterator[Slot]:
        slot = await self.node.pool.acquire()
        self.addresses.add(slot.router_ip)
        try:
            await self.node.apply_egress(slot, BUILD_EGRESS)
            yield slot
        finally:
            self.addresses.discard(slot.router_ip)
            await self.node.pool.release(slot)

    def remove_template(self, template_id: str, *, builds: bool) -> None:
        """No new sandbox starts from it. With `builds`, its builds go too: only when nothing
        runs from them or is saved on them (a running sandbox reads its build's rootfs)."""
        self.drop_files(template_id)
        root = self.node.templates.root / validate_name(template_id)
        (root / "current").unlink(missing_ok=True)
        if builds:
            if self.node.template_share is not None:
                self.node.template_share.delete(template_id)
            for build_dir in (root / "builds").glob("*"):
                disk.discard(build_dir)  # unmounts its rootfs first
            shutil.rmtree(root, ignore_errors=True)

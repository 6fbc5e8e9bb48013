"""Building a template: root filesystem -> boot under runsc in a network slot -> checkpoint.

The checkpoint is the template: every sandbox is a restore of it, so whatever runs at checkpoint
time (the guest daemon) is already running in a new sandbox.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx

from vivarium.config import Settings
from vivarium.errors import HostNotReady, NotFound, RuntimeFailure
from vivarium.guest.envd import PORT as ENVD_PORT
from vivarium.guest.envd import VOLUME_HUB
from vivarium.network.addressing import SlotRange
from vivarium.network.pool import create_slot, destroy_slot
from vivarium.node.envd_init import until_answered
from vivarium.proc import run_lines, run_sync
from vivarium.runtime import disk
from vivarium.runtime.bundle import Resources, base_spec, for_sandbox, write_bundle
from vivarium.runtime.probe import Probe
from vivarium.runtime.runsc import Runsc, open_runtime
from vivarium.templates.recipe import (
    GUEST_DIR,
    GUEST_PREFIX,
    HOSTNAME,
    RECIPES,
    SERVICES_FILE,
    TEMPLATE_COMPRESSION,
    Recipe,
)
from vivarium.templates.store import Template, TemplateStore, dir_size, sha256_dir

Report = Callable[[str], None]
READY_TIMEOUT_S = 60.0


class Stopwatch:
    def __init__(self, report: Report) -> None:
        self.report = report
        self.t0 = time.monotonic()

    def __call__(self, message: str) -> None:
        self.report(f"[{time.monotonic() - self.t0:6.1f}s] {message}")


async def debootstrap(recipe: Recipe, cache_dir: Path, say: Stopwatch) -> Path:
    """A pristine rootfs for the recipe's suite and packages, cached across builds."""
    cached = cache_dir / f"debootstrap-{recipe.suite}-{recipe.debootstrap_key()}"
    if (cached / "etc" / "debian_version").exists():
        say(f"using cached {recipe.suite} root filesystem")
        return cached
    if not shutil.which("debootstrap"):
        raise HostNotReady("debootstrap not found", "apt-get install debootstrap (make run does)")
    partial = cached.with_name(cached.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    cache_dir.mkdir(parents=True, exist_ok=True)
    say(f"downloading Debian {recipe.suite} ({len(recipe.packages)} extra packages)...")
    counts = {"Retrieving": 0, "Validating": 0, "Extracting": 0, "Unpacking": 0,
              "Configuring": 0}  # fmt: skip
    try:
        async for line in run_lines(["debootstrap", "--variant=minbase",
                                     f"--include={','.join(recipe.packages)}", recipe.suite,
                                     str(partial), recipe.mirror]):  # fmt: skip
            words = line.split()
            phase = words[1] if len(words) > 1 and words[0] == "I:" else ""
            if phase in counts:  # retrieving and validating alternate: each counts on
                counts[phase] += 1
                if counts[phase] == 1 or counts[phase] % 50 == 0:
                    say(f"debootstrap: {phase.lower()} packages ({counts[phase]} so far)")
            elif line.startswith(("E:", "W:")):
                say(f"debootstrap: {line}")
    except RuntimeFailure as exc:
        shutil.rmtree(partial, ignore_errors=True)
        raise RuntimeFailure(
            f"debootstrap failed: {exc}", "check access to the Debian mirror and free disk space"
        ) from None
    partial.rename(cached)
    say("debootstrap: done")
    return cached


def install_guest(recipe: Recipe, rootfs: Path, say: Stopwatch) -> None:
    """Our in-sandbox code and its dependencies, apart from the user's Python environment."""
    prefix = rootfs / GUEST_PREFIX.lstrip("/")
    guest, lib = prefix / "guest", prefix / "lib"
    guest.mkdir(parents=True, exist_ok=True)
    for source in GUEST_DIR.glob("*.py"):
        shutil.copy2(source, guest / source.name)
    say(f"vendoring {len(recipe.guest_packages)} packages for envd")
    run_sync([sys.executable, "-m", "uv", "pip", "install", "--quiet", "--no-deps",
              "--target", str(lib), "--python-version", "3.11", "--only-binary", ":all:",
              *recipe.guest_packages])  # fmt: skip
    for package in ("envd", "interpreter"):
        shutil.copytree(GUEST_DIR / package, lib / package, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__"))  # fmt: skip
    (prefix / SERVICES_FILE).write_text(
        "".join(f"{s.name} {s.module} {s.user} {s.port}\n" for s in recipe.services)
    )
    (prefix / "bin").mkdir(exist_ok=True)
    # Static: no dynamic loader to run on every command start, and init runs in any image.
    for program, c_file in (("vivarium-spawn", "spawn.c"), ("vivarium-init", "init.c")):
        run_sync(["gcc", "-O2", "-static", "-Wall", "-o", str(prefix / "bin" / program),
                  str(GUEST_DIR / c_file)])  # fmt: skip


# Wheels for the template's CPython 3.11 on Debian 12 (glibc 2.36): pip wants every
# compatible manylinux tag spelled out when it fetches for another interpreter.
WHEEL_PLATFORMS = (*(f"manylinux_2_{minor}_x86_64" for minor in range(5, 37)),
                   "manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux1_x86_64")  # fmt: skip


def fetch_wheels(recipe: Recipe, cache_dir: Path, say: Stopwatch) -> Path:
    """The recipe's pinned wheels, downloaded on the host once and cached."""
    key = hashlib.sha256("\n".join(sorted(recipe.wheels)).encode()).hexdigest()[:12]
    wheelhouse = cache_dir / f"wheels-{key}"
    if wheelhouse.is_dir():
        say(f"using {len(recipe.wheels)} cached wheels")
        return wheelhouse
    partial = wheelhouse.with_name(wheelhouse.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    say(f"downloading {len(recipe.wheels)} wheels on the host...")
    platforms = [arg for platform in WHEEL_PLATFORMS for arg in ("--platform", platform)]
    result = run_sync(
        [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary",
         ":all:", "--python-version", "3.11", "--implementation", "cp", *platforms,
         "--dest", str(partial), *recipe.wheels],
        check=False,
    )  # fmt: skip
    if not result.ok:
        shutil.rmtree(partial, ignore_errors=True)
        raise RuntimeFailure(f"downloading wheels failed: {result.stderr.strip()[-400:]}",
                             "check access to the Python package index")  # fmt: skip
    partial.rename(wheelhouse)
    say(f"downloaded {dir_size(wheelhouse) >> 20} MiB of wheels")
    return wheelhouse


def install_npm_binaries(recipe: Recipe, rootfs: Path, cache_dir: Path, say: Stopwatch) -> None:
    """Programs from npm packages (`npm pack` on the host, once per version: no install
    scripts run), copied into the template."""
    for binary in recipe.npm_binaries:
        key = hashlib.sha256(binary.package.encode()).hexdigest()[:12]
        unpacked = cache_dir / f"npm-{key}"
        if not (unpacked / "package" / binary.path).exists():
            if not shutil.which("npm"):
                raise HostNotReady("npm not found", "apt-get install npm (make run does)")
            say(f"downloading {binary.package} from the npm registry...")
            partial = unpacked.with_name(unpacked.name + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            partial.mkdir(parents=True)
            try:
                packed = run_sync(["npm", "pack", "--silent", binary.package, "--pack-destination",
                                   str(partial)], timeout=900).stdout.split()  # fmt: skip
                run_sync(["tar", "-xzf", str(partial / packed[-1]), "-C", str(partial)])
                (partial / packed[-1]).unlink()
            except BaseException:
                shutil.rmtree(partial, ignore_errors=True)
                raise
            partial.rename(unpacked)
        say(f"installing {binary.dest} ({binary.package})")
        dest = rootfs / binary.dest.lstrip("/")
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(unpacked / "package" / binary.path, dest)
        dest.chmod(0o755)


def install_wheels(recipe: Recipe, rootfs: Path, wheelhouse: Path, say: Stopwatch) -> None:
    """Install into the template's system Python with its own pip, offline."""
    staged = rootfs / "tmp" / "vivarium-wheels"
    shutil.copytree(wheelhouse, staged, dirs_exist_ok=True)
    try:
        say(f"installing {len(recipe.wheels)} packages into the template's Python (offline)")
        step = ("python3 -m pip install --quiet --no-index --no-deps --break-system-packages "
                "--root-user-action=ignore /tmp/vivarium-wheels/*.whl")  # fmt: skip
        res = run_sync(["chroot", str(rootfs), "/bin/sh", "-c", step], check=False)
        if not res.ok:
            raise RuntimeFailure(f"installing wheels failed: {res.stderr.strip()[-400:]}")
    finally:
        shutil.rmtree(staged, ignore_errors=True)


def customize(
    recipe: Recipe, rootfs: Path, probe: Probe, say: Stopwatch, wheelhouse: Path | None = None,
    cache_dir: Path | None = None,
) -> None:  # fmt: skip
    install_guest(recipe, rootfs, say)
    if recipe.npm_binaries:
        assert cache_dir is not None
        install_npm_binaries(recipe, rootfs, cache_dir, say)
    if wheelhouse is not None:
        install_wheels(recipe, rootfs, wheelhouse, say)
    if probe.setuid_blocked:
        say("installing the sudo broker (this runsc forces no-new-privileges)")
        wrapper = rootfs / "usr/local/bin/sudo"
        wrapper.write_text(
            f'#!/bin/sh\nexec /usr/bin/python3 -I {GUEST_PREFIX}/guest/sudo.py "$@"\n'
        )
        wrapper.chmod(0o755)
        steps: tuple[str, ...] = (
            "dpkg-divert --local --rename --divert /usr/bin/sudo.setuid --add /usr/bin/sudo",
            "ln -sf /usr/local/bin/sudo /usr/bin/sudo",
        )
    else:
        steps = ()
    for step in (*recipe.steps, *steps):
        say(f"run: {step[:70]}")
        res = run_sync(["chroot", str(rootfs), "/bin/sh", "-c", step], check=False)
        if not res.ok:
            raise RuntimeFailure(f"template step failed: {step}: {res.stderr.strip()[-300:]}")


async def wait_ready(address: str, port: int, name: str) -> None:
    """Until the program answers on the slot address: what is checkpointed must be serving."""
    # No keep-alive: a connection still open inside the sandbox could not be checkpointed.
    limits = httpx.Limits(max_keepalive_connections=0)
    async with httpx.AsyncClient(timeout=2, limits=limits) as http:
        url = f"http://{address}:{port}/health"
        failure = await until_answered(lambda: http.get(url), READY_TIMEOUT_S, interval_s=0.2)
    if failure is not None:
        raise RuntimeFailure(
            f"{name} did not become ready within {READY_TIMEOUT_S:.0f}s ({failure})",
            "see build-console.log in the build directory",
        )


async def boot_and_checkpoint(
    settings: Settings, recipe: Recipe, build_dir: Path, runtime: Runsc, say: Stopwatch
) -> None:
    # Booted with an empty volume hub of its own; every sandbox gets one (node/volumes.py).
    hub = build_dir / "volume-hub"
    hub.mkdir(exist_ok=True)
    (build_dir / "rootfs" / VOLUME_HUB.lstrip("/")).mkdir(parents=True, exist_ok=True)
    spec = base_spec(build_dir / "rootfs", list(recipe.init), list(recipe.env), HOSTNAME,
                     settings.default_pids, hub)  # fmt: skip
    (build_dir / "spec.json").write_text(json.dumps(spec, indent=1))
    slots = SlotRange(settings.slot_prefix, settings.slot_cidr)
    slot = slots.slot(slots.capacity - 1)  # reserved for builds
    cid = f"build-{recipe.name}-{build_dir.name}"
    await destroy_slot(slot.prefix, slot.index)
    await create_slot(slot)
    bundle = build_dir / "bundle"
    try:
        resources = Resources(settings.default_memory_mb, settings.default_cpus,
                              settings.default_pids, settings.default_disk_mb)  # fmt: skip
        write_bundle(bundle, for_sandbox(spec, Path(slot.netns_path), resources, cid, hub))
        filestore = disk.create(build_dir / "boot", resources.disk_mb << 20)
        say("booting under runsc")
        await runtime.start(cid, bundle, filestore, build_dir / "build-console.log")
        disk.hold_back(build_dir / "boot")
        await wait_ready(slot.router_ip, ENVD_PORT, "envd")
        for service in recipe.services:
            say(f"waiting for {service.name} on port {service.port}")
            await wait_ready(slot.router_ip, service.port, service.name)
        say("checkpointing")
        await runtime.checkpoint(cid, build_dir / "checkpoint", compress=TEMPLATE_COMPRESSION)
    finally:
        await runtime.delete(cid)
        await destroy_slot(slot.prefix, slot.index)
        shutil.rmtree(bundle, ignore_errors=True)
        disk.discard(build_dir / "boot")
        shutil.rmtree(hub, ignore_errors=True)


async def build(
    settings: Settings, name: str, *, force: bool = False, report: Report = print
) -> Template:
    recipe = RECIPES.get(name)
    if recipe is None:
        raise NotFound(f"no recipe for template {name!r}", f"known: {', '.join(RECIPES)}")
    say = Stopwatch(report)
    runtime = open_runtime(settings.runsc_path, settings.state_dir,
                           settings.state_dir / "runsc-build", settings.runsc_platform)  # fmt: skip
    store = TemplateStore(settings.templates_root)
    recipe_hash = recipe.recipe_hash(runtime.probe)
    current = store.current(name)
    if current and current.manifest.get("recipe_hash") == recipe_hash and not force:
        say(f"template {name!r} is up to date (build {current.build_id})")
        return current

    build_id = f"{datetime.now(UTC):%Y%m%d%H%M%S}-{recipe_hash[:8]}"
    build_dir = store.builds_dir(name) / build_id
    build_dir.mkdir(parents=True)
    try:
        pristine = await debootstrap(recipe, settings.cache_dir, say)
        say("copying root filesystem")
        run_sync(["cp", "-a", "--reflink=auto", str(pristine), str(build_dir / "rootfs")])
        wheelhouse = fetch_wheels(recipe, settings.cache_dir, say) if recipe.wheels else None
        customize(recipe, build_dir / "rootfs", runtime.probe, say, wheelhouse,
                  settings.cache_dir)  # fmt: skip
        await boot_and_checkpoint(settings, recipe, build_dir, runtime, say)
        manifest: dict[str, Any] = {
            "name": name,
            "build_id": build_id,
            "recipe_hash": recipe_hash,
            "runsc_version": runtime.probe.runsc_version,
            "platform": runtime.probe.platform,
            "disk_mb": recipe.disk_mb,  # 0: the node's default, when a sandbox starts
            "created_at": datetime.now(UTC).isoformat(),
            "rootfs_bytes": dir_size(build_dir / "rootfs"),
            "checkpoint_bytes": dir_size(build_dir / "checkpoint"),
            "checkpoint_sha256": sha256_dir(build_dir / "checkpoint"),
        }
        (build_dir / "manifest.json").write_text(json.dumps(manifest, indent=1))
    except BaseException:
        shutil.rmtree(build_dir, ignore_errors=True)
        raise
    store.publish(name, build_dir)
    say(
        f"template {name!r} built: {build_id} (checkpoint {manifest['checkpoint_bytes'] >> 20} MiB)"
    )
    return Template(name, build_dir, manifest)

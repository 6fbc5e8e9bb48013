"""OCI images as template bases (`from_image`): pulled with skopeo, unpacked with umoci (Debian's
packages), never with a registry client of our own.

An image is fetched once per manifest digest into the cache (`images/<digest>/`: its OCI layout
and the unpacked bundle, `rootfs/` and umoci's runtime `config.json`), so templates from the same
image share the download. Names without a registry are Docker Hub's, or the operator's mirror's
(`VIVARIUM_REGISTRY_MIRROR`); registries listed in `VIVARIUM_REGISTRY_INSECURE` are reached over
plain HTTP (a registry on the operator's own network, the tests' local one).
"""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from vivarium.errors import InvalidArgument, RuntimeFailure
from vivarium.proc import run, run_lines

PULL_TIMEOUT_S = 1800.0
_REFERENCE = re.compile(r"^[a-z0-9][a-z0-9._:/@-]{0,254}$")
_pulling = asyncio.Lock()  # one pull at a time fills the cache; the others then find it


@dataclass(frozen=True)
class Registry:
    """How images are fetched: a mirror for names without a registry, registries that speak
    plain HTTP, and credentials (`user:password`) for one pull."""

    mirror: str = ""
    insecure: tuple[str, ...] = ()
    credentials: str | None = None

    def reference(self, image: str) -> str:
        """`python:3.12` -> `docker://<mirror or docker.io>/library/python:3.12`."""
        if not _REFERENCE.match(image) or ".." in image:
            raise InvalidArgument(
                f"{image!r} is not an image reference",
                "use a name like python:3.12 or registry.example/team/app:1",
            )
        first, _, rest = image.partition("/")
        has_registry = bool(rest) and ("." in first or ":" in first or first == "localhost")
        if not has_registry:
            path = image if rest else f"library/{image}"
            image = f"{self.mirror or 'docker.io'}/{path}"
        return f"docker://{image}"

    def flags(self, reference: str, prefix: str = "") -> list[str]:
        """skopeo's flags for the registry: `prefix` "src-" for a copy's source."""
        host = reference.removeprefix("docker://").split("/", 1)[0]
        flags = [f"--{prefix}tls-verify=false"] if host in self.insecure else []
        if self.credentials:
            flags.append(f"--{prefix}creds={self.credentials}")
        return flags


@dataclass(frozen=True)
class Image:
    reference: str
    digest: str
    rootfs: Path
    env: tuple[str, ...]
    workdir: str
    user: str


async def inspect(registry: Registry, image: str) -> tuple[str, str]:
    """(reference, manifest digest); a registry that refuses says so, naming the image."""
    reference = registry.reference(image)
    res = await run(["skopeo", "inspect", *registry.flags(reference),
                     "--format", "{{.Digest}}", reference], check=False, timeout=120)  # fmt: skip
    if not res.ok:
        detail = (res.stderr.strip().splitlines() or ["no answer"])[-1][-300:]
        raise InvalidArgument(f"image {image!r} could not be fetched from "
                              f"{reference.removeprefix('docker://').split('/')[0]}: {detail}",
                              "check the name, the registry, its credentials, or "
                              "VIVARIUM_REGISTRY_MIRROR")  # fmt: skip
    return reference, res.stdout.strip()


async def pull(registry: Registry, image: str, cache: Path, say: Callable[[str], None]) -> Image:
    reference, digest = await inspect(registry, image)
    home = cache / "images" / digest.replace(":", "-")
    async with _pulling:
        if not (home / "bundle" / "config.json").exists():
            partial = home.with_name(home.name + ".partial")
            await asyncio.to_thread(shutil.rmtree, partial, True)
            partial.mkdir(parents=True)
            try:
                say(f"pulling {image} ({digest[:19]})")
                argv = ["skopeo", "copy", *registry.flags(reference, "src-"), reference,
                        f"oci:{partial / 'layout'}:image"]  # fmt: skip
                async for line in run_lines(argv):
                    if line.startswith(("Copying blob", "Copying config")):
                        say(line.strip()[:120])
                say("unpacking the image")
                await run(["umoci", "unpack", "--image", f"{partial / 'layout'}:image",
                           str(partial / "bundle")], timeout=PULL_TIMEOUT_S)  # fmt: skip
                await asyncio.to_thread(shutil.rmtree, home, True)
                partial.rename(home)
            except RuntimeFailure as exc:
                raise RuntimeFailure(
                    f"pulling {image} failed: {exc.message}",
                    "check the registry and the host's free disk",
                ) from None
            finally:
                await asyncio.to_thread(shutil.rmtree, partial, True)
        else:
            say(f"using the cached {image} ({digest[:19]})")
    config = json.loads((home / "bundle" / "config.json").read_text())
    process = config.get("process", {})
    user = process.get("user", {})
    return Image(reference=reference, digest=digest, rootfs=home / "bundle" / "rootfs",
                 env=tuple(str(e) for e in process.get("env", [])),
                 workdir=str(process.get("cwd") or "/"),
                 user=f"{user.get('uid', 0)}:{user.get('gid', 0)}")  # fmt: skip

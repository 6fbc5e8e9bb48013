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
import base64
import contextlib
import ipaddress
import json
import os
import re
import shutil
import socket
import tempfile
from collections import defaultdict
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from vivarium.errors import InvalidArgument, RuntimeFailure
from vivarium.proc import run, run_lines

PULL_TIMEOUT_S = 1800.0
_REFERENCE = re.compile(r"^[a-z0-9][a-z0-9._:/@-]{0,254}\Z")
_pulling: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)  # per digest
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}\Z")
_OPERATOR = "ask the operator to set VIVARIUM_REGISTRY_MIRROR or VIVARIUM_REGISTRY_INSECURE"


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

    def host(self, reference: str) -> str:
        return reference.removeprefix("docker://").split("/", 1)[0]

    async def check_host(self, reference: str, resolve: Resolve | None = None) -> None:
        """Pulls run on the host, outside any sandbox's egress rules: a team may name public
        registries, and the operator's own (the mirror, the insecure list), but not the host's
        loopback or a private address that could probe the operator's network, by address or
        by a name that resolves to one. (skopeo resolves the name again: a DNS server of the
        team's that answers differently the second time is not stopped by this.)"""
        host = self.host(reference)
        if host == self.mirror or host in self.insecure:
            return
        name = host.rsplit(":", 1)[0].strip("[]")
        if name == "localhost" or name.endswith(".localhost"):
            raise InvalidArgument(f"registry {host!r} is this host", _OPERATOR)
        for address in await (resolve or addresses)(name):
            if not ipaddress.ip_address(address).is_global:
                seen = "" if address == name else f" ({name} is {address})"
                raise InvalidArgument(f"registry {host!r} is not a public address{seen}",
                                      _OPERATOR)  # fmt: skip

    def flags(self, reference: str, prefix: str = "", authfile: Path | None = None) -> list[str]:
        """skopeo's flags for the registry: `prefix` "src-" for a copy's source. Credentials go
        in `authfile` (never on a command line, which other users see and errors quote); with
        none, none of root's are used either."""
        flags = [f"--{prefix}tls-verify=false"] if self.host(reference) in self.insecure else []
        if authfile is not None:
            flags.append(f"--{prefix}authfile={authfile}")
        else:
            flags.append(f"--{prefix}no-creds")
        return flags

    @contextlib.contextmanager
    def authfile(self, reference: str) -> Iterator[Path | None]:
        """The credentials as a containers-auth.json of this pull's own (0600, removed after)."""
        if not self.credentials:
            yield None
            return
        token = base64.b64encode(self.credentials.encode()).decode()
        with tempfile.TemporaryDirectory(prefix="vivarium-auth-") as directory:
            path = Path(directory) / "auth.json"
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump({"auths": {self.host(reference): {"auth": token}}}, f)
            yield path


Resolve = Callable[[str], Awaitable[list[str]]]


async def addresses(name: str) -> list[str]:
    """The addresses a registry's name stands for; none if it does not resolve (the pull then
    fails and says so)."""
    try:
        ipaddress.ip_address(name)
        return [name]
    except ValueError:
        pass
    try:
        found = await asyncio.get_running_loop().getaddrinfo(name, None, type=socket.SOCK_STREAM)
    except (socket.gaierror, UnicodeError):
        return []
    return sorted({str(sockaddr[0]) for *_, sockaddr in found})


@dataclass(frozen=True)
class Image:
    reference: str
    digest: str
    rootfs: Path
    env: tuple[str, ...]
    workdir: str
    user: str


async def inspect(registry: Registry, image: str, authfile: Path | None) -> tuple[str, str]:
    """(reference, manifest digest); a registry that refuses says so, naming the image."""
    reference = registry.reference(image)
    await registry.check_host(reference)
    res = await run(["skopeo", "inspect", *registry.flags(reference, authfile=authfile),
                     "--format", "{{.Digest}}", reference], check=False, timeout=120)  # fmt: skip
    digest = res.stdout.strip()
    if not res.ok or not _DIGEST.match(digest):
        detail = (res.stderr.strip().splitlines() or ["no answer"])[-1][-300:]
        raise InvalidArgument(f"image {image!r} could not be fetched from "
                              f"{registry.host(reference)}: {detail}",
                              "check the name, the registry, its credentials, or "
                              "VIVARIUM_REGISTRY_MIRROR")  # fmt: skip
    return reference, digest


async def pull(registry: Registry, image: str, cache: Path, say: Callable[[str], None]) -> Image:
    with registry.authfile(registry.reference(image)) as authfile:
        reference, digest = await inspect(registry, image, authfile)
        home = cache / "images" / digest.replace(":", "-")
        async with _pulling[digest]:
            if (home / "bundle" / "config.json").exists():
                say(f"using the cached {image} ({digest[:19]})")
            else:
                await _fetch(registry, reference, digest, authfile, home, say, image)
    config = json.loads((home / "bundle" / "config.json").read_text())
    process = config.get("process", {})
    user = process.get("user", {})
    return Image(reference=reference, digest=digest, rootfs=home / "bundle" / "rootfs",
                 env=tuple(str(e) for e in process.get("env", [])),
                 workdir=str(process.get("cwd") or "/"),
                 user=f"{user.get('uid', 0)}:{user.get('gid', 0)}")  # fmt: skip


async def _fetch(registry: Registry, reference: str, digest: str, authfile: Path | None,
                 home: Path, say: Callable[[str], None], image: str) -> None:  # fmt: skip
    """Copy the image by its digest (what was inspected is what is stored under it, even if
    the tag moves meanwhile), then unpack it; all or nothing."""
    partial = home.with_name(home.name + ".partial")
    await asyncio.to_thread(shutil.rmtree, partial, True)
    partial.mkdir(parents=True)
    pinned = f"{_repository(reference)}@{digest}"
    try:
        say(f"pulling {image} ({digest[:19]})")
        argv = ["skopeo", "copy", *registry.flags(reference, "src-", authfile), pinned,
                f"oci:{partial / 'layout'}:image"]  # fmt: skip
        async with asyncio.timeout(PULL_TIMEOUT_S):
            async for line in run_lines(argv):
                if line.startswith(("Copying blob", "Copying config")):
                    say(line.strip()[:120])
        say("unpacking the image")
        await run(["umoci", "unpack", "--image", f"{partial / 'layout'}:image",
                   str(partial / "bundle")], timeout=PULL_TIMEOUT_S)  # fmt: skip
        await asyncio.to_thread(shutil.rmtree, partial / "layout", True)  # unpacked: not kept
        await asyncio.to_thread(shutil.rmtree, home, True)
        partial.rename(home)
    except TimeoutError:
        raise RuntimeFailure(f"pulling {image} took longer than {PULL_TIMEOUT_S:.0f} s",
                             "check the registry") from None  # fmt: skip
    except RuntimeFailure as exc:
        raise RuntimeFailure(f"pulling {image} failed: {exc.message}",
                             "check the registry and the host's free disk") from None  # fmt: skip
    finally:
        await asyncio.to_thread(shutil.rmtree, partial, True)


def _repository(reference: str) -> str:
    """The reference without its tag or digest: `docker://host/team/app`."""
    head, _, last = reference.rpartition("/")
    return f"{head}/{last.split('@', 1)[0].split(':', 1)[0]}"

"""Template recipes: what goes into a template's root filesystem, and a hash that says when a
built template is stale (recipe, guest code, runsc version and probes all count)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vivarium.runtime.probe import Probe

GUEST_DIR = Path(__file__).resolve().parent.parent / "guest"
SHIM_SOURCE = Path(__file__).resolve().parent / "statx_shim.c"
BUILDER_SOURCE = Path(__file__).resolve().parent / "builder.py"
# Inside the template: our code lives apart from the user's Python environment.
GUEST_PREFIX = "/opt/vivarium"

BASE_PACKAGES = (
    "python3", "python3-pip", "python3-venv", "curl", "git", "procps", "iproute2",
    "ca-certificates", "sudo", "less", "nano", "wget", "unzip", "xz-utils", "locales",
)  # fmt: skip

# envd's dependencies, vendored into GUEST_PREFIX/lib (pure Python, fetched on the host at build
# time: a template build never needs network access from inside a sandbox). Pinned with their
# dependencies so every build of a recipe gets the same code.
GUEST_PACKAGES = (
    "starlette==1.10.0", "uvicorn==0.54.0", "h11==0.16.0", "click==8.5.1", "anyio==4.16.0",
    "idna==3.20", "typing_extensions==4.16.0", "python-multipart==0.0.20",
)  # fmt: skip

USER_SETUP = (
    "id -u user >/dev/null 2>&1 || useradd --create-home --uid 1000 --shell /bin/bash user",
    "usermod -aG sudo user",
    "echo 'user ALL=(ALL:ALL) NOPASSWD: ALL' > /etc/sudoers.d/user",
    "chmod 0440 /etc/sudoers.d/user",
    "printf 'nameserver 8.8.8.8\\nnameserver 1.1.1.1\\n' > /etc/resolv.conf",
    "printf '127.0.0.1 localhost\\n::1 localhost\\n' > /etc/hosts",
    "sed -i 's/^# *C.UTF-8/C.UTF-8/' /etc/locale.gen 2>/dev/null || true",
    # LANG=C.UTF-8 from the archive: one mmap at every program start instead of ~50 syscalls
    # over 12 locale files (~3 ms per `bash -l` under ptrace).
    "localedef --add-to-archive /usr/lib/locale/C.utf8",
    # Every command runs in `bash -l`; spare it a fork + exec of `id` (bash knows $EUID).
    """sed -i 's/"$(id -u)"/"${EUID:-$(id -u)}"/g' /etc/profile""",
    "apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin",
)


@dataclass(frozen=True)
class Recipe:
    name: str
    suite: str = "bookworm"
    mirror: str = "http://deb.debian.org/debian"
    packages: tuple[str, ...] = BASE_PACKAGES
    steps: tuple[str, ...] = USER_SETUP
    guest_packages: tuple[str, ...] = GUEST_PACKAGES
    init: tuple[str, ...] = ("/usr/bin/python3", f"{GUEST_PREFIX}/guest/init.py")
    env: tuple[str, ...] = ("LANG=C.UTF-8", "HOME=/root")
    extra: dict[str, str] = field(default_factory=dict)

    def recipe_hash(self, probe: Probe) -> str:
        h = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode())
        for path in sorted([*GUEST_DIR.rglob("*.py"), *GUEST_DIR.rglob("*.c")]):
            h.update(path.name.encode())
            h.update(path.read_bytes())
        h.update(SHIM_SOURCE.read_bytes())
        h.update(BUILDER_SOURCE.read_bytes())  # how a template is built is part of what it is
        h.update(f"{probe.runsc_version}|{probe.platform}|{probe.statx_shim}".encode())
        h.update(f"{probe.setuid_blocked}".encode())
        return h.hexdigest()[:16]

    def debootstrap_key(self) -> str:
        raw = f"{self.suite}|{self.mirror}|{','.join(sorted(self.packages))}"
        return hashlib.sha256(raw.encode()).hexdigest()[:12]


RECIPES: dict[str, Recipe] = {"base": Recipe(name="base")}

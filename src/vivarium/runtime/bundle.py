"""OCI bundle specs for sandboxes.

A restore needs a spec that matches the checkpointed one (same rootfs path, same mounts), so
every sandbox of a template is described by the template's spec plus only what may differ:
the network namespace and the resource limits.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vivarium.errors import InvalidArgument
from vivarium.guest.envd import VOLUME_HUB

PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

# Docker's default set: enough for sudo, apt and package managers to work as root inside.
DEFAULT_CAPS = [
    "CAP_CHOWN", "CAP_DAC_OVERRIDE", "CAP_FSETID", "CAP_FOWNER", "CAP_MKNOD", "CAP_NET_RAW",
    "CAP_SETGID", "CAP_SETUID", "CAP_SETFCAP", "CAP_SETPCAP", "CAP_NET_BIND_SERVICE",
    "CAP_SYS_CHROOT", "CAP_KILL", "CAP_AUDIT_WRITE",
]  # fmt: skip

MIN_MEMORY_MB = 256  # an idle sandbox uses ~110 MiB of it (the sentry)
MAX_MEMORY_MB = 64 * 1024
MAX_CPUS = 64
MIN_PIDS = 16
MAX_PIDS = 65536
MIN_DISK_MB = 256
MAX_DISK_MB = 4 << 20  # 4 TiB: the image is sparse; only what is written costs disk
CPU_PERIOD_US = 100_000
# Every sandbox's cgroup sits under one parent, so a restoring sandbox shares the parent's CPU
# with all running ones: among 50 idle systrap sandboxes (~5% of a core each) a restore got a
# fiftieth and took minutes. It starts with this weight, 64 times a running sandbox's (8 times
# still left restores at 20-50 s beside 70 sandboxes), and the node lowers it to
# RUNNING_CPU_SHARES once the sandbox is up (cgroups.settle_cpu).
STARTING_CPU_SHARES = 65536
RUNNING_CPU_SHARES = 1024


@dataclass(frozen=True)
class Resources:
    memory_mb: int
    cpus: float
    pids: int
    disk_mb: int

    def validate(self) -> None:
        if not MIN_MEMORY_MB <= self.memory_mb <= MAX_MEMORY_MB:
            raise InvalidArgument(
                f"memory_mb={self.memory_mb} is out of range",
                f"use {MIN_MEMORY_MB}..{MAX_MEMORY_MB}",
            )
        if not 0.1 <= self.cpus <= MAX_CPUS:
            raise InvalidArgument(f"cpus={self.cpus} is out of range", f"use 0.1..{MAX_CPUS}")
        if not MIN_PIDS <= self.pids <= MAX_PIDS:
            raise InvalidArgument(
                f"pids={self.pids} is out of range", f"use {MIN_PIDS}..{MAX_PIDS}"
            )
        if not MIN_DISK_MB <= self.disk_mb <= MAX_DISK_MB:
            raise InvalidArgument(
                f"disk_mb={self.disk_mb} is out of range", f"use {MIN_DISK_MB}..{MAX_DISK_MB}"
            )

    def to_oci(self) -> dict[str, Any]:
        return {
            "memory": {"limit": self.memory_mb * 1024 * 1024},
            "cpu": {
                "quota": int(self.cpus * CPU_PERIOD_US),
                "period": CPU_PERIOD_US,
                "shares": STARTING_CPU_SHARES,
            },
            "pids": {"limit": host_tasks(self.pids)},
        }


# A sandbox's processes are counted inside it, by RLIMIT_NPROC (per user; root, holding
# CAP_SYS_RESOURCE, is exempt), which fails fork() with EAGAIN as a kernel would. The host
# cgroup's pids limit counts the sentry's own threads and the platform's stub tasks as well, and
# reaching it crashes the sentry: it is a backstop set well above what `pids` processes need
# (measured: about 2.2 host tasks per process under systrap).
HOST_TASKS_PER_PROCESS = 5
HOST_TASKS_BASE = 100


def host_tasks(processes: int) -> int:
    return HOST_TASKS_PER_PROCESS * processes + HOST_TASKS_BASE


def base_spec(
    rootfs: Path,
    args: list[str],
    env: list[str],
    hostname: str,
    processes: int,
    hub: Path | None = None,
) -> dict[str, Any]:
    """The spec a template is booted with; restores reuse it with `for_sandbox`. The rlimits are
    its init's, inherited by everything in every sandbox restored from it: a restore keeps the
    saved kernel's. Its mounts are every sandbox's: a restore sees only the mounts the
    checkpoint was taken with (one added then, or mounted on the host afterwards, is not seen
    or not written through), so the volume hub is there from the start, its source a
    directory of each container's own (`for_sandbox`)."""
    caps = list(DEFAULT_CAPS)
    spec: dict[str, Any] = {
        "ociVersion": "1.0.0",
        "process": {
            "terminal": False,
            "user": {"uid": 0, "gid": 0},
            "args": args,
            "env": [PATH_ENV, *env],
            "cwd": "/",
            "capabilities": {k: caps for k in ("bounding", "effective", "permitted")},
            "rlimits": [
                {"type": "RLIMIT_NOFILE", "hard": 1048576, "soft": 1048576},
                {"type": "RLIMIT_NPROC", "hard": processes, "soft": processes},
            ],
            "noNewPrivileges": False,
        },
        "root": {"path": str(rootfs), "readonly": False},
        "hostname": hostname,
        "mounts": [
            {"destination": "/proc", "type": "proc", "source": "proc"},
            {"destination": "/dev", "type": "tmpfs", "source": "tmpfs"},
            {"destination": "/dev/pts", "type": "devpts", "source": "devpts"},
            {"destination": "/dev/shm", "type": "tmpfs", "source": "shm"},
            {
                "destination": "/sys",
                "type": "sysfs",
                "source": "sysfs",
                "options": ["nosuid", "noexec", "nodev", "ro"],
            },
        ],
        "linux": {
            "namespaces": [{"type": t} for t in ("pid", "ipc", "uts", "mount")],
            "resources": {},
        },
    }
    if hub is not None:
        # rbind: the volumes bind-mounted below the source on the host come along.
        spec["mounts"].append({"destination": VOLUME_HUB, "type": "bind", "source": str(hub),
                               "options": ["rbind", "rw", "nosuid", "nodev"]})  # fmt: skip
    return spec


CGROUP_PARENT = "vivarium"


def cgroup_path(container_id: str) -> str:
    """Where the host cgroup of a sandbox lives, below each controller's hierarchy."""
    return f"/{CGROUP_PARENT}/{container_id}"


def has_volume_hub(spec: dict[str, Any]) -> bool:
    """Templates built before volumes existed have none: their sandboxes cannot mount any."""
    return any(m["destination"] == VOLUME_HUB for m in spec["mounts"])


def for_sandbox(
    spec: dict[str, Any], netns: Path, resources: Resources, container_id: str, hub: Path
) -> dict[str, Any]:
    """The template's spec for one container; `hub` holds the volumes it mounts (or none)."""
    out: dict[str, Any] = json.loads(json.dumps(spec))
    for mount in out["mounts"]:
        if mount["destination"] == VOLUME_HUB:
            mount["source"] = str(hub)
    out["linux"]["cgroupsPath"] = cgroup_path(container_id)
    namespaces = [ns for ns in out["linux"]["namespaces"] if ns["type"] != "network"]
    namespaces.append({"type": "network", "path": str(netns)})
    out["linux"]["namespaces"] = namespaces
    out["linux"]["resources"] = resources.to_oci()
    return out


def write_bundle(directory: Path, spec: dict[str, Any]) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / "config.json.tmp"
    tmp.write_text(json.dumps(spec, indent=1))
    tmp.rename(directory / "config.json")
    return directory

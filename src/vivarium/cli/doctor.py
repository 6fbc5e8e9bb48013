"""`vivarium doctor`: check the host and say how to fix what is missing."""

from __future__ import annotations

import asyncio
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass

from vivarium.config import Settings
from vivarium.errors import VivariumError
from vivarium.network.pool import SlotPool
from vivarium.runtime.probe import detect
from vivarium.templates.store import TemplateStore

MIN_FREE_GB = 5
TOOLS = {
    "ip": "apt-get install iproute2",
    "iptables": "apt-get install iptables",
    "nsenter": "apt-get install util-linux",
    "unshare": "apt-get install util-linux",
    "debootstrap": "apt-get install debootstrap",
    "gcc": "apt-get install gcc libc6-dev",
    "mkfs.ext4": "apt-get install e2fsprogs",
}


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""


def _guard(name: str, fn: Callable[[], str]) -> Check:
    try:
        return Check(name, True, fn())
    except VivariumError as exc:
        return Check(name, False, exc.message, exc.hint)
    except Exception as exc:  # doctor reports everything it cannot check
        return Check(name, False, f"{type(exc).__name__}: {exc}")


def run_checks(settings: Settings) -> list[Check]:
    checks = [Check("root", os.geteuid() == 0, f"euid {os.geteuid()}", "run as root (sudo)")]
    if not checks[0].ok:
        return checks
    for tool, fix in TOOLS.items():
        path = shutil.which(tool)
        checks.append(Check(f"tool {tool}", path is not None, path or "not found", fix))

    def probe() -> str:
        p = detect(settings.runsc_path, settings.state_dir, settings.runsc_platform)
        return (f"runsc {p.runsc_version}, platform {p.platform}, netns work-around "
                f"{'on' if p.netns_workaround else 'off'}, sudo broker "
                f"{'on' if p.setuid_blocked else 'off'}")  # fmt: skip

    checks.append(_guard("runsc", probe))

    def slots() -> str:
        pool = SlotPool(settings.slot_prefix, settings.slot_cidr, (), 0, settings.max_sandboxes)
        asyncio.run(pool.check_conflicts())
        return f"{settings.slot_cidr}: {pool.range.capacity - 1} slots, no conflicting routes"

    checks.append(_guard("slot range", slots))
    settings.state_dir.mkdir(parents=True, exist_ok=True)
    free_gb = shutil.disk_usage(settings.state_dir).free / 1e9
    checks.append(Check("disk", free_gb >= MIN_FREE_GB,
                        f"{free_gb:.1f} GB free in {settings.state_dir}",
                        f"free at least {MIN_FREE_GB} GB or set VIVARIUM_STATE_DIR"))  # fmt: skip
    names = TemplateStore(settings.templates_root).names()
    checks.append(Check("templates", "base" in names, ", ".join(names) or "none built",
                        "build the base template: `vivarium template build base`"))  # fmt: skip
    return checks

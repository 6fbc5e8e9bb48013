"""What the installed runsc can do on this host.

The release must be at least MIN_RELEASE (checked by its version); its remaining quirks are
found by trying: probes run tiny containers whose root is the host's own filesystem, read-only,
so they need no template. Results are cached per (runsc version, kernel) in the state directory.
"""

from __future__ import annotations

import json
import os
import platform
import re
import shutil
import tempfile
from dataclasses import asdict, dataclass, replace
from pathlib import Path

from vivarium.errors import HostNotReady
from vivarium.proc import run_sync
from vivarium.runtime import procsys
from vivarium.runtime.bundle import base_spec, write_bundle

NETNS_REFUSAL = "root network namespace"
# The first release that saves what programs do with the network (listening event loops, open
# connections) and keeps the writable layer in a file: pause works for any workload.
MIN_RELEASE = 20240729
INSTALL_HINT = (
    "install runsc from Debian's bookworm-backports suite: `make system-deps` does it "
    "(scripts/apt-backports.sh, then `apt-get install -t bookworm-backports runsc`)"
)
# Measured with `make bench` on this kind of host (2 cores, nested virtualisation): ptrace is
# faster than systrap for commands, creates and scale (docs/benchmarks.md). Override with
# VIVARIUM_RUNSC_PLATFORM.
DEFAULT_PLATFORM = "systrap"
PLATFORMS = ("ptrace", "systrap")


@dataclass(frozen=True)
class Probe:
    runsc_version: str
    kernel: str
    platform: str
    netns_workaround: bool
    setuid_blocked: bool  # NO_NEW_PRIVS forced on every process: setuid sudo cannot work

    @property
    def cache_key(self) -> str:
        return f"{self.runsc_version}|{self.kernel}"


def require_root() -> None:
    if os.geteuid() != 0:
        raise HostNotReady(
            "vivarium must run as root", "it creates network namespaces and runs runsc; use sudo"
        )


def find_runsc(runsc: str) -> str:
    path = shutil.which(runsc)
    if not path:
        raise HostNotReady(f"runsc not found ({runsc})", INSTALL_HINT)
    return path


def runsc_version(runsc: str) -> str:
    first = run_sync([runsc, "--version"]).stdout.splitlines()
    return first[0].removeprefix("runsc version ").strip() if first else "unknown"


def release_date(version: str) -> int | None:
    """The release a version names (Debian's `0.0~20240729.0`, upstream's `release-20240729.0`),
    as yyyymmdd; None if it names none."""
    found = re.search(r"(?<!\d)(20\d{6})(?!\d)", version)
    return int(found.group(1)) if found else None


def check_release(version: str) -> None:
    release = release_date(version)
    if release is None or release < MIN_RELEASE:
        raise HostNotReady(
            f"runsc {version} is too old: vivarium needs release {MIN_RELEASE} or newer",
            INSTALL_HINT,
        )


NNP_CHECK = "import ctypes; raise SystemExit(ctypes.CDLL(None).prctl(39, 0, 0, 0, 0))"


def _probe_container(
    runsc: str,
    flags: list[str],
    args: list[str],
    netns: str | None,
    wrap_dir: Path | None,
    uid: int = 0,
) -> tuple[bool, str]:
    """Run `args` in a throw-away container over the host's root, read-only."""
    with tempfile.TemporaryDirectory(prefix="vivarium-probe-") as tmp:
        spec = base_spec(Path("/"), args, [], "probe", 64)
        spec["root"]["readonly"] = True
        spec["process"]["user"] = {"uid": uid, "gid": uid}
        if netns:
            spec["linux"]["namespaces"].append({"type": "network", "path": netns})
        bundle = write_bundle(Path(tmp) / "bundle", spec)
        argv = [runsc, "--root", f"{tmp}/root", *flags, "run", "--bundle", str(bundle), "probe"]
        if wrap_dir is not None:
            argv = procsys.wrap(argv, wrap_dir)
        res = run_sync(argv, check=False, timeout=60)
        return res.ok, res.stdout + res.stderr


def detect(runsc: str, state_dir: Path, platform_override: str = "") -> Probe:
    """Probe runsc once per version and kernel; later calls read the cached answer."""
    require_root()
    runsc = find_runsc(runsc)
    version = runsc_version(runsc)
    check_release(version)
    plat = platform_override or DEFAULT_PLATFORM
    if plat not in PLATFORMS:
        hint = f"set VIVARIUM_RUNSC_PLATFORM to one of {', '.join(PLATFORMS)}"
        raise HostNotReady(f"unknown runsc platform {plat!r}", hint)
    kernel = platform.release()
    cache = state_dir / "probe.json"
    if cache.exists():
        try:
            cached = Probe(**json.loads(cache.read_text()))
            # The platform is a choice, not a finding: never taken from the cache.
            if cached.cache_key == f"{version}|{kernel}":
                return replace(cached, platform=plat)
        except (TypeError, ValueError):
            pass

    base_flags = [f"--platform={plat}", "--overlay2=root:memory"]
    ok, out = _probe_container(runsc, [*base_flags, "--network=none"], ["/bin/ls", "/"], None, None)
    if not ok:
        raise HostNotReady(
            f"runsc cannot start a container here: {out.strip()[-300:]}",
            "run `vivarium doctor` for details",
        )

    # prctl(PR_GET_NO_NEW_PRIVS) as an unprivileged user; without a host python3, assume forced.
    setuid_blocked = True
    if Path("/usr/bin/python3").exists():
        nnp_args = ["/usr/bin/python3", "-I", "-c", NNP_CHECK]
        ok, _ = _probe_container(runsc, [*base_flags, "--network=none"], nnp_args, None, None,
                                 uid=65534)  # fmt: skip
        setuid_blocked = not ok

    netns_workaround = False
    netns_name = f"vivarium-probe-{os.getpid()}"
    run_sync(["ip", "netns", "add", netns_name])
    try:
        netns_path = f"/var/run/netns/{netns_name}"
        net_flags = [*base_flags, "--network=sandbox"]
        ok, out = _probe_container(runsc, net_flags, ["/bin/true"], netns_path, None)
        if not ok and NETNS_REFUSAL in out:
            state_dir.mkdir(parents=True, exist_ok=True)
            copy = procsys.make_copy(state_dir / "procsys")
            ok, out = _probe_container(runsc, net_flags, ["/bin/true"], netns_path, copy)
            netns_workaround = True
        if not ok:
            raise HostNotReady(
                f"runsc cannot start a networked sandbox: {out.strip()[-300:]}",
                "check that iproute2 works and the kernel allows network namespaces",
            )
    finally:
        run_sync(["ip", "netns", "del", netns_name], check=False)

    probe = Probe(version, kernel, plat, netns_workaround, setuid_blocked)
    state_dir.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(asdict(probe), indent=1))
    return probe

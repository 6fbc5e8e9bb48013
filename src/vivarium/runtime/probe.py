"""What the installed runsc can do on this host, found by trying rather than by version numbers.

Probes run tiny containers whose root is the host's own filesystem, read-only, so they need no
template. Results are cached per (runsc version, kernel) in the state directory.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from vivarium.errors import HostNotReady
from vivarium.proc import run_sync
from vivarium.runtime import procsys
from vivarium.runtime.bundle import base_spec, write_bundle

NETNS_REFUSAL = "root network namespace"


@dataclass(frozen=True)
class Probe:
    runsc_version: str
    kernel: str
    platform: str
    overlay_flag: str
    netns_workaround: bool
    statx_shim: bool
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
        raise HostNotReady(
            f"runsc not found ({runsc})",
            "install gVisor: `apt-get install runsc`, or run `make run` which installs it",
        )
    return path


def runsc_version(runsc: str) -> str:
    first = run_sync([runsc, "--version"]).stdout.splitlines()
    return first[0].removeprefix("runsc version ").strip() if first else "unknown"


def _flags_help(runsc: str) -> str:
    res = run_sync([runsc, "flags"], check=False)
    return res.stdout + res.stderr


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
        spec = base_spec(Path("/"), args, [], "probe")
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
    kernel = platform.release()
    cache = state_dir / "probe.json"
    if cache.exists():
        try:
            cached = Probe(**json.loads(cache.read_text()))
            if cached.cache_key == f"{version}|{kernel}" and (
                not platform_override or cached.platform == platform_override
            ):
                return cached
        except (TypeError, ValueError):
            pass

    help_text = _flags_help(runsc)
    plat = platform_override or ("systrap" if "systrap" in help_text else "ptrace")
    overlay = "--overlay2=root:memory" if "-overlay2" in help_text else "--overlay"
    base_flags = [f"--platform={plat}", overlay]

    ok, out = _probe_container(runsc, [*base_flags, "--network=none"], ["/bin/ls", "/"], None, None)
    if not ok and "Invalid argument" not in out:
        raise HostNotReady(
            f"runsc cannot start a container here: {out.strip()[-300:]}",
            "run `vivarium doctor` for details",
        )
    statx_shim = not ok

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

    probe = Probe(version, kernel, plat, overlay, netns_workaround, statx_shim, setuid_blocked)
    state_dir.mkdir(parents=True, exist_ok=True)
    cache.write_text(json.dumps(asdict(probe), indent=1))
    return probe

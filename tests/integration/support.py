"""Helpers for integration tests: real `vivarium serve` processes, real runsc sandboxes.

Each server instance gets its own state directory, slot prefix, slot range and API port, so the
suite can run beside a developer's `make run`. The base template is shared (built by `make`).
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from vivarium.node.client import NodeClient
from vivarium.runtime import disk
from vivarium.runtime.cgroups import thread_ids

REPO = Path(__file__).resolve().parents[2]
VIVARIUM = str(Path(sys.executable).parent / "vivarium")
# The template `make test` built: in the state directory make used.
TEMPLATE_DIR = os.environ.get(
    "VIVARIUM_TEMPLATE_DIR",
    os.path.join(os.environ.get("VIVARIUM_STATE_DIR", "/var/lib/vivarium"), "templates"),
)

# A "host on the internet" for egress tests: its own netns on this machine, reached through the
# root namespace like any outside address. ALLOWED is listed in VIVARIUM_EGRESS_ALLOW; OTHER is
# a private address that is not, so it must stay unreachable.
INET_NS = "vt-inet"
INET_HOST_IF = "vt-inet0"
INET_GATEWAY = "10.239.0.1"
INET_ALLOWED = "10.239.0.2"
INET_OTHER = "10.239.0.3"
INET_PORT = 8080


@dataclass
class Server:
    name: str
    env: dict[str, str]
    state_dir: Path
    proc: subprocess.Popen[bytes] | None = None

    @property
    def socket(self) -> Path:
        return self.state_dir / "node.sock"

    def start(self, timeout: float = 180.0) -> None:
        log = (self.state_dir / "serve.log").open("ab")
        # A start that hangs is aborted below: the stacks then say where it was.
        self.proc = subprocess.Popen(
            [VIVARIUM, "serve"], env={**self.env, "PYTHONFAULTHANDLER": "1"}, stdout=log,
            stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
        )  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server {self.name} exited:\n{self.log_tail()}")
            try:
                with NodeClient(self.socket, timeout=2) as client:
                    client.info()
                return
            except Exception:
                time.sleep(0.1)
        # Not left running behind the failure, holding its state and ports; SIGABRT makes
        # faulthandler write every thread's stack to the log first.
        self.proc.send_signal(signal.SIGABRT)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(30)
        self.proc = None
        raise RuntimeError(f"server {self.name} did not start in {timeout:g}s:\n"
                           f"{self.log_tail(80)}")  # fmt: skip

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 120.0) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        self.proc = None
        # Volumes stay mounted when a server stops (the next start finds them): a test server
        # lets go of its own, as a host restart would, so test runs leave no loop devices.
        for point in disk.mounts_under(self.state_dir / "volumes"):
            subprocess.run(["umount", "--lazy", str(point)], check=False)
        return code

    def log_tail(self, lines: int = 30) -> str:
        path = self.state_dir / "serve.log"
        return "\n".join(path.read_text().splitlines()[-lines:]) if path.exists() else ""

    def client(self) -> NodeClient:
        return NodeClient(self.socket)

    def cli(self, *args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        # PYTHONFAULTHANDLER: a CLI that hangs is stopped with SIGABRT, which makes it print
        # where it was.
        env = {**self.env, "PYTHONFAULTHANDLER": "1"}
        proc = subprocess.Popen([VIVARIUM, *args], env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)  # fmt: skip
        try:
            out, err = proc.communicate(timeout=300)
        except subprocess.TimeoutExpired:
            proc.send_signal(signal.SIGABRT)
            out, err = proc.communicate()
            raise AssertionError(
                f"`vivarium {' '.join(args)}` did not finish within 300 s; its stderr:\n{err}\n"
                f"the server's log ends:\n{self.log_tail(80)}"
            ) from None
        done = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        if check:
            done.check_returncode()
        return done


STATE_DIRS: list[Path] = []  # every test server's, removed when the session ends


def make_server(name: str, prefix: str, cidr: str, api_port: int, **extra: str) -> Server:
    state_dir = Path(tempfile.mkdtemp(prefix=f"vivarium-{name}-"))
    STATE_DIRS.append(state_dir)
    # What `make test` found when it probed runsc on this host (cached per runsc version and
    # kernel, so valid here): probing again costs every test server seconds, minutes on a
    # loaded machine.
    probed = Path(TEMPLATE_DIR).parent / "probe.json"
    if probed.exists():
        shutil.copy(probed, state_dir / "probe.json")
    # Not the E2B_* variables another suite may have set for the official client: this
    # server's CLI talks to this server.
    inherited = {k: v for k, v in os.environ.items() if not k.startswith("E2B_")}
    env = {
        **inherited,
        "VIVARIUM_STATE_DIR": str(state_dir),
        "VIVARIUM_TEMPLATE_DIR": TEMPLATE_DIR,
        "VIVARIUM_SLOT_PREFIX": prefix,
        "VIVARIUM_SLOT_CIDR": cidr,
        "VIVARIUM_API_PORT": str(api_port),
        "VIVARIUM_PROXY_PORT": str(api_port + 1000),
        "VIVARIUM_WARM_POOL": "",  # off unless a test asks: its restores would load the suite
        # Sandboxes' DNS stays on this machine: answered by the fake internet's server where a
        # test brings it (`internet`), else refused here at once.
        "VIVARIUM_EGRESS_DNS": "127.0.0.1",
        **{f"VIVARIUM_{k.upper()}": v for k, v in extra.items()},
    }
    return Server(name, env, state_dir)


@contextlib.contextmanager
def running_server(
    name: str, prefix: str, cidr: str, api_port: int, env: dict[str, str] | None = None,
    **extra: str,
) -> Iterator[Server]:  # fmt: skip
    """A started `vivarium serve` of its own (see make_server), stopped afterwards."""
    if os.geteuid() != 0:
        pytest.fail("real sandboxes need root (`make test`)")
    srv = make_server(name, prefix, cidr, api_port, **extra)
    srv.env.update(env or {})
    srv.start()
    try:
        yield srv
    finally:
        if srv.proc is not None:  # a test may have stopped it
            srv.stop()


@contextlib.contextmanager
def outside_host(
    ns: str, host_if: str, gateway: str, addresses: list[str], prefix_len: int,
    *servers: list[str],
) -> Iterator[None]:  # fmt: skip
    """A host "on the internet": its own network namespace behind a veth from the root one
    (`gateway` on our side, `addresses` on its side), running each of `servers` there."""
    subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    subprocess.run(["ip", "link", "del", host_if], capture_output=True)
    cmds = [
        ["ip", "netns", "add", ns],
        ["ip", "link", "add", host_if, "type", "veth", "peer", "name", "eth0", "netns", ns],
        ["ip", "addr", "add", f"{gateway}/{prefix_len}", "dev", host_if],
        ["ip", "link", "set", host_if, "up"],
        *[["ip", "-n", ns, "addr", "add", f"{a}/{prefix_len}", "dev", "eth0"] for a in addresses],
        ["ip", "-n", ns, "link", "set", "eth0", "up"],
        ["ip", "-n", ns, "link", "set", "lo", "up"],
    ]
    for cmd in cmds:
        subprocess.run(cmd, check=True, capture_output=True)
    running = [subprocess.Popen(["ip", "netns", "exec", ns, *argv], stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL) for argv in servers]  # fmt: skip
    try:
        yield
    finally:
        for proc in running:
            proc.terminate()
            proc.wait(10)
        subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", host_if], capture_output=True)


def sdk_options(srv: Server) -> dict[str, Any]:
    """Where the official client finds this server: its key, API and proxy. Requests may take
    longer than the client's default minute: that catches a hang, this tests no speed."""
    return {"api_key": (srv.state_dir / "admin.key").read_text().strip(),
            "api_url": f"http://127.0.0.1:{srv.env['VIVARIUM_API_PORT']}",
            "sandbox_url": f"http://127.0.0.1:{srv.env['VIVARIUM_PROXY_PORT']}",
            "request_timeout": 300}  # fmt: skip


def server_logs_since(started: float, lines: int = 60) -> list[tuple[str, str]]:
    """The end of every test server's log written since `started` (a time.time()): what a
    failed test's report shows, since the state directories are gone after the session."""
    tails = []
    for state_dir in STATE_DIRS:
        path = state_dir / "serve.log"
        with contextlib.suppress(OSError):
            if path.stat().st_mtime >= started:
                text = path.read_text(errors="replace").splitlines()[-lines:]
                tails.append((state_dir.name, "\n".join(text)))
    return tails


def remove_state_dirs() -> None:
    """What the session's servers left (GBs of template builds, disks and snapshots): their
    containers deleted, their mounts let go, their files removed. VIVARIUM_TEST_KEEP_STATE=1
    keeps them, to look into after a run."""
    if os.environ.get("VIVARIUM_TEST_KEEP_STATE"):
        return
    while STATE_DIRS:
        state_dir = STATE_DIRS.pop()
        for cid in containers(state_dir):
            subprocess.run(["runsc", "--root", str(state_dir / "runsc"), "delete", "--force",
                            cid], capture_output=True)  # fmt: skip
        disk.discard(state_dir)


def netns_names(prefix: str) -> set[str]:
    out = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    return {line.split()[0] for line in out.splitlines() if line.startswith(f"{prefix}-")}


def host_links(prefix: str) -> set[str]:
    out = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    names = {line.split(":")[1].strip().split("@")[0] for line in out.splitlines()}
    return {n for n in names if n.startswith(f"{prefix}h-")}


def containers(state_dir: Path, running: bool = False) -> list[str]:
    """The server's runsc containers (only those running, with `running`)."""
    root = str(state_dir / "runsc")
    if not running:
        out = subprocess.run(["runsc", "--root", root, "list", "-quiet"],
                             capture_output=True, text=True).stdout  # fmt: skip
        return out.split()
    listed = subprocess.run(["runsc", "--root", root, "list", "--format=json"],
                            capture_output=True, text=True).stdout  # fmt: skip
    return [c["id"] for c in json.loads(listed or "[]") or [] if c.get("status") == "running"]


IDLE_SLACK_NS = 20_000_000  # VIVARIUM_IDLE_TIMER_SLACK_MS's default


def timer_slacks(container_id: str) -> set[int]:
    """The timer slacks (ns) of a sandbox's host threads (node/idle_timers.py)."""
    tids = thread_ids(container_id)
    assert tids, f"no cgroup for container {container_id}"
    slacks = set()
    for tid in tids:
        with contextlib.suppress(OSError):  # exited meanwhile
            slacks.add(int(Path(f"/proc/{tid}/timerslack_ns").read_text()))
    return slacks


def slacks_seen_during(
    container_ids: list[str], action: Callable[[], object]
) -> dict[str, list[set[int]]]:
    """The timer slacks of sandboxes' host threads, read every 10 ms while `action` runs: a
    sandbox is precise only for a second after a request (node/idle_timers.py), and a loaded
    host may take longer than that to answer it."""
    seen: dict[str, list[set[int]]] = {c: [] for c in container_ids}
    done = threading.Event()

    def watch() -> None:
        while not done.is_set():
            for container_id, slacks in seen.items():
                with contextlib.suppress(AssertionError):  # its container gone meanwhile
                    slacks.append(timer_slacks(container_id))
            time.sleep(0.01)

    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        action()
        time.sleep(0.3)  # the node keeps it precise for a second after: seen on a slow host too
    finally:
        done.set()
        watcher.join()
    return seen


def sh(client: NodeClient, sandbox_id: str, script: str, user: str = "root",
       timeout: float = 60) -> dict[str, Any]:  # fmt: skip
    return client.exec(sandbox_id, ["/bin/sh", "-c", script], user=user, timeout=timeout)


def http_code(client: NodeClient, sandbox_id: str, url: str) -> str:
    """HTTP status a sandbox gets for `url`, or "000" when it cannot connect."""
    result = sh(client, sandbox_id, f"curl -s -m 3 -o /dev/null -w '%{{http_code}}' {url}")
    return str(result["stdout"]).strip()

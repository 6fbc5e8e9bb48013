"""A cluster on one machine: each "host" is a network namespace the test makes, joined to the
others and to the root namespace by a bridge (the backbone, 10.240.0.0/24; the root namespace
is 10.240.0.1 on it). Nodes, API replicas and the proxy run there as `vivarium serve --role`
processes, each entered with `nsenter --net` only (`ip netns exec` would remount /sys and hide
the cgroup file system from runsc). PostgreSQL runs in the root namespace on a Unix socket,
which every namespace reaches through the file system."""

from __future__ import annotations

import contextlib
import secrets
import signal
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

from tests.integration.support import TEMPLATE_DIR, VIVARIUM, make_server
from vivarium.templates.recipe import RECIPES

BRIDGE = "vcbr0"
BACKBONE = "10.240.0"
GATEWAY = f"{BACKBONE}.1"
API_PORT = 3000
PROXY_PORT = 3001
SECRET = secrets.token_hex(32)


def _run(*argv: str) -> None:
    subprocess.run(argv, check=True, capture_output=True)


@contextlib.contextmanager
def backbone() -> Iterator[None]:
    _teardown_backbone()
    _run("ip", "link", "add", BRIDGE, "type", "bridge")
    _run("ip", "addr", "add", f"{GATEWAY}/24", "dev", BRIDGE)
    _run("ip", "link", "set", BRIDGE, "up")
    try:
        yield
    finally:
        _teardown_backbone()


def _teardown_backbone() -> None:
    for ns in subprocess.run(["ip", "netns", "list"], capture_output=True,
                             text=True).stdout.split():  # fmt: skip
        if ns.startswith("vcl-"):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
    subprocess.run(["ip", "link", "del", BRIDGE], capture_output=True)


@dataclass
class Host:
    """A network namespace on the backbone at `address`."""

    name: str
    address: str

    @property
    def netns(self) -> str:
        return f"vcl-{self.name}"

    def create(self) -> None:
        veth = f"vc{self.name}0"
        subprocess.run(["ip", "link", "del", veth], capture_output=True)
        subprocess.run(["ip", "netns", "del", self.netns], capture_output=True)
        _run("ip", "netns", "add", self.netns)
        _run("ip", "link", "add", veth, "type", "veth", "peer", "name", "eth0", "netns",
             self.netns)  # fmt: skip
        _run("ip", "link", "set", veth, "master", BRIDGE, "up")
        _run("ip", "-n", self.netns, "addr", "add", f"{self.address}/24", "dev", "eth0")
        _run("ip", "-n", self.netns, "link", "set", "eth0", "up")
        _run("ip", "-n", self.netns, "link", "set", "lo", "up")
        _run("ip", "-n", self.netns, "route", "add", "default", "via", GATEWAY)

    def cut(self) -> None:
        """The host disappears from the network (its processes live on, unreachable)."""
        _run("ip", "link", "set", f"vc{self.name}0", "down")


@dataclass
class Part:
    """One `vivarium serve --role` process on a host."""

    role: str
    host: Host
    env: dict[str, str]
    state_dir: Path
    proc: subprocess.Popen[bytes] | None = None
    _started_at: int = 0

    @property
    def api_url(self) -> str:
        return f"http://{self.host.address}:{API_PORT}"

    @property
    def proxy_url(self) -> str:
        return f"http://{self.host.address}:{PROXY_PORT}"

    def start(self, timeout: float = 180.0) -> None:
        log = (self.state_dir / "serve.log").open("ab")
        self._started_at = log.tell()  # a restart: only what it logs counts
        argv = ["nsenter", f"--net=/run/netns/{self.host.netns}", VIVARIUM, "serve", "--role",
                self.role]  # fmt: skip
        self.proc = subprocess.Popen(argv, env={**self.env, "PYTHONFAULTHANDLER": "1"},
                                     stdout=log, stderr=subprocess.STDOUT,
                                     stdin=subprocess.DEVNULL)  # fmt: skip
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.role} on {self.host.name} exited:\n{self.log_tail()}")
            if self.ready():
                return
            time.sleep(0.2)
        self.kill()
        raise RuntimeError(f"{self.role} on {self.host.name} did not start:\n{self.log_tail()}")

    def ready(self) -> bool:
        with (self.state_dir / "serve.log").open("rb") as log:
            log.seek(self._started_at)
            return b"vivarium ready" in log.read()

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.proc is None:
            return
        self.proc.send_signal(sig)
        try:
            self.proc.wait(120)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        self.stop(signal.SIGKILL)

    def log_tail(self, lines: int = 40) -> str:
        path = self.state_dir / "serve.log"
        return (
            "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
            if path.exists()
            else ""
        )


def cluster_env(db_url: str, **extra: str) -> dict[str, str]:
    return {
        "VIVARIUM_DATABASE_URL": db_url,
        "VIVARIUM_CLUSTER_SECRET": SECRET,
        "VIVARIUM_API_HOST": "0.0.0.0",
        "VIVARIUM_PROXY_HOST": "0.0.0.0",
        "VIVARIUM_API_PORT": str(API_PORT),
        "VIVARIUM_PROXY_PORT": str(PROXY_PORT),
        **{f"VIVARIUM_{k.upper()}": v for k, v in extra.items()},
    }


def node_part(host: Host, index: int, db_url: str, **extra: str) -> Part:
    """A node agent: its own state directory, slot prefix and range (named network
    namespaces and cgroups are the machine's, shared by every host here)."""
    base = make_server(f"cluster-{host.name}", f"vc{index}", f"10.{226 + index}.0.0/24",
                       API_PORT)  # fmt: skip
    own = {"node_id": host.name, "node_url": f"http://{host.address}:{API_PORT}",
           "node_proxy_url": f"http://{host.address}:{PROXY_PORT}",
           "template_dir": str(own_templates(base.state_dir))}  # fmt: skip
    env = {**base.env, **cluster_env(db_url, **{**own, **extra})}
    return Part("node", host, env, base.state_dir)


def own_templates(state_dir: Path) -> Path:
    """A node's template directory, as on a host of its own: the built-in templates `make`
    built (linked, not copied), and whatever team templates it builds or fetches."""
    built = Path(TEMPLATE_DIR)
    own = state_dir / "templates"
    own.mkdir(exist_ok=True)
    for name in RECIPES:
        if (built / name).is_dir():
            (own / name).symlink_to(built / name)
    return own


def front_part(role: str, host: Host, db_url: str, **extra: str) -> Part:
    """An API replica or the proxy: no sandboxes, no state but a log."""
    base = make_server(f"cluster-{role}-{host.name}", "vcx", "10.240.128.0/28", API_PORT)
    env = {**{k: v for k, v in base.env.items() if not k.startswith("VIVARIUM_")},
           "VIVARIUM_STATE_DIR": str(base.state_dir), **cluster_env(db_url, **extra)}  # fmt: skip
    if role == "proxy":  # it needs none, so it gets none
        del env["VIVARIUM_CLUSTER_SECRET"]
    return Part(role, host, env, base.state_dir)


def wait_nodes_ready(api_url: str, key: str, count: int, timeout: float = 60.0) -> list[Any]:
    """The cluster's nodes once `count` are ready (GET /nodes through an API replica)."""
    deadline = time.monotonic() + timeout
    rows: list[Any] = []
    while time.monotonic() < deadline:
        rows = httpx.get(f"{api_url}/nodes", headers={"X-API-Key": key}, timeout=10).json()
        if isinstance(rows, list) and sum(r.get("status") == "ready" for r in rows) >= count:
            return rows
        time.sleep(0.5)
    raise AssertionError(f"{count} nodes were not ready in {timeout:g}s: {rows}")


def admin_key(node: Part) -> str:
    """The first key, saved by whichever node made the first team (None if not this one)."""
    path = node.state_dir / "admin.key"
    return path.read_text().strip() if path.exists() else ""


def node_certificate(directory: Path, address: str) -> tuple[Path, Path, Path]:
    """(CA certificate, node certificate, its key): a CA of the test's own, and a certificate
    it signed for `address` (an IP address SAN, as nodes are reached by address)."""
    ca_key, ca, key, csr, cert = (directory / n for n in ("ca.key", "ca.crt", "node.key",
                                                          "node.csr", "node.crt"))  # fmt: skip
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    _run("openssl", "req", "-x509", *ec, "-days", "2", "-subj", "/CN=vivarium test cluster CA",
         "-keyout", str(ca_key), "-out", str(ca))  # fmt: skip
    _run("openssl", "req", "-new", *ec, "-subj", f"/CN={address}", "-keyout", str(key),
         "-out", str(csr))  # fmt: skip
    extensions = directory / "san.ext"
    extensions.write_text(f"subjectAltName=IP:{address}\n")
    _run("openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key),
         "-CAcreateserial", "-days", "2", "-extfile", str(extensions),
         "-out", str(cert))  # fmt: skip
    return ca, cert, key

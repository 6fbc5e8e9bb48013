"""Egress policy with real network namespaces. Traffic goes only to this machine's own addresses:
slot addresses, the host's slot-side addresses and the test "internet" host in its own netns."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from tests.integration.support import (
    INET_GATEWAY,
    INET_OTHER,
    INET_PORT,
    Server,
    http_code,
    sh,
)
from vivarium.node.client import NodeClient


class _Ok(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"host service\n")

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture()
def host_service() -> Iterator[int]:
    """A service on the host listening on every interface, as careless daemons do."""
    httpd = ThreadingHTTPServer(("0.0.0.0", 0), _Ok)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield httpd.server_address[1]
    finally:
        httpd.shutdown()
        httpd.server_close()


def _host_ip(client: NodeClient, sandbox_id: str) -> str:
    """The host's address on this sandbox's slot (slot address - 1)."""
    address = client.get(sandbox_id)["slot_address"]
    head, last = address.rsplit(".", 1)
    return f"{head}.{int(last) - 1}"


def test_egress_follows_allow_internet_access(
    client: NodeClient, sandbox: Callable[..., str], inet_host: str
) -> None:
    online = sandbox(allow_internet_access=True)
    offline = sandbox(allow_internet_access=False)
    assert http_code(client, online, f"http://{inet_host}:{INET_PORT}/") == "200"
    assert http_code(client, offline, f"http://{inet_host}:{INET_PORT}/") == "000"
    # A private address that the operator did not allow stays blocked even with internet on.
    assert http_code(client, online, f"http://{INET_OTHER}:{INET_PORT}/") == "000"


def test_sandbox_cannot_reach_host_services(
    server: Server, client: NodeClient, sandbox: Callable[..., str], host_service: int
) -> None:
    online = sandbox(allow_internet_access=True)
    host_ip = _host_ip(client, online)
    # The service and the API answer on the host itself...
    assert httpx.get(f"http://{host_ip}:{host_service}/", timeout=5).status_code == 200
    api_port = int(server.env["VIVARIUM_API_PORT"])
    assert httpx.get(f"http://{host_ip}:{api_port}/health", timeout=5).status_code == 200
    # ...but not from inside a sandbox, on any host address.
    for address in (host_ip, INET_GATEWAY):
        assert http_code(client, online, f"http://{address}:{host_service}/") == "000"
        assert http_code(client, online, f"http://{address}:{api_port}/health") == "000"


def test_sandboxes_cannot_reach_each_other(client: NodeClient, sandbox: Callable[..., str]) -> None:
    a = sandbox(allow_internet_access=True)
    b = sandbox(allow_internet_access=True)
    started = sh(client, b, "nohup python3 -m http.server 8000 --bind 0.0.0.0 "
                            ">/dev/null 2>&1 & sleep 1")  # fmt: skip
    assert started["exit_code"] == 0
    b_address = client.get(b)["slot_address"]
    # The host reaches B's server through the slot address (as the proxy will)...
    assert _wait_http(f"http://{b_address}:8000/") == 200
    # ...sandbox A does not.
    assert http_code(client, a, f"http://{b_address}:8000/") == "000"


def test_sandbox_sees_fixed_internal_address(
    client: NodeClient, sandbox: Callable[..., str]
) -> None:
    sandbox_id = sandbox()
    route = sh(client, sandbox_id, "ip -4 addr show eth0; ip route")
    assert "169.254.0.21/30" in route["stdout"]
    assert "default via 169.254.0.22" in route["stdout"]


def _wait_http(url: str, attempts: int = 30) -> int:
    for _ in range(attempts):
        try:
            return httpx.get(url, timeout=2).status_code
        except (OSError, httpx.TransportError):
            import time

            time.sleep(0.2)
    return 0


def test_the_cli_creates_a_sandbox_with_egress_rules(
    server: Server, client: NodeClient, inet_host: str
) -> None:
    created = server.cli("sandbox", "create", "--no-internet", "--allow-out", inet_host)
    assert created.returncode == 0, created.stderr
    sandbox_id = created.stdout.strip().splitlines()[-1]
    try:
        network = json.loads(server.cli("sandbox", "info", sandbox_id).stdout)["network"]
        assert network["allowOut"] == [f"{inet_host}/32"] and network["denyOut"] == ["0.0.0.0/0"]
        assert http_code(client, sandbox_id, f"http://{inet_host}:{INET_PORT}/") == "200"
        bad = server.cli("sandbox", "create", "--deny-out", "example.com")
        assert bad.returncode != 0 and "network.denyOut" in bad.stderr
    finally:
        server.cli("sandbox", "kill", sandbox_id)

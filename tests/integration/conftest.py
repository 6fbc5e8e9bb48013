"""Integration fixtures: a shared server with an "internet" test host, and sandbox factories."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.integration.support import (
    INET_ALLOWED,
    INET_GATEWAY,
    INET_HOST_IF,
    INET_NS,
    INET_OTHER,
    INET_PORT,
    REPO,
    TEMPLATE_DIR,
    Server,
    make_server,
    outside_host,
)
from vivarium.node.client import NodeClient


@pytest.fixture(scope="session", autouse=True)
def _preconditions() -> None:
    if os.geteuid() != 0:
        pytest.fail("integration tests run real sandboxes and need root (use `make test`)")
    if not (Path(TEMPLATE_DIR) / "base" / "current").exists():
        pytest.fail(f"no base template in {TEMPLATE_DIR}: run `make test`, which builds it")


@pytest.fixture(scope="session")
def inet_host() -> Iterator[str]:
    """A web server in its own namespace, standing in for a host on the internet."""
    web = [sys.executable, "-m", "http.server", str(INET_PORT), "--bind", "0.0.0.0",
           "--directory", str(REPO / "tests")]  # fmt: skip
    with outside_host(INET_NS, INET_HOST_IF, INET_GATEWAY, [INET_ALLOWED, INET_OTHER], 29, web):
        url = f"http://{INET_ALLOWED}:{INET_PORT}/"
        deadline = time.monotonic() + 30
        while subprocess.run(
            ["ip", "netns", "exec", INET_NS, "curl", "-s", "-o", "/dev/null", url]
        ).returncode:
            assert time.monotonic() < deadline, f"the test internet host never answered at {url}"
            time.sleep(0.1)
        yield INET_ALLOWED


@pytest.fixture(scope="session")
def server(inet_host: str) -> Iterator[Server]:
    srv = make_server(
        "main", "vt", "10.232.0.0/20", 3100, api_host="0.0.0.0", max_sandboxes="40",
        slot_prewarm="6", egress_allow=f"{INET_ALLOWED}/32",
    )  # fmt: skip
    srv.start()
    try:
        yield srv
    finally:
        with srv.client() as client:
            for record in client.list_sandboxes():
                client.kill(record["sandbox_id"])
        srv.stop()


@pytest.fixture()
def client(server: Server) -> Iterator[NodeClient]:
    with server.client() as c:
        yield c


@pytest.fixture()
def sandbox(client: NodeClient) -> Iterator[Callable[..., str]]:
    """Factory: create a sandbox (killed after the test) and return its id."""
    created: list[str] = []

    def make(**fields: Any) -> str:
        record = client.create(**fields)
        created.append(record["sandbox_id"])
        return str(record["sandbox_id"])

    yield make
    alive = {r["sandbox_id"] for r in client.list_sandboxes()}
    for sandbox_id in created:
        if sandbox_id in alive:
            client.kill(sandbox_id)

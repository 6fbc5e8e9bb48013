"""A server of its own for the pause tests (they restart it)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.integration.support import Server, make_server

API_PORT = 3112  # proxy on API_PORT + 1000


@pytest.fixture(scope="session")
def server() -> Iterator[Server]:
    if os.geteuid() != 0:
        pytest.fail("needs root (`make test`)")
    srv = make_server("pause", "vq", "10.241.0.0/24", API_PORT)
    srv.start()
    try:
        yield srv
    finally:
        if srv.proc is not None:
            srv.stop()


def opts(srv: Server) -> dict[str, str]:
    """Where the official client finds this server."""
    return {"api_key": (srv.state_dir / "admin.key").read_text().strip(),
            "api_url": f"http://127.0.0.1:{API_PORT}",
            "sandbox_url": f"http://127.0.0.1:{API_PORT + 1000}"}  # fmt: skip

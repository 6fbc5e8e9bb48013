"""A server of its own for the pause tests (they restart it)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.support import Server, running_server, sdk_options

API_PORT = 3112  # proxy on API_PORT + 1000


@pytest.fixture(scope="session")
def server() -> Iterator[Server]:
    with running_server("pause", "vq", "10.241.0.0/24", API_PORT) as srv:
        yield srv


opts = sdk_options  # where the official client finds the server

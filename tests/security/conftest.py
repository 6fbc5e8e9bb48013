"""One server for the security suite's probes of the API, the node socket and the state."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.integration.support import Server, running_server

API_PORT = 3122  # proxy on API_PORT + 1000; 3123-3125 for servers of single tests


@pytest.fixture(scope="package")
def server() -> Iterator[Server]:
    with running_server("security", "vy", "10.248.0.0/24", API_PORT) as srv:
        yield srv

"""The whole server on PostgreSQL (`VIVARIUM_DATABASE_URL`): the official client creates, lists
and kills sandboxes, and the catalog survives a server restart (running sandboxes adopted)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from e2b import NotFoundException, Sandbox, SandboxQuery

from tests.integration.support import Server, running_server, sdk_options
from tests.postgres import postgres_server

pytestmark = pytest.mark.timeout(600)
API_PORT = 3111


@pytest.fixture(scope="module")
def pg_server() -> Iterator[Server]:
    with postgres_server() as url, running_server("pg", "vp", "10.238.0.0/24", API_PORT,
                                                  database_url=url) as srv:  # fmt: skip
        yield srv


def test_sdk_against_a_postgresql_catalog(pg_server: Server) -> None:
    opts = sdk_options(pg_server)
    sbx = Sandbox.create(metadata={"db": "postgresql"}, timeout=120, **opts)  # type: ignore[arg-type]
    assert sbx.commands.run("echo pg").stdout == "pg\n"
    listed = Sandbox.list(query=SandboxQuery(metadata={"db": "postgresql"}), **opts).next_items()  # type: ignore[arg-type]
    assert [s.sandbox_id for s in listed] == [sbx.sandbox_id]

    pg_server.stop()  # the sandbox keeps running; the next start adopts it
    pg_server.start()
    info = Sandbox.get_info(sbx.sandbox_id, **opts)  # type: ignore[arg-type]
    assert info.metadata == {"db": "postgresql"}
    again = Sandbox.connect(sbx.sandbox_id, **opts)  # type: ignore[arg-type]
    assert again.commands.run("echo still here").stdout == "still here\n"
    assert Sandbox.kill(sbx.sandbox_id, **opts)  # type: ignore[arg-type]
    with pytest.raises(NotFoundException):
        Sandbox.get_info(sbx.sandbox_id, **opts)  # type: ignore[arg-type]

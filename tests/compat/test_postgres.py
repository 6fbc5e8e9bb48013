"""The whole server on PostgreSQL (`VIVARIUM_DATABASE_URL`): the official client creates, lists
and kills sandboxes, and the catalog survives a server restart (running sandboxes adopted)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from e2b import NotFoundException, Sandbox, SandboxQuery

from tests.integration.support import Server, make_server
from tests.postgres import postgres_server

pytestmark = pytest.mark.timeout(300)
API_PORT = 3111


@pytest.fixture(scope="module")
def pg_server() -> Iterator[Server]:
    if os.geteuid() != 0:
        pytest.fail("needs root (`make test`)")
    with postgres_server() as url:
        srv = make_server("pg", "vp", "10.238.0.0/24", API_PORT, database_url=url)
        srv.start()
        try:
            yield srv
        finally:
            if srv.proc is not None:
                srv.stop()


def test_sdk_against_a_postgresql_catalog(pg_server: Server) -> None:
    key = (pg_server.state_dir / "admin.key").read_text().strip()
    opts = {"api_key": key, "api_url": f"http://127.0.0.1:{API_PORT}",
            "sandbox_url": f"http://127.0.0.1:{API_PORT + 1000}"}  # fmt: skip
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

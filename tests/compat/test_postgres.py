"""The whole server on PostgreSQL (`VIVARIUM_DATABASE_URL`): the official client creates, lists
and kills sandboxes, and the catalog survives a server restart (running sandboxes adopted)."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest
from e2b import NotFoundException, Sandbox, SandboxQuery

from tests.integration.support import Server, running_server, sdk_options
from tests.postgres import Postgres, postgres

pytestmark = pytest.mark.timeout(600)
API_PORT = 3111


@pytest.fixture(scope="module")
def pg() -> Iterator[Postgres]:
    with postgres() as pg:
        yield pg


@pytest.fixture(scope="module")
def pg_server(pg: Postgres) -> Iterator[Server]:
    with running_server("pg", "vp", "10.238.0.0/24", API_PORT, database_url=pg.url) as srv:
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


def test_the_catalog_down_for_10_s_fails_creates_clearly_and_loses_nothing(
    pg_server: Server, pg: Postgres
) -> None:
    opts = sdk_options(pg_server)
    sbx = Sandbox.create(metadata={"outage": "before"}, timeout=300, **opts)  # type: ignore[arg-type]
    sbx.files.write("/home/user/kept.txt", "kept")
    pg.stop()
    try:
        down_since = time.monotonic()
        response = httpx.post(f"{opts['api_url']}/sandboxes", json={"templateID": "base"},
                              headers={"X-API-Key": opts["api_key"]}, timeout=60)  # fmt: skip
        assert response.status_code == 503, response.text
        assert response.json()["code"] == 503 and "catalog" in response.json()["message"]
        with pytest.raises(Exception, match="catalog"):
            Sandbox.create(timeout=60, **opts)  # type: ignore[arg-type]
        # The running sandbox does not need the catalog: envd through the proxy answers.
        assert sbx.commands.run("cat /home/user/kept.txt").stdout == "kept"
        time.sleep(max(0.0, 10 - (time.monotonic() - down_since)))
    finally:
        pg.start()
    # Back by itself: no restart of the server.
    again = Sandbox.create(timeout=60, **opts)  # type: ignore[arg-type]
    listed = {s.sandbox_id for s in Sandbox.list(**opts).next_items()}  # type: ignore[arg-type]
    assert {sbx.sandbox_id, again.sandbox_id} <= listed
    assert Sandbox.get_info(sbx.sandbox_id, **opts).metadata == {"outage": "before"}  # type: ignore[arg-type]
    assert sbx.commands.run("cat /home/user/kept.txt").stdout == "kept"
    for each in (again, sbx):
        each.kill()

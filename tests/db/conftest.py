"""The catalog's tests run against SQLite and against a real PostgreSQL server."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator

import pytest

from tests.postgres import postgres_server


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # async tests run through anyio's pytest plugin (comes with starlette)


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    with postgres_server() as url:
        yield url


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "sqlite":
        with tempfile.TemporaryDirectory() as tmp:
            yield f"sqlite:///{tmp}/vivarium.db"
    else:
        yield request.getfixturevalue("pg_url")

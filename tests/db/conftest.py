"""The catalog's tests run against SQLite and against a real PostgreSQL server."""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator, Iterator

import pytest
from sqlalchemy import MetaData
from sqlalchemy.ext.asyncio import AsyncEngine

from tests.postgres import postgres_server
from vivarium.api.db.engine import migrate, open_engine


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"  # async tests run through anyio's pytest plugin (comes with starlette)


@pytest.fixture(scope="session")
def pg_url() -> Iterator[str]:
    with postgres_server() as url:
        yield url


@pytest.fixture
async def engine(db_url: str) -> AsyncIterator[AsyncEngine]:
    engine = open_engine(db_url)
    async with engine.begin() as conn:  # PostgreSQL's database is shared by the tests
        existing = MetaData()
        await conn.run_sync(existing.reflect)
        await conn.run_sync(existing.drop_all)
    await migrate(engine)
    yield engine
    await engine.dispose()


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "sqlite":
        with tempfile.TemporaryDirectory() as tmp:
            yield f"sqlite:///{tmp}/vivarium.db"
    else:
        yield request.getfixturevalue("pg_url")

"""The catalog (schema, migrations, keys, the concurrency reservation) on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import time

import pytest
from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncEngine

from vivarium.api import keys, store
from vivarium.api.db.engine import async_url, migrate
from vivarium.api.db.schema import api_keys, metadata, sandboxes
from vivarium.errors import ConfigError

pytestmark = pytest.mark.anyio


def _sandbox(sandbox_id: str, team_id: str) -> dict[str, object]:
    now = time.time()
    return {"id": sandbox_id, "team_id": team_id, "template_id": "base", "build_id": "b",
            "node_id": "local", "state": "starting", "metadata": {"course": "py101"},
            "cpu_count": 1, "memory_mb": 1024, "disk_mb": 0, "auto_pause": False,
            "allow_internet": True, "secure": True, "envd_version": "0.6.13", "started_at": now,
            "end_at": now + 60, "created_at": now, "ended_at": None,
            "end_reason": None}  # fmt: skip


async def test_migrations_build_exactly_the_declared_schema(engine: AsyncEngine) -> None:
    await migrate(engine)  # idempotent: a second start changes nothing

    def diff(conn: object) -> list[object]:
        return list(compare_metadata(MigrationContext.configure(conn), metadata))  # type: ignore[arg-type]

    async with engine.connect() as conn:
        assert await conn.run_sync(diff) == []
        version = (await conn.execute(text("SELECT version_num FROM alembic_version"))).scalar()
    assert version == "0011"


async def test_keys_are_stored_hashed_and_resolve_their_team(engine: AsyncEngine) -> None:
    team = await store.create_team(engine, "school", 3)
    key, row = await store.create_key(engine, team["id"], "teacher")
    assert key.startswith("e2b_") and len(key) == 44
    assert (await store.team_for_key(engine, key) or {})["id"] == team["id"]
    assert await store.team_for_key(engine, key[:-1] + ("0" if key[-1] != "0" else "1")) is None
    async with engine.connect() as conn:
        stored = [dict(r) for r in (await conn.execute(select(api_keys))).mappings()]
    assert all(key not in str(value) for r in stored for value in r.values())
    assert stored[0]["key_hash"] == keys.key_hash(key) and row["prefix"] == key[:12]
    assert [k["name"] for k in await store.list_keys(engine, team["id"])] == ["teacher"]


async def test_two_keys_revoking_each_other_at_once_leave_the_team_one(engine: AsyncEngine) -> None:
    team = await store.create_team(engine, "pair", 3)
    other = await store.create_team(engine, "stranger", 3)
    _, a = await store.create_key(engine, team["id"], "a")
    _, b = await store.create_key(engine, team["id"], "b")
    _, theirs = await store.create_key(engine, other["id"], "theirs")
    assert await store.delete_key(engine, team["id"], theirs["id"]) is False  # not its key
    outcomes = await asyncio.gather(store.delete_key(engine, team["id"], a["id"]),
                                    store.delete_key(engine, team["id"], b["id"]))  # fmt: skip
    assert sorted(outcomes, key=str) == [None, True]  # one revoked, the last one kept
    assert len(await store.list_keys(engine, team["id"])) == 1
    assert len(await store.list_keys(engine, other["id"])) == 1


async def test_concurrent_reservations_never_exceed_the_team_limit(engine: AsyncEngine) -> None:
    team = await store.create_team(engine, "busy", 5)
    other = await store.create_team(engine, "other", 5)
    attempts = [store.reserve_sandboxes(engine, team, [_sandbox(f"s{i:02d}", team["id"])])
                for i in range(20)]  # fmt: skip
    results = await asyncio.gather(*attempts)
    assert results.count(True) == 5
    assert await store.reserve_sandboxes(engine, other, [_sandbox("o1", other["id"])])
    assert not await store.reserve_sandboxes(engine, team, [_sandbox("s98", team["id"])])
    first = (await store.team_sandboxes(engine, team["id"], store.LIVE))[0]["id"]
    await store.end_sandbox(engine, first, "killed")
    assert await store.reserve_sandboxes(engine, team, [_sandbox("s99", team["id"])])
    live = await store.team_sandboxes(engine, team["id"], store.LIVE)
    assert len(live) == 5 and first not in {r["id"] for r in live}
    killed = await store.get_sandbox(engine, first)
    assert killed is not None and killed["state"] == "killed" and killed["end_reason"] == "killed"
    assert killed["metadata"] == {"course": "py101"}


async def test_a_batch_reservation_is_all_or_nothing(engine: AsyncEngine) -> None:
    # A fork reserves all its children at once: over the limit, none is reserved.
    team = await store.create_team(engine, "forks", 4)
    await store.reserve_sandboxes(engine, team, [_sandbox("p1", team["id"])])
    assert not await store.reserve_sandboxes(
        engine, team, [_sandbox(f"c{i}", team["id"]) for i in range(4)]
    )
    assert len(await store.team_sandboxes(engine, team["id"], store.LIVE)) == 1
    assert await store.reserve_sandboxes(
        engine, team, [_sandbox(f"c{i}", team["id"]) for i in range(3)]
    )
    assert len(await store.team_sandboxes(engine, team["id"], store.LIVE)) == 4


async def test_team_snapshots_resolve_by_id_or_name_within_their_team(engine: AsyncEngine) -> None:
    team = await store.create_team(engine, "school", 4)
    other = await store.create_team(engine, "elsewhere", 4)
    row = {"id": "s1", "team_id": team["id"], "name": "lesson-1", "build_key": "s2",
           "sandbox_id": "i1",
           "template_id": "base", "node_id": "local", "size_bytes": 1,
           "created_at": 1.0}  # fmt: skip
    await store.save_team_snapshot(engine, row)
    await store.save_team_snapshot(engine, {**row, "size_bytes": 2})  # taken again: replaced
    for key in ("s1", "lesson-1"):
        found = await store.team_snapshot(engine, team["id"], key)
        assert found is not None and found["size_bytes"] == 2
        assert await store.team_snapshot(engine, other["id"], key) is None
    assert [r["id"] for r in await store.list_team_snapshots(engine, team["id"])] == ["s1"]
    assert await store.drop_team_snapshot(engine, "s1")
    assert not await store.drop_team_snapshot(engine, "s1")
    assert await store.team_snapshot(engine, team["id"], "lesson-1") is None


async def test_deleting_a_team_removes_its_keys_and_sandboxes(engine: AsyncEngine) -> None:
    team = await store.create_team(engine, "gone", 2)
    await store.create_key(engine, team["id"], "k")
    await store.reserve_sandboxes(engine, team, [_sandbox("g1", team["id"])])
    async with engine.begin() as conn:
        await conn.execute(text("DELETE FROM teams WHERE id = :id"), {"id": team["id"]})
        left = (await conn.execute(select(sandboxes.c.id))).all()
    assert left == []


def test_database_urls() -> None:
    assert async_url("sqlite:////var/lib/vivarium/vivarium.db").startswith("sqlite+aiosqlite:")
    assert async_url("postgresql://u:p@db/viv") == "postgresql+asyncpg://u:p@db/viv"
    with pytest.raises(ConfigError):
        async_url("mysql://u@db/viv")
    with pytest.raises(ConfigError):
        async_url("not a url")

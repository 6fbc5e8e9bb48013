"""Queries on the catalog. Every function takes the engine and returns plain rows (dicts)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Sequence
from typing import Any

from sqlalchemy import delete, func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from vivarium.api import keys
from vivarium.api.db.schema import (
    api_keys,
    sandbox_events,
    sandboxes,
    snapshots,
    team_snapshots,
    team_templates,
    teams,
    template_builds,
    template_tags,
    volumes,
)

Row = dict[str, Any]
LIVE = ("starting", "running")  # counted against a team's concurrency limit


def first_row(result: Any) -> Row | None:
    """The first row of a query result as a dict, or None."""
    row = result.mappings().first()
    return dict(row) if row is not None else None


# -- teams and keys ------------------------------------------------------------------------


async def team_count(engine: AsyncEngine) -> int:
    async with engine.connect() as conn:
        return int((await conn.execute(select(func.count()).select_from(teams))).scalar_one())


async def create_team(engine: AsyncEngine, name: str, max_sandboxes: int,
                      is_admin: bool = False) -> Row:  # fmt: skip
    row = {"id": str(uuid.uuid4()), "name": name, "max_sandboxes": max_sandboxes,
           "is_admin": is_admin, "created_at": time.time()}  # fmt: skip
    async with engine.begin() as conn:
        await conn.execute(insert(teams).values(**row))
    return row


async def get_team(engine: AsyncEngine, team_id: str) -> Row | None:
    async with engine.connect() as conn:
        return first_row(await conn.execute(select(teams).where(teams.c.id == team_id)))


async def team_by_name(engine: AsyncEngine, name: str) -> Row | None:
    async with engine.connect() as conn:
        return first_row(await conn.execute(select(teams).where(teams.c.name == name)))


async def create_key(engine: AsyncEngine, team_id: str, name: str) -> tuple[str, Row]:
    """A new key for the team: (the key, shown once; its stored row)."""
    key = keys.new_key()
    row = {"id": str(uuid.uuid4()), "team_id": team_id, "name": name,
           "prefix": keys.shown_prefix(key), "key_hash": keys.key_hash(key),
           "created_at": time.time(), "last_used_at": None}  # fmt: skip
    async with engine.begin() as conn:
        await conn.execute(insert(api_keys).values(**row))
    return key, row


async def list_keys(engine: AsyncEngine, team_id: str) -> list[Row]:
    query = select(api_keys).where(api_keys.c.team_id == team_id).order_by(api_keys.c.created_at)
    async with engine.connect() as conn:
        return [dict(r) for r in (await conn.execute(query)).mappings()]


async def delete_key(engine: AsyncEngine, team_id: str, key_id: str) -> bool | None:
    """Revoke one of the team's keys: False if it has no such key, None if it is the team's
    last (under the team's lock, so two keys revoking each other at once cannot both go)."""
    async with engine.begin() as conn:
        await conn.execute(select(teams.c.id).where(teams.c.id == team_id).with_for_update())
        count = select(func.count()).select_from(api_keys).where(api_keys.c.team_id == team_id)
        exists = select(api_keys.c.id).where(api_keys.c.team_id == team_id, api_keys.c.id == key_id)
        if (await conn.execute(exists)).first() is None:
            return False
        if int((await conn.execute(count)).scalar_one()) <= 1:
            return None
        await conn.execute(delete(api_keys).where(api_keys.c.id == key_id))
        return True


async def team_for_key(engine: AsyncEngine, key: str) -> Row | None:
    """The key's team, with `key_name` and `key_id` (who is calling, for events)."""
    query = (
        select(teams, api_keys.c.name.label("key_name"), api_keys.c.id.label("key_id"))
        .join(api_keys, api_keys.c.team_id == teams.c.id)
        .where(api_keys.c.key_hash == keys.key_hash(key))
    )
    async with engine.connect() as conn:
        return first_row(await conn.execute(query))


# -- sandboxes -----------------------------------------------------------------------------


KEY_TTL_S = 24 * 3600  # how long a create's Idempotency-Key stands for its sandbox


async def reserve_sandboxes(engine: AsyncEngine, team: Row, rows: list[Row]) -> Row | bool:
    """Insert `starting` rows, all or none: none (False) if the team would run more than its
    maximum. A row with an `idempotency_key` the team used in the last KEY_TTL_S is not
    inserted: the sandbox made with it is returned instead (decided under the team's lock, so
    two creates with one key make one sandbox)."""
    async with engine.begin() as conn:
        await _lock_team(conn, team)
        for key in {r["idempotency_key"] for r in rows if r.get("idempotency_key")}:
            query = select(sandboxes).where(
                sandboxes.c.team_id == team["id"], sandboxes.c.idempotency_key == key,
                sandboxes.c.created_at >= time.time() - KEY_TTL_S,
            )  # fmt: skip
            if (earlier := first_row(await conn.execute(query))) is not None:
                return earlier
        if not await _has_room(conn, team, len(rows)):
            return False
        for row in rows:
            await conn.execute(insert(sandboxes).values(**row))
    return True


async def _lock_team(conn: AsyncConnection, team: Row) -> None:
    """The team row, locked for the rest of the transaction (PostgreSQL): concurrent starts
    of one team are decided one after another."""
    await conn.execute(select(teams.c.id).where(teams.c.id == team["id"]).with_for_update())


async def _has_room(conn: AsyncConnection, team: Row, more: int = 1) -> bool:
    """Whether the team may start `more` sandboxes; the caller holds _lock_team."""
    return await _live_count(conn, team["id"]) + more <= int(team["max_sandboxes"])


async def _live_count(conn: AsyncConnection, team_id: str) -> int:
    query = (
        select(func.count())
        .select_from(sandboxes)
        .where(sandboxes.c.team_id == team_id, sandboxes.c.state.in_(LIVE))
    )
    return int((await conn.execute(query)).scalar_one())


async def get_sandbox(engine: AsyncEngine, sandbox_id: str) -> Row | None:
    async with engine.connect() as conn:
        return first_row(await conn.execute(select(sandboxes).where(sandboxes.c.id == sandbox_id)))


async def get_sandboxes(engine: AsyncEngine, sandbox_ids: Sequence[str]) -> dict[str, Row]:
    """The rows of those of `sandbox_ids` the catalog has, by id."""
    if not sandbox_ids:
        return {}
    query = select(sandboxes).where(sandboxes.c.id.in_(list(sandbox_ids)))
    async with engine.connect() as conn:
        return {r["id"]: dict(r) for r in (await conn.execute(query)).mappings()}


async def update_sandbox(engine: AsyncEngine, sandbox_id: str, **values: Any) -> None:
    async with engine.begin() as conn:
        await conn.execute(update(sandboxes).where(sandboxes.c.id == sandbox_id).values(**values))


async def end_sandbox(engine: AsyncEngine, sandbox_id: str, reason: str,
                      **also: Any) -> None:  # fmt: skip
    """Mark it killed (if it was not already): kept for logs, never listed. `also`: other
    columns to set with it."""
    async with engine.begin() as conn:
        await conn.execute(
            update(sandboxes)
            .where(sandboxes.c.id == sandbox_id, sandboxes.c.state != "killed")
            .values(state="killed", ended_at=time.time(), end_reason=reason, **also)
        )


async def team_sandboxes(engine: AsyncEngine, team_id: str, states: Sequence[str]) -> list[Row]:
    query = (
        select(sandboxes)
        .where(sandboxes.c.team_id == team_id, sandboxes.c.state.in_(list(states)))
        .order_by(sandboxes.c.started_at.desc(), sandboxes.c.id)
    )
    async with engine.connect() as conn:
        return [dict(r) for r in (await conn.execute(query)).mappings()]


async def node_sandboxes(engine: AsyncEngine, node_id: str, states: Sequence[str]) -> list[Row]:
    query = select(sandboxes).where(
        sandboxes.c.node_id == node_id, sandboxes.c.state.in_(list(states))
    )
    async with engine.connect() as conn:
        return [dict(r) for r in (await conn.execute(query)).mappings()]


# -- snapshots and state changes -------------------------------------------------------------


async def transition(engine: AsyncEngine, sandbox_id: str, from_states: Sequence[str],
                     to_state: str, **values: Any) -> bool:  # fmt: skip
    """Move a sandbox between states only if it is in one of `from_states` (compare-and-set:
    concurrent pause, kill and connect cannot both win)."""
    async with engine.begin() as conn:
        result = await conn.execute(
            update(sandboxes)
            .where(sandboxes.c.id == sandbox_id, sandboxes.c.state.in_(list(from_states)))
            .values(state=to_state, **values)
        )
    return bool(result.rowcount)


async def resume_reservation(engine: AsyncEngine, team: Row, sandbox_id: str,
                             node_id: str) -> bool | None:  # fmt: skip
    """paused -> starting on `node_id` (another node's paused sandbox is that node's from
    here on), within the team's limit: None if it was not paused, False if the team runs its
    maximum already."""
    async with engine.begin() as conn:
        paused = sandboxes.c.id == sandbox_id, sandboxes.c.state == "paused"
        await _lock_team(conn, team)
        if not await _has_room(conn, team):
            found = await conn.execute(select(sandboxes.c.id).where(*paused))
            return False if found.first() else None
        result = await conn.execute(
            update(sandboxes).where(*paused).values(state="starting", node_id=node_id)
        )
    return True if result.rowcount else None


async def save_snapshot(engine: AsyncEngine, row: Row) -> None:
    async with engine.begin() as conn:
        await conn.execute(delete(snapshots).where(snapshots.c.sandbox_id == row["sandbox_id"]))
        await conn.execute(insert(snapshots).values(**row))


async def drop_snapshot(engine: AsyncEngine, sandbox_id: str) -> None:
    async with engine.begin() as conn:
        await conn.execute(delete(snapshots).where(snapshots.c.sandbox_id == sandbox_id))


async def snapshots_older_than(engine: AsyncEngine, node_id: str, cutoff: float) -> list[str]:
    """Ids of paused sandboxes on this node whose snapshot was taken before `cutoff`."""
    query = (
        select(sandboxes.c.id)
        .join(snapshots, snapshots.c.sandbox_id == sandboxes.c.id)
        .where(sandboxes.c.node_id == node_id, sandboxes.c.state == "paused",
               snapshots.c.created_at < cutoff)
    )  # fmt: skip
    async with engine.connect() as conn:
        return [str(r) for r in (await conn.execute(query)).scalars()]


# -- a team's snapshots ----------------------------------------------------------------------


async def save_team_snapshot(engine: AsyncEngine, row: Row) -> None:
    """Insert it, or replace the row of the same id (a snapshot taken again under its name)."""
    async with engine.begin() as conn:
        await conn.execute(delete(team_snapshots).where(team_snapshots.c.id == row["id"]))
        await conn.execute(insert(team_snapshots).values(**row))


async def team_snapshot(engine: AsyncEngine, team_id: str, id_or_name: str) -> Row | None:
    query = select(team_snapshots).where(
        team_snapshots.c.team_id == team_id,
        (team_snapshots.c.id == id_or_name) | (team_snapshots.c.name == id_or_name),
    )
    async with engine.connect() as conn:
        return first_row(await conn.execute(query))


async def list_team_snapshots(engine: AsyncEngine, team_id: str) -> list[Row]:
    query = select(team_snapshots).where(team_snapshots.c.team_id == team_id)
    async with engine.connect() as conn:
        return [dict(r) for r in (await conn.execute(query)).mappings()]


async def node_team_snapshot_builds(engine: AsyncEngine, node_id: str) -> set[str]:
    query = select(team_snapshots.c.build_key).where(team_snapshots.c.node_id == node_id)
    async with engine.connect() as conn:
        return {str(r) for r in (await conn.execute(query)).scalars()}


async def drop_team_snapshot(engine: AsyncEngine, snapshot_id: str) -> bool:
    async with engine.begin() as conn:
        result = await conn.execute(
            delete(team_snapshots).where(team_snapshots.c.id == snapshot_id)
        )
    return bool(result.rowcount)


# -- volumes ---------------------------------------------------------------------------------


async def insert_volume(engine: AsyncEngine, row: Row) -> None:
    async with engine.begin() as conn:
        await conn.execute(insert(volumes).values(**row))


async def team_volumes(engine: AsyncEngine, team_id: str) -> list[Row]:
    query = select(volumes).where(volumes.c.team_id == team_id).order_by(volumes.c.created_at)
    async with engine.connect() as conn:
        return [dict(r) for r in (await conn.execute(query)).mappings()]


async def team_volume(engine: AsyncEngine, team_id: str, *, volume_id: str = "",
                      name: str = "") -> Row | None:  # fmt: skip
    where = volumes.c.id == volume_id if volume_id else volumes.c.name == name
    query = select(volumes).where(volumes.c.team_id == team_id, where)
    async with engine.connect() as conn:
        return first_row(await conn.execute(query))


async def get_volume(engine: AsyncEngine, volume_id: str) -> Row | None:
    async with engine.connect() as conn:
        return first_row(await conn.execute(select(volumes).where(volumes.c.id == volume_id)))


async def drop_volume(engine: AsyncEngine, volume_id: str) -> None:
    async with engine.begin() as conn:
        await conn.execute(delete(volumes).where(volumes.c.id == volume_id))


async def move_volume(engine: AsyncEngine, volume_id: str, was: str, to: str) -> bool:
    """The volume is node `to`'s now, if it still was node `was`'s."""
    async with engine.begin() as conn:
        moved = await conn.execute(
            update(volumes).where(volumes.c.id == volume_id, volumes.c.node_id == was)
            .values(node_id=to)
        )  # fmt: skip
    return bool(moved.rowcount)


async def node_volumes(engine: AsyncEngine, node_id: str) -> list[Row]:
    async with engine.connect() as conn:
        result = await conn.execute(select(volumes).where(volumes.c.node_id == node_id))
        return [dict(r) for r in result.mappings()]


async def snapshots_mounting(engine: AsyncEngine, team_id: str, volume_id: str) -> list[str]:
    """The team's snapshots whose sandboxes mount it."""
    query = select(team_snapshots.c.id, team_snapshots.c.volume_mounts).where(
        team_snapshots.c.team_id == team_id
    )
    return await _ids_mounting(engine, query, volume_id)


async def state_counts(engine: AsyncEngine) -> list[tuple[str, str, int]]:
    """(state, template, count) of the sandboxes that have not ended."""
    query = (
        select(sandboxes.c.state, sandboxes.c.template_id, func.count())
        .where(sandboxes.c.state != "killed")
        .group_by(sandboxes.c.state, sandboxes.c.template_id)
    )
    async with engine.connect() as conn:
        return [(str(s), str(t), int(n)) for s, t, n in (await conn.execute(query)).all()]


async def sandboxes_mounting(engine: AsyncEngine, team_id: str, volume_id: str) -> list[str]:
    """Sandboxes of the team not yet ended (starting, running, paused ...) that mount it."""
    query = select(sandboxes.c.id, sandboxes.c.volume_mounts).where(
        sandboxes.c.team_id == team_id, sandboxes.c.state != "killed"
    )
    return await _ids_mounting(engine, query, volume_id)


async def live_mounting_on(engine: AsyncEngine, node_id: str, volume_id: str) -> list[str]:
    """Sandboxes starting, running or being paused on the node that mount the volume."""
    query = select(sandboxes.c.id, sandboxes.c.volume_mounts).where(
        sandboxes.c.node_id == node_id, sandboxes.c.state.in_(("starting", "running", "pausing"))
    )
    return await _ids_mounting(engine, query, volume_id)


async def _ids_mounting(engine: AsyncEngine, query: Any, volume_id: str) -> list[str]:
    """The ids of `query`'s rows (id, volume_mounts) whose mounts name the volume (filtered
    here: JSON queries differ between SQLite and PostgreSQL)."""
    async with engine.connect() as conn:
        rows = (await conn.execute(query)).all()
    return [r.id for r in rows if any(m.get("volume_id") == volume_id
                                      for m in r.volume_mounts or [])]  # fmt: skip


# -- a team's templates ----------------------------------------------------------------------


async def insert_team_template(engine: AsyncEngine, row: Row) -> None:
    async with engine.begin() as conn:
        await conn.execute(insert(team_templates).values(**row))


async def size_team_template(engine: AsyncEngine, template_id: str, cpu_count: int,
                             memory_mb: int) -> None:  # fmt: skip
    """What the template's sandboxes get from now on (a build that names new sizes)."""
    async with engine.begin() as conn:
        await conn.execute(
            update(team_templates).where(team_templates.c.id == template_id)
            .values(cpu_count=cpu_count, memory_mb=memory_mb)
        )  # fmt: skip


async def team_template(engine: AsyncEngine, team_id: str, id_or_name: str) -> Row | None:
    query = select(team_templates).where(
        team_templates.c.team_id == team_id,
        (team_templates.c.id == id_or_name) | (team_templates.c.name == id_or_name),
    )
    async with engine.connect() as conn:
        return first_row(await conn.execute(query))


async def template_owner(engine: AsyncEngine, template_id: str) -> str | None:
    """The team whose template this id is; None for the operator's templates."""
    query = select(team_templates.c.team_id).where(team_templates.c.id == template_id)
    async with engine.connect() as conn:
        owner = (await conn.execute(query)).scalar()
    return str(owner) if owner is not None else None


async def list_team_templates(engine: AsyncEngine, team_id: str) -> list[Row]:
    query = select(team_templates).where(team_templates.c.team_id == team_id)
    async with engine.connect() as conn:
        return [dict(r) for r in (await conn.execute(query)).mappings()]


async def drop_team_template(engine: AsyncEngine, template_id: str) -> None:
    async with engine.begin() as conn:
        for table in (template_tags, template_builds):
            await conn.execute(delete(table).where(table.c.template_id == template_id))
        await conn.execute(delete(team_templates).where(team_templates.c.id == template_id))


async def template_in_use(engine: AsyncEngine, template_id: str) -> bool:
    """Whether a sandbox not yet ended, or a saved snapshot, was made from it."""
    live = select(func.count()).where(sandboxes.c.template_id == template_id,
                                      sandboxes.c.state != "killed")  # fmt: skip
    saved = select(func.count()).where(team_snapshots.c.template_id == template_id)
    async with engine.connect() as conn:
        return bool((await conn.execute(live)).scalar() or (await conn.execute(saved)).scalar())


async def insert_build(engine: AsyncEngine, row: Row) -> None:
    async with engine.begin() as conn:
        await conn.execute(insert(template_builds).values(**row))


async def get_build(engine: AsyncEngine, template_id: str, build_id: str) -> Row | None:
    query = select(template_builds).where(template_builds.c.id == build_id,
                                          template_builds.c.template_id == template_id)  # fmt: skip
    async with engine.connect() as conn:
        return first_row(await conn.execute(query))


async def builds_of(engine: AsyncEngine, template_id: str, limit: int = 50) -> list[Row]:
    """A template's builds, newest first."""
    query = (select(template_builds).where(template_builds.c.template_id == template_id)
             .order_by(template_builds.c.created_at.desc()).limit(limit))  # fmt: skip
    async with engine.connect() as conn:
        return [dict(r) for r in (await conn.execute(query)).mappings()]


async def update_build(engine: AsyncEngine, build_id: str, **values: Any) -> None:
    async with engine.begin() as conn:
        await conn.execute(
            update(template_builds).where(template_builds.c.id == build_id).values(**values)
        )


async def build_ready(engine: AsyncEngine, build: Row, made: str, tags: Sequence[str]) -> None:
    """The build is done; what it made (its own files, or an earlier build's it was the same
    as) is what creates of the template (and of each tag) use from now on."""
    now = time.time()
    template_id = build["template_id"]
    async with engine.begin() as conn:
        await conn.execute(
            update(template_builds).where(template_builds.c.id == build["id"])
            .values(status="ready", finished_at=now)
        )  # fmt: skip
        await conn.execute(
            update(team_templates).where(team_templates.c.id == template_id)
            .values(build_id=made, updated_at=now)
        )  # fmt: skip
        await _tag(conn, template_id, made, tags, now)


async def _tag(conn: AsyncConnection, template_id: str, build_id: str, tags: Sequence[str],
               now: float) -> None:  # fmt: skip
    await conn.execute(
        delete(template_tags).where(
            template_tags.c.template_id == template_id, template_tags.c.tag.in_(list(tags))
        )
    )
    for tag in tags:
        await conn.execute(
            insert(template_tags).values(
                template_id=template_id, tag=tag, build_id=build_id, created_at=now
            )
        )


async def tag_build(engine: AsyncEngine, template_id: str, build_id: str,
                    tags: Sequence[str]) -> None:  # fmt: skip
    async with engine.begin() as conn:
        await _tag(conn, template_id, build_id, tags, time.time())


async def untag(engine: AsyncEngine, template_id: str, tags: Sequence[str]) -> int:
    async with engine.begin() as conn:
        result = await conn.execute(
            delete(template_tags).where(
                template_tags.c.template_id == template_id, template_tags.c.tag.in_(list(tags))
            )  # fmt: skip
        )
    return int(result.rowcount)


async def template_tag_rows(engine: AsyncEngine, template_id: str) -> list[Row]:
    query = select(template_tags).where(template_tags.c.template_id == template_id)
    async with engine.connect() as conn:
        return [dict(r) for r in (await conn.execute(query)).mappings()]


async def interrupt_builds(engine: AsyncEngine) -> None:
    """Builds a stopped server was running end in error: they are not resumed."""
    async with engine.begin() as conn:
        await conn.execute(
            update(template_builds)
            .where(template_builds.c.status.in_(("waiting", "building")))
            .values(status="error", reason="the build was interrupted by a server restart",
                    step="base", finished_at=time.time())
        )  # fmt: skip


# -- lifecycle events --------------------------------------------------------------------------


async def add_event(engine: AsyncEngine, row: Row) -> Row:
    """Insert it; returns it with its id (ids grow in the order events were added)."""
    async with engine.begin() as conn:
        query = insert(sandbox_events).values(**row).returning(sandbox_events.c.id)
        return {**row, "id": int((await conn.execute(query)).scalar_one())}


async def events(engine: AsyncEngine, team_id: str, sandbox_id: str | None = None,
                 after_id: int = 0, limit: int = 100) -> list[Row]:  # fmt: skip
    """The team's events (one sandbox's, if given) in order, after `after_id`."""
    query = select(sandbox_events).where(sandbox_events.c.team_id == team_id,
                                         sandbox_events.c.id > after_id)  # fmt: skip
    if sandbox_id is not None:
        query = query.where(sandbox_events.c.sandbox_id == sandbox_id)
    query = query.order_by(sandbox_events.c.id).limit(limit)
    async with engine.connect() as conn:
        return [dict(r) for r in (await conn.execute(query)).mappings()]

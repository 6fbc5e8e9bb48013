"""A team's volumes in the catalog: names, limits, who mounts them; the node keeps the files
(node/volumes.py). A volume is deleted only when no sandbox that is not yet killed mounts it (a
paused one would lose it at its resume), and its content API takes a bearer token derived from
the server's seed, never stored."""

from __future__ import annotations

import asyncio
import hmac
import time
from typing import TYPE_CHECKING, Any

from vivarium.api import keys, store
from vivarium.errors import (
    CapacityExhausted,
    Conflict,
    InvalidArgument,
    NotFound,
    Unauthenticated,
)
from vivarium.node.volume_files import VolumeFiles
from vivarium.node.volumes import VolumeMount, check_mounts, check_name, new_volume_id

if TYPE_CHECKING:
    from vivarium.api.control import ControlPlane

Row = dict[str, Any]


class VolumeCatalog:
    def __init__(self, control: ControlPlane) -> None:
        self.control = control
        self.engine = control.engine
        self.node = control.node

    def token(self, volume_id: str) -> str:
        return keys.volume_token(self.control.seed, volume_id)

    async def create(self, team: Row, name: str) -> Row:
        check_name(name)
        async with self.control.team_lock(team["id"]):
            have = await store.team_volumes(self.engine, team["id"])
            limit = self.control.settings.team_max_volumes
            if len(have) >= limit:
                raise CapacityExhausted(f"the team has its maximum of {limit} volumes",
                                        "delete one, or ask the operator to raise "
                                        "VIVARIUM_TEAM_MAX_VOLUMES")  # fmt: skip
            if any(v["name"] == name for v in have):
                raise Conflict(f"volume {name!r} already exists")
            row = {"id": new_volume_id(), "team_id": team["id"], "name": name,
                   "node_id": self.control.node_id, "created_at": time.time()}  # fmt: skip
            await asyncio.to_thread(self.node.volumes.create, row["id"])
            try:
                await store.insert_volume(self.engine, row)
            except BaseException:
                await asyncio.to_thread(self.node.volumes.delete, row["id"])
                raise
        return row

    async def get(self, team: Row, volume_id: str) -> Row:
        row = await store.team_volume(self.engine, team["id"], volume_id=volume_id)
        if row is None:
            raise NotFound(f"volume {volume_id!r} not found")
        return row

    async def all(self, team: Row) -> list[Row]:
        return await store.team_volumes(self.engine, team["id"])

    async def delete(self, team: Row, volume_id: str) -> None:
        row = await self.get(team, volume_id)
        async with self.control.team_lock(team["id"]):
            users = await store.sandboxes_mounting(self.engine, team["id"], row["id"])
            if users:
                raise Conflict(f"volume {row['name']!r} is mounted by sandbox "
                               f"{', '.join(sorted(users))}",
                               "kill those sandboxes first (paused ones too)")  # fmt: skip
            snapshots = await store.snapshots_mounting(self.engine, team["id"], row["id"])
            if snapshots:  # sandboxes started from them would mount it
                raise Conflict(f"volume {row['name']!r} is mounted by the sandboxes of snapshot "
                               f"{', '.join(sorted(snapshots))}",
                               "delete those snapshots first")  # fmt: skip
            await store.drop_volume(self.engine, row["id"])
            await asyncio.to_thread(self.node.volumes.delete, row["id"])

    async def reconcile(self) -> None:
        """After a restart: volumes on the node that the catalog does not know (a crash between
        making one and recording it, or between forgetting one and removing it) are removed."""
        known = {r["id"] for r in await store.node_volumes(self.engine, self.control.node_id)}
        for volume_id in await asyncio.to_thread(self.node.volumes.ids):
            if volume_id not in known:
                await asyncio.to_thread(self.node.volumes.delete, volume_id)

    async def resolve(self, team: Row, asked: tuple[tuple[str, str], ...]) -> list[VolumeMount]:
        """The team's volumes a create names, as (name, path) pairs."""
        mounts = []
        for name, path in asked:
            row = await store.team_volume(self.engine, team["id"], name=name)
            if row is None:
                raise NotFound(f"volume {name!r} not found", "create it first: Volume.create")
            mounts.append(VolumeMount(name, path, row["id"]))
        check_mounts(mounts)
        return mounts

    async def files(self, volume_id: str, authorization: str) -> VolumeFiles:
        """The volume's files, for the holder of its token (`Authorization: Bearer ...`)."""
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated(
                "missing volume token", "send it as Authorization: Bearer <the volume's token>"
            )
        row = await store.get_volume(self.engine, volume_id)
        if row is None:
            raise NotFound(f"volume {volume_id!r} not found")
        if not hmac.compare_digest(token.strip(), self.token(row["id"])):
            raise Unauthenticated("invalid volume token for this volume")
        return VolumeFiles(self.node.volumes.data(row["id"]))


def mounts_request(data: Any) -> tuple[tuple[str, str], ...]:
    """`volumeMounts` of a create: [{"name", "path"}]."""
    if data is None:
        return ()
    if not isinstance(data, list):
        raise InvalidArgument("volumeMounts must be a list of {name, path}")
    out = []
    for item in data:
        if not (isinstance(item, dict) and isinstance(item.get("name"), str)
                and isinstance(item.get("path"), str)):  # fmt: skip
            raise InvalidArgument("each of volumeMounts must be {name, path} (strings)")
        out.append((item["name"], item["path"]))
    return tuple(out)

"""A team's volumes in the catalog: names, limits, who mounts them; the node keeps the files
(node/volumes.py). A volume is deleted only when no sandbox that is not yet killed mounts it (a
paused one would lose it at its resume), and its content API takes a bearer token derived from
the server's seed, never stored.

In a cluster a volume is on one node at a time, the one its row names, and moves when another
node needs it (`here`; the cluster's API sends creates that mount it to its node while that node
is ready): its node hands it over (stored first, then the row moved, then its copy removed)
unless a sandbox there starts or runs with it or a write of its files is under way; a lost
node's is taken from what it last stored (its sweep stores changed volumes every
VIVARIUM_CLUSTER_SWEEP_S, volumes in use every PUBLISH_EVERY_S). A node that finds a copy of a
volume no longer its own drops it. One node moves a volume at a time: on a node under
`_moving`, across nodes by the catalog's conditional update.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import httpx

from vivarium.api import keys, store
from vivarium.cluster import secret
from vivarium.errors import (
    CapacityExhausted,
    Conflict,
    InvalidArgument,
    NodeUnavailable,
    NotFound,
    RuntimeFailure,
    Unauthenticated,
)
from vivarium.node.shelf import ShelfError
from vivarium.node.volume_files import VolumeFiles
from vivarium.node.volumes import (
    MAX_MOUNTS,
    VolumeMount,
    check_mounts,
    check_name,
    new_volume_id,
)

if TYPE_CHECKING:
    from vivarium.api.control import ControlPlane

log = logging.getLogger(__name__)

Row = dict[str, Any]


HANDOVER = "/cluster/volumes/{volume_id}/handover"  # a node's API, for other nodes only
PUBLISH_EVERY_S = 300.0  # a volume a sandbox runs with is stored at most this often
HINT = "check VIVARIUM_SNAPSHOT_URL and the object store; the volume stays where it was"


class VolumeCatalog:
    def __init__(self, control: ControlPlane) -> None:
        self.control = control
        self.engine = control.engine
        self.node = control.node
        self._moving: defaultdict[str, asyncio.Lock] = defaultdict(asyncio.Lock)
        self._writers: Counter[str] = Counter()  # writes through the files API under way

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
            async with self._moving[row["id"]]:  # the sweep leaves it alone until it is a row
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
            async with self._moving[row["id"]]:  # not while it is stored or moved
                await store.drop_volume(self.engine, row["id"])
                await asyncio.to_thread(self.node.volumes.delete, row["id"])
                if (share := self.node.volume_share) is not None:  # a lost node's copy: its
                    await asyncio.to_thread(share.delete, row["id"])  # sweep drops it when back

    async def reconcile(self) -> None:
        """After a restart: volumes on the node that the catalog does not know (a crash between
        making one and recording it, or between forgetting one and removing it) are removed."""
        known = {r["id"] for r in await store.node_volumes(self.engine, self.control.node_id)}
        for volume_id in await asyncio.to_thread(self.node.volumes.ids):
            if volume_id not in known:
                await asyncio.to_thread(self.node.volumes.delete, volume_id)

    async def resolve(self, team: Row, asked: tuple[tuple[str, str], ...]) -> list[VolumeMount]:
        """The team's volumes a create names, as (name, path) pairs."""
        mounts: list[VolumeMount] = []
        rows: list[Row] = []
        for name, path in asked:
            row = await store.team_volume(self.engine, team["id"], name=name)
            if row is None:
                raise NotFound(f"volume {name!r} not found", "create it first: Volume.create")
            mounts.append(VolumeMount(name, path, row["id"]))
            rows.append(row)
        check_mounts(mounts)
        for volume in rows:
            await self.here(volume["id"], volume)
        return mounts

    async def files(self, volume_id: str, authorization: str) -> VolumeFiles:
        """The volume's files, for the holder of its token (`Authorization: Bearer ...`)."""
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise Unauthenticated(
                "missing volume token", "send it as Authorization: Bearer <the volume's token>"
            )
        # The token is checked before the volume is looked up: an unknown id and a wrong token
        # get the same answer, so no one without a token learns which ids exist. Compared as
        # bytes: compare_digest refuses non-ASCII strings.
        if not hmac.compare_digest(token.strip().encode(), self.token(volume_id).encode()):
            raise Unauthenticated("invalid volume token for this volume")
        row = await store.get_volume(self.engine, volume_id)
        if row is None:
            raise NotFound(f"volume {volume_id!r} not found")
        await self.here(row["id"], row)
        return VolumeFiles(self.node.volumes.data(row["id"]))

    # -- a cluster's volumes move between nodes ------------------------------------------------

    @contextlib.asynccontextmanager
    async def writing(self, volume_id: str) -> AsyncIterator[None]:
        """A write through the files API under way: the volume is not handed over meanwhile."""
        self._writers[volume_id] += 1
        try:
            yield
        finally:
            self._writers[volume_id] -= 1
            if not self._writers[volume_id]:
                del self._writers[volume_id]

    async def here(self, volume_id: str, row: Row | None = None) -> None:
        """In a cluster, the volume on this node (before a sandbox mounts it or its files are
        used): moved here if another node has it. `row`: its catalog row, if just read."""
        share = self.node.volume_share
        if share is None:
            return
        row = row or await store.get_volume(self.engine, volume_id)
        if row is None:
            raise NotFound(f"volume {volume_id!r} not found")
        if row["node_id"] == self.control.node_id and self.node.volumes.present(volume_id):
            return  # the usual case: no lock, which a store of it in progress holds
        async with self._moving[volume_id]:
            row = await store.get_volume(self.engine, volume_id)
            if row is None:
                raise NotFound(f"volume {volume_id!r} not found")
            if row["node_id"] != self.control.node_id:
                await self._bring(row)
            elif await asyncio.to_thread(self.node.volumes.present, volume_id):
                return
            elif await asyncio.to_thread(self.node.volumes.mountable, volume_id):
                await asyncio.to_thread(self.node.volumes.mount, volume_id)
                return
            try:  # here by the catalog: moved here now, or before and its fetch cut short
                fetched = await asyncio.to_thread(share.fetch, volume_id)
            except ShelfError as exc:
                raise RuntimeFailure(f"volume {row['name']!r} could not be fetched: {exc}",
                                     HINT) from None  # fmt: skip
            if not fetched:
                raise RuntimeFailure(f"volume {row['name']!r} is on this node by the catalog, "
                                     "and neither here nor stored", HINT)  # fmt: skip
            log.info("volume %s (%s) is here now", volume_id, row["name"])

    async def _bring(self, row: Row) -> None:
        """The row moved to this node: handed over by its node if that node answers (it stores
        the volume first), else taken over from what it last stored (its node is lost). Any
        copy left here from before is stale: dropped first."""
        home, name, volume_id = row["node_id"], row["name"], row["id"]
        if self._running_with(volume_id):
            raise Conflict(f"volume {name!r} is on node {home}, and an old copy of it is in use "
                           "here", "retry once the sandboxes using it here have ended")  # fmt: skip
        await asyncio.to_thread(self.node.volumes.delete, volume_id)
        if await self.control.directory.status(home) in ("ready", "draining"):
            await self._handed_over(home, row)
            return
        share = self.node.volume_share
        assert share is not None
        try:
            stored = await asyncio.to_thread(share.stored, volume_id)
        except ShelfError as exc:
            raise RuntimeFailure(f"volume {name!r} could not be looked up: {exc}", HINT) from None
        if not stored:
            raise NodeUnavailable(f"volume {name!r} is on node {home}, which is lost, and was "
                                  "never stored", "it comes back with that node")  # fmt: skip
        if not await store.move_volume(self.engine, volume_id, home, self.control.node_id):
            raise Conflict(f"volume {name!r} moved meanwhile", "retry")
        log.warning("volume %s (%s) of lost node %s taken over from its last stored copy: what "
                    "was written there since is not in it", volume_id, name, home)  # fmt: skip

    async def _handed_over(self, home: str, row: Row) -> None:
        node = await self.control.directory.node(home)
        assert node is not None
        settings = self.control.settings
        url = node["address"].rstrip("/") + HANDOVER.format(volume_id=row["id"])
        headers = {secret.HEADER: settings.cluster_secret,
                   secret.NODE_HEADER: secret.node_credential(settings.cluster_secret)}  # fmt: skip
        async with httpx.AsyncClient(timeout=httpx.Timeout(900.0, connect=5.0), trust_env=False,
                                     verify=settings.cluster_client_tls()) as http:  # fmt: skip
            try:
                answer = await http.post(url, json={"to": self.control.node_id}, headers=headers)
            except httpx.HTTPError as exc:
                raise NodeUnavailable(f"node {home}, which has volume {row['name']!r}, did not "
                                      f"hand it over: {exc!r}", "retry") from None  # fmt: skip
        if answer.status_code == 200:
            return
        try:
            message = str(answer.json()["message"])
        except (ValueError, KeyError, TypeError):
            message = f"node {home} answered {answer.status_code}"
        if answer.status_code == 409:
            raise Conflict(message, "retry once the volume is free")
        raise NodeUnavailable(f"node {home} did not hand over volume {row['name']!r}: {message}",
                              "see that node's log")  # fmt: skip

    async def hand_over(self, volume_id: str, to: str) -> None:
        """This node's volume to node `to` (another ready node): stored, the row moved, the
        copy here removed; refused while a sandbox here starts or runs with it, or a write
        through the files API is under way."""
        share = self.node.volume_share
        if share is None:
            raise NotFound(f"volume {volume_id!r} not found")
        if to == self.control.node_id or await self.control.directory.status(to) != "ready":
            raise InvalidArgument(f"node {to!r} is not another ready node")
        async with self._moving[volume_id]:
            row = await store.get_volume(self.engine, volume_id)
            if row is None or row["node_id"] != self.control.node_id:
                raise NotFound(f"volume {volume_id!r} is not on node {self.control.node_id}")
            users = sorted({*self._running_with(volume_id), *await store.live_mounting_on(
                self.engine, self.control.node_id, volume_id)})  # fmt: skip
            if users or self._writers[volume_id]:
                who = f"sandbox {', '.join(users)}" if users else "a write of its files"
                raise Conflict(f"volume {row['name']!r} is in use by {who} on node "
                               f"{self.control.node_id}", "pause or kill it, or wait until it "
                               "ends")  # fmt: skip
            if await asyncio.to_thread(self.node.volumes.present, volume_id):
                await self._store(volume_id)
            if not await store.move_volume(self.engine, volume_id, self.control.node_id, to):
                raise Conflict(f"volume {row['name']!r} moved meanwhile", "retry")
            await asyncio.to_thread(self.node.volumes.delete, volume_id)
        log.info("volume %s (%s) handed over to node %s", volume_id, row["name"], to)

    async def _store(self, volume_id: str) -> None:
        """The volume stored, if it changed since it last was."""
        share = self.node.volume_share
        assert share is not None
        try:
            if await asyncio.to_thread(share.changed, volume_id):
                size = await asyncio.to_thread(share.publish, volume_id)
                log.info("volume %s stored (%d MiB)", volume_id, size >> 20)
        except (ShelfError, OSError) as exc:
            raise RuntimeFailure(f"volume {volume_id} could not be stored: {exc}", HINT) from None

    def _running_with(self, volume_id: str) -> list[str]:
        return sorted(r.sandbox_id for r in self.node.sandboxes.values()
                      if any(m.get("volume_id") == volume_id for m in r.volumes))  # fmt: skip

    async def sweep(self) -> None:
        """A cluster's node: store what changed, and drop copies of volumes that moved away
        (taken over while this node was lost) or were deleted meanwhile."""
        share = self.node.volume_share
        if share is None:
            return
        for volume_id in await asyncio.to_thread(self.node.volumes.ids):
            async with self._moving[volume_id]:
                row = await store.get_volume(self.engine, volume_id)
                busy = self._running_with(volume_id)
                if row is None or row["node_id"] != self.control.node_id:
                    if not busy and not self._writers[volume_id]:
                        log.warning("dropping this node's copy of volume %s: the cluster moved "
                                    "or deleted it", volume_id)  # fmt: skip
                        await asyncio.to_thread(self.node.volumes.delete, volume_id)
                    continue
                last = await asyncio.to_thread(share.last_stored, volume_id)
                if busy and last is not None and time.time() - last["at"] < PUBLISH_EVERY_S:
                    continue
                if await asyncio.to_thread(self.node.volumes.present, volume_id):
                    try:
                        await self._store(volume_id)
                    except RuntimeFailure as exc:
                        log.warning("%s", exc)


def mounts_request(data: Any) -> tuple[tuple[str, str], ...]:
    """`volumeMounts` of a create: [{"name", "path"}]."""
    if data is None:
        return ()
    if not isinstance(data, list):
        raise InvalidArgument("volumeMounts must be a list of {name, path}")
    if len(data) > MAX_MOUNTS:  # before any is looked up in the catalog
        raise InvalidArgument(f"at most {MAX_MOUNTS} volume mounts per sandbox")
    out = []
    for item in data:
        if not (isinstance(item, dict) and isinstance(item.get("name"), str)
                and isinstance(item.get("path"), str)):  # fmt: skip
            raise InvalidArgument("each of volumeMounts must be {name, path} (strings)")
        out.append((item["name"], item["path"]))
    return tuple(out)

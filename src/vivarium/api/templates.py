"""A team's own templates in the catalog (E2B's build API, as the SDK's `Template.build` uses
it): names, builds and their outcome, tags. The node builds them (node/template_builds.py) and
keeps their files; the operator's templates (`vivarium template build`) are not in here.

A name is the team's own: two teams may both have `lesson-7`. A create that names one of the
team's templates, by id, name or `name:tag`, starts from that build.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import re
import secrets
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

from vivarium.api import keys, store
from vivarium.errors import (
    CapacityExhausted,
    Conflict,
    InvalidArgument,
    NotFound,
    Unauthenticated,
    VivariumError,
)
from vivarium.httpjson import whole_number
from vivarium.node.records import ID_ALPHABET
from vivarium.node.template_builds import IMAGE_BASE
from vivarium.runtime.bundle import MAX_CPUS, MAX_MEMORY_MB, MIN_MEMORY_MB
from vivarium.templates import build_request
from vivarium.templates.build_log import BuildLog
from vivarium.templates.recipe import RECIPES
from vivarium.templates.store import NAME_RE

if TYPE_CHECKING:
    from vivarium.api.control import ControlPlane

Row = dict[str, Any]
log = logging.getLogger(__name__)

DEFAULT_TAG = "default"
TAG_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}\Z")
MAX_BUILDS_PER_TEAM = 2  # running or waiting at once
MAX_UPLOAD = 2 << 30
# Every COPY step's archive is kept for the template's life (a rebuild skips uploads the
# template has): bounded, so one team cannot fill the node's disk through one template.
MAX_TEMPLATE_FILES = 8 << 30
UPLOAD_LINK_S = 3600
MAX_LOG_PAGE = 100


def new_template_id() -> str:
    return "t" + "".join(secrets.choice(ID_ALPHABET) for _ in range(19))


def split_name(value: str) -> tuple[str, str | None]:
    """`name:tag` -> (name, tag); a name alone has no tag."""
    name, _, tag = value.partition(":")
    return name, tag or None


def check_name(name: str) -> str:
    if not NAME_RE.match(name):  # the store's names: a template is a directory
        raise InvalidArgument(
            f"invalid template name {name!r}",
            "use up to 63 lowercase letters, digits, '.', '_' or '-'",
        )
    if name in RECIPES:
        raise InvalidArgument(f"{name!r} is the name of a built-in template",
                              "give your template another name")  # fmt: skip
    return name


def check_tags(tags: Any) -> list[str]:
    if not isinstance(tags, list) or not all(isinstance(t, str) and TAG_RE.match(t) for t in tags):
        raise InvalidArgument("tags must be a list of names of letters, digits, '.', '_', '-'")
    return list(dict.fromkeys(tags))


class TemplateCatalog:
    def __init__(self, control: ControlPlane) -> None:
        self.control = control
        self.engine = control.engine
        self.node = control.node
        self._tasks: set[asyncio.Task[None]] = set()
        self._running: defaultdict[str, set[str]] = defaultdict(set)  # team -> its builds
        self._building: Counter[str] = Counter()  # template -> its builds under way

    async def reconcile(self) -> None:
        await store.interrupt_builds(self.engine)

    # -- what creates and lists see --------------------------------------------------------------

    async def resolve(self, team: Row, wanted: str) -> tuple[Row, str] | None:
        """The team's template (and the build) a create names, or None if it names none."""
        name, tag = split_name(wanted)
        row = await store.team_template(self.engine, team["id"], name)
        if row is None:
            return None
        if tag is None or tag == DEFAULT_TAG:
            build_id = row["build_id"]
        else:
            tagged = {t["tag"]: t["build_id"] for t in await store.template_tag_rows(
                self.engine, row["id"])}  # fmt: skip
            build_id = tagged.get(tag)
            if build_id is None:
                raise NotFound(f"template {name!r} has no tag {tag!r}")
        if build_id is None:
            raise NotFound(f"template {name!r} has no finished build yet",
                           "wait for its build, or see why it failed")  # fmt: skip
        return row, build_id

    async def names(self, team: Row, sandboxes: list[Row]) -> dict[str, str]:
        """The team's templates' names by id, for the sandboxes' (no catalog query when all
        are from built-in templates, as most are)."""
        if all(s["template_id"] in RECIPES for s in sandboxes):
            return {}
        rows = await store.list_team_templates(self.engine, team["id"])
        return {r["id"]: r["name"] for r in rows}

    async def foreign(self, team: Row, template_id: str) -> bool:
        """Whether the id is another team's template (never created from, never listed)."""
        owner = await store.template_owner(self.engine, template_id)
        return owner is not None and owner != team["id"]

    async def of_team(self, team: Row) -> list[Row]:
        return await store.list_team_templates(self.engine, team["id"])

    # -- building --------------------------------------------------------------------------------

    async def request_build(self, team: Row, body: dict[str, Any]) -> tuple[Row, Row]:
        raw = body.get("name") or body.get("alias")
        if not isinstance(raw, str) or not raw:
            raise InvalidArgument("name is required")
        name, tag = split_name(raw)
        check_name(name)
        tags = check_tags(body.get("tags") or ([tag] if tag else [DEFAULT_TAG]))
        cpu, memory = body.get("cpuCount"), body.get("memoryMB")
        for key, value, top in (("cpuCount", cpu, MAX_CPUS), ("memoryMB", memory, MAX_MEMORY_MB)):
            if value is not None and (type(value) is not int or not 1 <= value <= top):
                raise InvalidArgument(f"{key} must be a whole number from 1 to {top}")
        if memory is not None:  # E2B takes 128: here the sentry alone uses ~110 MiB of it
            memory = max(memory, MIN_MEMORY_MB)
        now = time.time()
        async with self.control.team_lock(team["id"]):
            row = await store.team_template(self.engine, team["id"], name)
            if row is None:
                row = {"id": new_template_id(), "team_id": team["id"], "name": name,
                       "build_id": None, "node_id": self.control.node_id,
                       "cpu_count": cpu or self.control.default_cpu_count,
                       "memory_mb": memory or self.control.settings.default_memory_mb,
                       "created_at": now, "updated_at": now}  # fmt: skip
                await store.insert_team_template(self.engine, row)
            elif cpu is not None or memory is not None:  # the sizes its sandboxes get now
                row = {**row, "cpu_count": cpu or row["cpu_count"],
                       "memory_mb": memory or row["memory_mb"]}  # fmt: skip
                await store.size_team_template(self.engine, row["id"], row["cpu_count"],
                                               row["memory_mb"])  # fmt: skip
            build = {"id": str(uuid.uuid4()), "template_id": row["id"], "status": "waiting",
                     "reason": None, "step": None, "tags": tags, "created_at": now,
                     "finished_at": None}  # fmt: skip
            await store.insert_build(self.engine, build)
        return row, build

    async def template(self, team: Row, template_id: str) -> Row:
        row = await store.team_template(self.engine, team["id"], template_id)
        if row is None:
            raise NotFound(f"template {template_id!r} was not found")
        return row

    async def with_builds(self, team: Row, template_id: str) -> tuple[Row, list[Row]]:
        row = await self.template(team, template_id)
        return row, await store.builds_of(self.engine, row["id"])

    async def build(self, team: Row, template_id: str, build_id: str) -> tuple[Row, Row]:
        row = await self.template(team, template_id)
        build = await store.get_build(self.engine, row["id"], build_id)
        if build is None:
            raise NotFound(f"build {build_id!r} of template {template_id!r} was not found")
        return row, build

    def upload_link(self, template_id: str, files_hash: str) -> dict[str, str]:
        """The query of a signed upload URL: `token` and `expires`."""
        expires = int(time.time()) + UPLOAD_LINK_S
        token = keys.upload_token(self.control.seed, template_id, files_hash, expires)
        return {"token": token, "expires": str(expires)}

    async def file_link(self, team: Row, template_id: str, files_hash: str) -> tuple[str, bool]:
        row = await self.template(team, template_id)
        if not build_request.FILES_HASH_RE.match(files_hash):
            raise InvalidArgument("the files hash must be 64 hexadecimal digits")
        return row["id"], self.node.builds.has_file(row["id"], files_hash)

    async def upload(self, template_id: str, files_hash: str, token: str, expires_raw: str,
                     chunks: AsyncIterator[bytes]) -> None:  # fmt: skip
        if not build_request.FILES_HASH_RE.match(files_hash):
            raise InvalidArgument("the files hash must be 64 hexadecimal digits")
        new_link = "ask for a new one (GET /templates/{id}/files/{hash})"
        expires = whole_number(expires_raw, "expires", 0)
        expected = keys.upload_token(self.control.seed, template_id, files_hash, expires)
        if not hmac.compare_digest(token.encode(errors="replace"), expected.encode()):
            raise Unauthenticated("the upload URL's signature does not match", new_link)
        if expires < time.time():
            raise Unauthenticated("the upload URL has expired", new_link)
        # The files of a template deleted since the link was given would be kept for nothing.
        if await store.template_owner(self.engine, template_id) is None:
            raise NotFound(f"template {template_id!r} was not found")
        room = MAX_TEMPLATE_FILES - self.node.builds.files_size(template_id)
        if room <= 0:
            raise InvalidArgument(
                f"the template's uploaded files are over {MAX_TEMPLATE_FILES >> 30} GiB",
                "delete the template (its files go with it) and build it again",
            )
        await self.node.builds.save_file(template_id, files_hash, chunks, min(MAX_UPLOAD, room))

    async def start(self, team: Row, template_id: str, build_id: str,
                    body: dict[str, Any]) -> None:  # fmt: skip
        row, build = await self.build(team, template_id, build_id)
        if build["status"] != "waiting" or self.node.builds.log_of(build_id) is not None:
            raise Conflict(f"build {build_id} has already started")
        # Taken before the next await: a second start of the same build meets the log.
        build_log = self.node.builds.open_log(build_id)
        try:
            request = build_request.parse(body)
            base = await self._base(team, request)
            running = self._running[team["id"]]
            if len(running) >= MAX_BUILDS_PER_TEAM:
                raise CapacityExhausted(f"the team already has {len(running)} builds under way",
                                        "wait for one to finish")  # fmt: skip
        except BaseException:
            self.node.builds.logs.pop(build_id, None)
            raise
        running.add(build_id)
        self._building[row["id"]] += 1
        task = asyncio.create_task(self._run(row, build, base, request, build_log))
        self._tasks.add(task)

        def done(_: object) -> None:
            self._tasks.discard(task)
            running.discard(build_id)
            self._building[row["id"]] -= 1

        task.add_done_callback(done)

    async def _base(self, team: Row, request: build_request.BuildRequest) -> str:
        """What the build starts from, as the node names it: a template (`name`, or
        `id@build` for a team template's tagged build) or `image:<reference>`."""
        if request.from_image is not None:
            builtin = build_request.builtin_for_image(request.from_image)
            return builtin or IMAGE_BASE + request.from_image
        assert request.from_template is not None
        resolved = await self.resolve(team, request.from_template)
        if resolved is not None:
            row, build_id = resolved
            return f"{row['id']}@{build_id}"
        if request.from_template in RECIPES:
            if self.node.templates.current(request.from_template) is None:
                raise NotFound(f"template {request.from_template!r} is not built on this node")
            return request.from_template
        raise NotFound(f"template {request.from_template!r} was not found")

    async def _run(self, row: Row, build: Row, base: str, request: build_request.BuildRequest,
                   build_log: BuildLog) -> None:  # fmt: skip
        await store.update_build(self.engine, build["id"], status="building")
        try:
            made = await self.node.builds.run(row["id"], build["id"], base, request,
                                              row["team_id"])  # fmt: skip
        except VivariumError as exc:
            await store.update_build(
                self.engine,
                build["id"],
                status="error",
                reason=build_log.reason or str(exc),
                step=build_log.failed_step,
                finished_at=time.time(),
            )
            return
        except Exception as exc:
            await store.update_build(
                self.engine,
                build["id"],
                status="error",
                reason=str(exc),
                step=build_request.BASE_STEP,
                finished_at=time.time(),
            )
            return
        # A build the same as an earlier one is that one (it was kept): creates use its files.
        await store.build_ready(self.engine, build, made.build_id, build["tags"])

    async def status(
        self, team: Row, template_id: str, build_id: str, offset: int, limit: int, level: str | None
    ) -> tuple[Row, Row, list[Any]]:
        """The build's catalog row and its log entries from `offset` (at `level` or above)."""
        row, build = await self.build(team, template_id, build_id)
        build_log = self.node.builds.log_of(build_id)
        entries = build_log.entries[offset : offset + limit] if build_log else []
        if level:
            order = ("debug", "info", "warn", "error")
            entries = [e for e in entries if order.index(e.level) >= order.index(level)]
        return row, build, entries

    # -- tags, delete ----------------------------------------------------------------------------

    async def assign_tags(self, team: Row, target: str, tags: Any) -> tuple[str, list[str]]:
        name, tag = split_name(target)
        tags = check_tags(tags)
        if not tags:
            raise InvalidArgument("tags must name at least one tag")
        resolved = await self.resolve(team, f"{name}:{tag}" if tag else name)
        if resolved is None:
            raise NotFound(f"template {name!r} was not found")
        row, build_id = resolved
        await store.tag_build(self.engine, row["id"], build_id, tags)
        return build_id, tags

    async def remove_tags(self, team: Row, name: str, tags: Any) -> None:
        tags = check_tags(tags)
        row = await self.template(team, split_name(name)[0])
        if await store.untag(self.engine, row["id"], tags) == 0:
            raise NotFound(f"template {name!r} has none of the tags {', '.join(tags)}")

    async def tags(self, team: Row, template_id: str) -> list[Row]:
        row = await self.template(team, template_id)
        return await store.template_tag_rows(self.engine, row["id"])

    async def delete(self, team: Row, template_id: str) -> bool:
        """False when the id is none of the team's templates (it may be a snapshot)."""
        row = await store.team_template(self.engine, team["id"], template_id)
        if row is None:
            return False
        if self._building[row["id"]]:
            raise Conflict(f"template {template_id!r} has a build under way",
                           "delete it once the build has finished")  # fmt: skip
        in_use = await store.template_in_use(self.engine, row["id"])
        await store.drop_team_template(self.engine, row["id"])
        await asyncio.to_thread(self.node.builds.remove_template, row["id"], builds=not in_use)
        return True

    async def drop_deleted_copies(self) -> None:
        """A cluster's node: the builds it fetched of team templates deleted since (through
        another node), once no sandbox or snapshot made from them is left."""
        if self.node.template_share is None:
            return
        root = self.node.templates.root
        here = await asyncio.to_thread(
            lambda: [p.name for p in root.iterdir() if (p / "builds").is_dir()]
            if root.is_dir() else []
        )  # fmt: skip
        for template_id in here:
            if template_id in RECIPES or await store.template_owner(self.engine, template_id):
                continue
            if await store.template_in_use(self.engine, template_id):
                continue
            log.info("dropping this node's copy of template %s: it was deleted", template_id)
            await asyncio.to_thread(self.node.builds.remove_template, template_id, builds=True)

    async def share_builds_here(self) -> None:
        """A cluster's node, at start: its team templates' builds in the store, where those
        made before it was a node of a cluster that shares them are not (other nodes fetch
        them from there)."""
        share = self.node.template_share
        if share is None:
            return
        store_ = self.node.templates
        found = await asyncio.to_thread(
            lambda: sorted(p.parent.parent.name + "/" + p.parent.name for p in
                           store_.root.glob("*/builds/*/manifest.json"))
            if store_.root.is_dir() else []
        )  # fmt: skip
        for key in found:
            name, build_id = key.split("/")
            if name in RECIPES:  # shared when a sandbox on them is first paused
                continue
            try:
                template = await asyncio.to_thread(store_.build, name, build_id)
                await share.share(template)
            except Exception as exc:
                log.warning("build %s of template %s is not in the store: %s", build_id, name,
                            exc)  # fmt: skip

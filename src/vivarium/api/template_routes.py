"""E2B's template build routes, as the SDK's `Template.build` calls them: request a build, upload
the files of COPY steps (to a signed URL on this listener), start it, poll its status and logs;
aliases, tags, delete. A team's templates are listed beside the operator's by `GET /templates`
(api/app.py)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from vivarium.api import shapes
from vivarium.api.templates import MAX_LOG_PAGE, TemplateCatalog
from vivarium.errors import InvalidArgument
from vivarium.guest.envd import ENVD_VERSION
from vivarium.httpjson import guarded, json_body, whole_number

Row = dict[str, Any]
Authed = Callable[[Callable[[Request, Row], Awaitable[Response]]], Callable[..., Any]]


def _count(request: Request, name: str, default: int) -> int:
    return whole_number(request.query_params.get(name), name, default, 10**9)


def template_shape(row: Row, envd_version: str) -> Row:
    """A team's template in `GET /templates`."""
    return {"templateID": row["id"], "buildID": row["build_id"] or "", "public": False,
            "aliases": [row["name"]], "names": [row["name"]],
            "cpuCount": row["cpu_count"], "memoryMB": row["memory_mb"], "diskSizeMB": 0,
            "createdAt": shapes.rfc3339(row["created_at"]),
            "updatedAt": shapes.rfc3339(row["updated_at"]), "createdBy": None,
            "lastSpawnedAt": None, "spawnCount": 0, "buildCount": 1,
            "envdVersion": envd_version,
            "buildStatus": "ready" if row["build_id"] else "building"}  # fmt: skip


def build_shape(build: Row, template: Row) -> Row:
    """A build in `TemplateWithBuilds`."""
    finished = build["finished_at"]
    return {"buildID": build["id"], "status": build["status"],
            "createdAt": shapes.rfc3339(build["created_at"]),
            "updatedAt": shapes.rfc3339(finished or build["created_at"]),
            "finishedAt": shapes.rfc3339(finished) if finished else None,
            "cpuCount": template["cpu_count"], "memoryMB": template["memory_mb"]}  # fmt: skip


def routes(catalog: TemplateCatalog, authed: Authed) -> list[Route]:
    async def request_build(request: Request, team: Row) -> Response:
        row, build = await catalog.request_build(team, await json_body(request))
        return JSONResponse({"templateID": row["id"], "buildID": build["id"], "public": False,
                             "names": [row["name"]], "aliases": [row["name"]],
                             "tags": build["tags"]}, status_code=202)  # fmt: skip

    async def file_link(request: Request, team: Row) -> Response:
        files_hash = str(request.path_params["hash"])
        template_id, present = await catalog.file_link(team, tid(request), files_hash)
        body: Row = {"present": present}
        if not present:
            url = request.url_for("upload", template_id=template_id, hash=files_hash)
            body["url"] = str(
                url.include_query_params(**catalog.upload_link(template_id, files_hash))
            )
        return JSONResponse(body, status_code=201)

    async def upload(request: Request) -> Response:
        query = request.query_params
        await catalog.upload(tid(request), str(request.path_params["hash"]),
                             query.get("token", ""), query.get("expires", ""),
                             request.stream())  # fmt: skip
        return Response(status_code=201)

    async def start(request: Request, team: Row) -> Response:
        await catalog.start(team, tid(request), str(request.path_params["build_id"]),
                            await json_body(request))  # fmt: skip
        return Response(status_code=202)

    async def status(request: Request, team: Row) -> Response:
        offset = _count(request, "logsOffset", 0)
        limit = min(_count(request, "limit", MAX_LOG_PAGE), MAX_LOG_PAGE)
        level = request.query_params.get("level") or None
        if level not in (None, "debug", "info", "warn", "error"):
            raise InvalidArgument("level must be debug, info, warn or error")
        row, build, entries = await catalog.status(team, tid(request),
                                                   str(request.path_params["build_id"]),
                                                   offset, limit, level)  # fmt: skip
        log_entries = [{"timestamp": shapes.rfc3339(e.timestamp), "level": e.level,
                        "message": e.message, **({"step": e.step} if e.step else {})}
                       for e in entries]  # fmt: skip
        body: Row = {
            "templateID": row["id"],
            "buildID": build["id"],
            "status": build["status"],
            "logEntries": log_entries,
            "logs": [e["message"] for e in log_entries],
        }
        if build["status"] == "error":
            body["reason"] = {"message": build["reason"] or "the build failed",
                              **({"step": build["step"]} if build["step"] else {})}  # fmt: skip
        return JSONResponse(body)

    async def alias(request: Request, team: Row) -> Response:
        row = await catalog.template(team, str(request.path_params["alias"]))
        return JSONResponse({"templateID": row["id"], "public": False})

    async def assign_tags(request: Request, team: Row) -> Response:
        body = await json_body(request)
        target = body.get("target")
        if not isinstance(target, str) or not target:
            raise InvalidArgument("target (name:tag of the build to tag) is required")
        build_id, tags = await catalog.assign_tags(team, target, body.get("tags"))
        return JSONResponse({"buildID": build_id, "tags": tags}, status_code=201)

    async def remove_tags(request: Request, team: Row) -> Response:
        body = await json_body(request)
        name = body.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidArgument("name is required")
        await catalog.remove_tags(team, name, body.get("tags"))
        return Response(status_code=204)

    async def tags(request: Request, team: Row) -> Response:
        rows = await catalog.tags(team, tid(request))
        return JSONResponse(
            [
                {
                    "tag": r["tag"],
                    "buildID": r["build_id"],
                    "createdAt": shapes.rfc3339(r["created_at"]),
                }
                for r in rows
            ]
        )

    async def template(request: Request, team: Row) -> Response:
        # E2B's `TemplateWithBuilds`: the dashboard follows a build's status and logs with it.
        row, builds = await catalog.with_builds(team, tid(request))
        body = {
            **template_shape(row, ENVD_VERSION),
            "builds": [build_shape(b, row) for b in builds],
        }
        return JSONResponse(body)

    def tid(request: Request) -> str:
        return str(request.path_params["template_id"])

    files = "/templates/{template_id}/files/{hash}"
    return [
        Route("/v3/templates", authed(request_build), methods=["POST"]),
        Route(files, authed(file_link), methods=["GET"]),
        Route(files, guarded(upload), methods=["PUT"], name="upload"),
        Route("/v2/templates/{template_id}/builds/{build_id}", authed(start), methods=["POST"]),
        Route(
            "/templates/{template_id}/builds/{build_id}/status", authed(status), methods=["GET"]
        ),  # fmt: skip
        Route("/templates/aliases/{alias}", authed(alias), methods=["GET"]),
        Route("/templates/tags", authed(assign_tags), methods=["POST"]),
        Route("/templates/tags", authed(remove_tags), methods=["DELETE"]),
        Route("/templates/{template_id}/tags", authed(tags), methods=["GET"]),
        Route("/templates/{template_id}", authed(template), methods=["GET"]),
    ]

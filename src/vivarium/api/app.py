"""The public control-plane listener (default 127.0.0.1:3000): E2B's REST API.

Every route but `/health`, `/openapi.json` and the dashboard's files needs `X-API-Key`; a team
sees only its own sandboxes (others' answer 404, exactly like unknown ones).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from vivarium import telemetry
from vivarium.api import dashboard, shapes, template_routes, volume_routes
from vivarium.api.control import ControlPlane
from vivarium.api.events import shape as event_shape
from vivarium.api.openapi import document
from vivarium.errors import InvalidArgument, Unauthenticated, VivariumError
from vivarium.guest.envd import ENVD_VERSION
from vivarium.httpjson import guarded, json_body, typed
from vivarium.templates.recipe import RECIPES

Row = dict[str, Any]
TeamHandler = Callable[[Request, Row], Awaitable[Response]]


def _name(data: dict[str, Any]) -> str:
    name = typed(data, "name", str)
    if not name or len(name) > 200:
        raise InvalidArgument("name is required (1-200 characters)")
    return str(name)


def create_app(control: ControlPlane) -> Starlette:
    client_id = control.node_id
    default_timeout = control.settings.default_timeout_s

    def authed(handler: TeamHandler) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            key = request.headers.get("x-api-key", "")
            team = await control.team_for_key(key) if key else None
            if team is None:
                raise Unauthenticated(
                    "Invalid API key" if key else "missing API key",
                    "send a key from `vivarium keys create` in the X-API-Key header",
                )
            return await handler(request, team)

        return guarded(endpoint)

    def sandbox_body(row: Row) -> Row:
        """`Sandbox`, with the tokens the client needs for it."""
        return shapes.sandbox(
            row,
            control.envd_token(row),
            client_id,
            control.traffic_token(row),
            control.settings.sandbox_domain,
        )

    def sid(request: Request) -> str:
        return str(request.path_params["sandbox_id"])

    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    openapi_document = JSONResponse(document())  # the same for every request

    @guarded
    async def prometheus(request: Request) -> Response:
        telemetry.check_access(control.settings, request.client.host if request.client else None,
                               request.headers.get("authorization", ""))  # fmt: skip
        await telemetry.refresh_node(control.node)
        telemetry.refresh_catalog(await control.state_counts())
        return Response(telemetry.exposition(), media_type=telemetry.CONTENT_TYPE)

    async def openapi(request: Request) -> Response:
        return openapi_document

    async def create_v1(request: Request, team: Row) -> Response:
        return await _create(request, team, v1=True)

    async def create_v2(request: Request, team: Row) -> Response:
        return await _create(request, team, v1=False)

    async def _create(request: Request, team: Row, *, v1: bool) -> Response:
        key = request.headers.get("idempotency-key")
        new = shapes.new_sandbox(await json_body(request), default_timeout, v1=v1,
                                 idempotency_key=key)  # fmt: skip
        row = await control.create(team, new)
        return JSONResponse(sandbox_body(row), 201)

    async def list_v2(request: Request, team: Row) -> Response:
        states, metadata, limit, token = shapes.list_query(request.query_params)
        rows = await control.list_sandboxes(team, states)
        rows = [r for r in rows if shapes.matches(r, metadata)]
        names = await control.templates.names(team, rows)
        if template := request.query_params.get("template"):  # an id, or a name (any tag)
            name = template.split(":", 1)[0]
            rows = [
                r
                for r in rows
                if template == r["template_id"] or name == names.get(r["template_id"])
            ]
        if after := request.query_params.get("startedAfter"):
            since = shapes.parse_time(after, "startedAfter")
            rows = [r for r in rows if r["started_at"] >= since]
        ascending = request.query_params.get("order") == "asc"
        chunk, next_token = shapes.page(rows, limit, token, ascending=ascending)
        headers = {"x-next-token": next_token} if next_token else {}
        return JSONResponse([shapes.listed(r, client_id, names) for r in chunk], headers=headers)

    async def list_v1(request: Request, team: Row) -> Response:
        _, metadata, _, _ = shapes.list_query({"metadata": request.query_params.get("metadata")})
        rows = await control.list_sandboxes(team, ["running"])
        return JSONResponse([shapes.listed(r, client_id) for r in rows
                             if shapes.matches(r, metadata)])  # fmt: skip

    async def get_sandbox(request: Request, team: Row) -> Response:
        row = await control.get(team, sid(request))
        names = await control.templates.names(team, [row])
        return JSONResponse(shapes.detail(row, control.envd_token(row), client_id,
                                          control.settings.sandbox_domain, names))  # fmt: skip

    async def kill(request: Request, team: Row) -> Response:
        await control.kill(team, sid(request))
        return Response(status_code=204)

    async def set_timeout(request: Request, team: Row) -> Response:
        timeout = typed(await json_body(request), "timeout", int)
        if timeout is None:
            raise InvalidArgument("timeout is required (seconds from now)")
        await control.set_timeout(team, sid(request), timeout)
        return Response(status_code=204)

    async def update_network(request: Request, team: Row) -> Response:
        await control.update_network(team, sid(request), shapes.network_update(
            await json_body(request)))  # fmt: skip
        return Response(status_code=204)

    async def refresh(request: Request, team: Row) -> Response:
        duration = typed(await json_body(request), "duration", int, 0)
        await control.refresh(team, sid(request), duration)
        return Response(status_code=204)

    async def connect(request: Request, team: Row) -> Response:
        data = await json_body(request)
        timeout = typed(data, "timeout", int, default_timeout)
        # `memory: false` is the client's on_resume="reboot": the files only, started afresh.
        reboot = not typed(data, "memory", bool, True)
        row, resumed = await control.connect(team, sid(request), timeout, reboot)
        body = sandbox_body(row)
        return JSONResponse(body, status_code=201 if resumed else 200)

    async def pause(request: Request, team: Row) -> Response:
        # `requireHealthyGuest`: a pause always needs envd's cooperation no more than runsc's.
        memory = typed(await json_body(request), "memory", bool, True)
        await control.pause(team, sid(request), memory)
        return Response(status_code=204)

    async def resume(request: Request, team: Row) -> Response:
        timeout = typed(await json_body(request), "timeout", int, default_timeout)
        row, _ = await control.connect(team, sid(request), timeout)
        return JSONResponse(sandbox_body(row), 201)

    async def create_snapshot(request: Request, team: Row) -> Response:
        name, memory = shapes.snapshot_request(await json_body(request))
        row = await control.create_snapshot(team, sid(request), name, memory)
        return JSONResponse(shapes.snapshot_info(row), 201)

    async def list_snapshots(request: Request, team: Row) -> Response:
        params = request.query_params
        limit, token = shapes.paging(params)
        rows = await control.list_snapshots(team, params.get("sandboxID") or None,
                                            params.get("name") or None)  # fmt: skip
        chunk, next_token = shapes.page(rows, limit, token, by="created_at")
        headers = {"x-next-token": next_token} if next_token else {}
        return JSONResponse([shapes.snapshot_info(r) for r in chunk], headers=headers)

    async def delete_template(request: Request, team: Row) -> Response:
        # A team's own template, or one of its snapshots (E2B deletes both here); the
        # operator's templates are deleted with `vivarium template`.
        template_id = str(request.path_params["template_id"])
        if not await control.templates.delete(team, template_id):
            await control.delete_snapshot(team, template_id)
        return Response(status_code=204)

    async def fork(request: Request, team: Row) -> Response:
        count, timeout = shapes.fork_request(await json_body(request), default_timeout)
        results = await control.fork(team, sid(request), count, timeout)
        body = [{"error": r.to_json()} if isinstance(r, VivariumError)
                else {"sandbox": sandbox_body(r)}
                for r in results]  # fmt: skip
        return JSONResponse(body, 201)

    async def metrics(request: Request, team: Row) -> Response:
        start, end = shapes.time_range(request.query_params)
        samples = await control.metrics(team, sid(request), start, end)
        return JSONResponse([shapes.metric(s) for s in samples])

    async def latest_metrics(request: Request, team: Row) -> Response:
        latest = await control.latest_metrics(team, shapes.sandbox_ids(request.query_params))
        return JSONResponse({"sandboxes": {i: shapes.metric(s) for i, s in latest.items()}})

    async def events(request: Request, team: Row) -> Response:
        after, limit = shapes.event_query(request.query_params)
        sandbox_id = request.path_params.get("sandbox_id")
        rows = await control.events_of(team, sandbox_id, after, limit)
        return JSONResponse([event_shape(r) for r in rows])

    async def logs(request: Request, team: Row) -> Response:
        return JSONResponse(shapes.log_lines(await control.logs(team, sid(request))))

    async def templates(request: Request, team: Row) -> Response:
        rows = [template_routes.template_shape(r, ENVD_VERSION)
                for r in await control.templates.of_team(team)]  # fmt: skip
        for name in control.node.templates.names():
            if name not in RECIPES:
                continue  # a team's template, listed above for its own team only
            # The manifest is enough here (get() would checksum an unused checkpoint, blocking).
            template = control.node.templates.current(name)
            if template is None:
                continue
            rows.append({"templateID": name, "buildID": template.build_id, "aliases": [name],
                         "names": [name], "public": True, "buildStatus": "ready",
                         "cpuCount": control.default_cpu_count,
                         "memoryMB": control.settings.default_memory_mb, "diskSizeMB": 0,
                         "envdVersion": ENVD_VERSION,
                         "createdAt": template.manifest.get("created_at"),
                         "updatedAt": template.manifest.get("created_at"), "createdBy": None,
                         "lastSpawnedAt": None, "spawnCount": 0, "buildCount": 1})  # fmt: skip
        return JSONResponse(rows)

    async def list_keys(request: Request, team: Row) -> Response:
        return JSONResponse([shapes.team_key(r) for r in await control.list_keys(team)])

    async def create_key(request: Request, team: Row) -> Response:
        key, row = await control.create_key(team, _name(await json_body(request)))
        return JSONResponse({**shapes.team_key(row), "key": key}, status_code=201)

    async def revoke_key(request: Request, team: Row) -> Response:
        await control.revoke_key(team, str(request.path_params["key_id"]))
        return Response(status_code=204)

    async def create_team(request: Request, team: Row) -> Response:
        data = await json_body(request)
        name = _name(data)
        limit = typed(data, "maxSandboxes", int)
        if limit is not None and not 1 <= limit <= 100_000:
            raise InvalidArgument("maxSandboxes must be 1..100000")
        new_team, key = await control.create_team(team, name, limit)
        body = {"teamID": new_team["id"], "name": name, "apiKey": key,
                "maxSandboxes": new_team["max_sandboxes"]}  # fmt: skip
        return JSONResponse(body, status_code=201)

    async def list_nodes(request: Request, team: Row) -> Response:
        return JSONResponse([shapes.node(r) for r in await control.list_nodes(team)])

    def node_state(state: str) -> Callable[[Request, Row], Awaitable[Response]]:
        async def set_state(request: Request, team: Row) -> Response:
            row = await control.set_node_state(team, str(request.path_params["node_id"]), state)
            return JSONResponse(shapes.node(row))

        return set_state

    async def http_error(request: Request, exc: Exception) -> Response:
        status = exc.status_code if isinstance(exc, HTTPException) else 500
        message = {404: f"{request.url.path} was not found on this server",
                   405: f"{request.method} is not allowed on {request.url.path}"}  # fmt: skip
        return JSONResponse({"code": status, "message": message.get(status, "error")}, status)

    sandbox = "/sandboxes/{sandbox_id}"
    routes = [
        Route("/health", health),
        Route("/openapi.json", openapi),
        Route("/metrics", prometheus),
        Route("/sandboxes", authed(create_v1), methods=["POST"]),
        Route("/v2/sandboxes", authed(create_v2), methods=["POST"]),
        Route("/sandboxes", authed(list_v1), methods=["GET"]),
        Route("/v2/sandboxes", authed(list_v2), methods=["GET"]),
        Route("/sandboxes/metrics", authed(latest_metrics), methods=["GET"]),
        Route(sandbox, authed(get_sandbox), methods=["GET"]),
        Route(sandbox, authed(kill), methods=["DELETE"]),
        Route(sandbox + "/timeout", authed(set_timeout), methods=["POST"]),
        Route(sandbox + "/refreshes", authed(refresh), methods=["POST"]),
        Route(sandbox + "/network", authed(update_network), methods=["PUT"]),
        Route(sandbox + "/connect", authed(connect), methods=["POST"]),
        Route("/v2" + sandbox + "/connect", authed(connect), methods=["POST"]),
        Route(sandbox + "/pause", authed(pause), methods=["POST"]),
        Route(sandbox + "/resume", authed(resume), methods=["POST"]),
        Route(sandbox + "/metrics", authed(metrics), methods=["GET"]),
        Route(sandbox + "/logs", authed(logs), methods=["GET"]),
        Route(sandbox + "/events", authed(events), methods=["GET"]),
        Route("/events", authed(events), methods=["GET"]),
        Route("/v2" + sandbox + "/logs", authed(logs), methods=["GET"]),
        Route(sandbox + "/snapshots", authed(create_snapshot), methods=["POST"]),
        Route(sandbox + "/fork", authed(fork), methods=["POST"]),
        Route("/snapshots", authed(list_snapshots), methods=["GET"]),
        Route("/templates", authed(templates), methods=["GET"]),
        *template_routes.routes(control.templates, authed),
        Route("/templates/{template_id}", authed(delete_template), methods=["DELETE"]),
        Route("/api-keys", authed(list_keys), methods=["GET"]),
        Route("/api-keys", authed(create_key), methods=["POST"]),
        Route("/api-keys/{key_id}", authed(revoke_key), methods=["DELETE"]),
        Route("/teams", authed(create_team), methods=["POST"]),
        Route("/nodes", authed(list_nodes), methods=["GET"]),
        Route("/nodes/{node_id}/drain", authed(node_state("draining")), methods=["POST"]),
        Route("/nodes/{node_id}/undrain", authed(node_state("ready")), methods=["POST"]),
        *volume_routes.routes(control, authed),
        dashboard.mount(control.settings),
    ]
    return Starlette(routes=routes, exception_handlers={HTTPException: http_error},
                     middleware=[Middleware(telemetry.RequestMetrics, routes=routes)])  # fmt: skip

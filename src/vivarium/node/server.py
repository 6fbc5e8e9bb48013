"""The node's HTTP API, served on a root-only Unix socket (never on a network port).

The control plane and the CLI use it; E2B-shaped REST lives in `vivarium.api`.
"""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from vivarium import telemetry
from vivarium.errors import InvalidArgument
from vivarium.httpjson import guarded, json_body, str_map, typed
from vivarium.network.egress import Egress
from vivarium.node.node import Node
from vivarium.node.request import CreateRequest


def create_app(node: Node) -> Starlette:
    @guarded
    async def health(request: Request) -> Response:
        return JSONResponse({"status": "ok"})

    @guarded
    async def metrics(request: Request) -> Response:
        await telemetry.refresh_node(node)
        return Response(telemetry.exposition(), media_type=telemetry.CONTENT_TYPE)

    @guarded
    async def info(request: Request) -> Response:
        return JSONResponse(node.info())

    @guarded
    async def create(request: Request) -> Response:
        data = await json_body(request)
        req = CreateRequest(
            template=typed(data, "template", str, "base"),
            timeout_s=typed(data, "timeout", int),
            metadata=str_map(data, "metadata"),
            env_vars=str_map(data, "env_vars"),
            egress=Egress(internet=typed(data, "allow_internet_access", bool, True)),
            memory_mb=typed(data, "memory_mb", int),
            cpus=typed(data, "cpus", (int, float)),
        )
        record = await node.create(req)
        return JSONResponse(record.to_json(), status_code=201)

    @guarded
    async def list_sandboxes(request: Request) -> Response:
        return JSONResponse([r.to_json() for r in node.list_sandboxes()])

    @guarded
    async def get_sandbox(request: Request) -> Response:
        return JSONResponse(node.get(request.path_params["sandbox_id"]).to_json())

    @guarded
    async def kill(request: Request) -> Response:
        await node.kill(request.path_params["sandbox_id"])
        return Response(status_code=204)

    @guarded
    async def set_timeout(request: Request) -> Response:
        data = await json_body(request)
        timeout = typed(data, "timeout", int)
        if timeout is None:
            raise InvalidArgument("timeout is required")
        record = await node.set_timeout(request.path_params["sandbox_id"], timeout)
        return JSONResponse(record.to_json())

    @guarded
    async def exec_command(request: Request) -> Response:
        data = await json_body(request)
        cmd = typed(data, "cmd", list)
        if not cmd:
            raise InvalidArgument("cmd is required: a non-empty list of strings")
        result = await node.exec(
            request.path_params["sandbox_id"], cmd,
            user=typed(data, "user", str, "user"), env=str_map(data, "env"),
            cwd=typed(data, "cwd", str), timeout_s=typed(data, "timeout", (int, float), 60),
        )  # fmt: skip
        return JSONResponse(
            {"exit_code": result.returncode, "stdout": result.stdout, "stderr": result.stderr}
        )

    return Starlette(
        routes=[
            Route("/health", health),
            Route("/node", info),
            Route("/metrics", metrics),
            Route("/sandboxes", create, methods=["POST"]),
            Route("/sandboxes", list_sandboxes, methods=["GET"]),
            Route("/sandboxes/{sandbox_id}", get_sandbox, methods=["GET"]),
            Route("/sandboxes/{sandbox_id}", kill, methods=["DELETE"]),
            Route("/sandboxes/{sandbox_id}/timeout", set_timeout, methods=["POST"]),
            Route("/sandboxes/{sandbox_id}/exec", exec_command, methods=["POST"]),
        ]
    )

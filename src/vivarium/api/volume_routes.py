"""E2B's volume routes: `/volumes` (a team's volumes, with its API key) and the volume content
API, `/volumecontent/{id}/...` (a volume's files, with the volume's bearer token). The client
sends content requests to `E2B_VOLUME_API_URL`: this same listener."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import os
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from vivarium.api import shapes
from vivarium.api.control import ControlPlane
from vivarium.api.volumes import HANDOVER
from vivarium.cluster import secret
from vivarium.errors import InvalidArgument, NotFound, VivariumError
from vivarium.httpjson import guarded, json_body, typed
from vivarium.node.volume_files import VolumeFiles

Row = dict[str, Any]
Authed = Callable[[Callable[[Request, Row], Awaitable[Response]]], Callable[..., Any]]
READ_CHUNK = 1 << 20


def _int(request: Request, name: str) -> int | None:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return None
    try:
        return int(raw, 0) if raw.startswith("0o") else int(raw)
    except ValueError:
        raise InvalidArgument(f"{name} must be a whole number, not {raw!r}") from None


def _bool(request: Request, name: str) -> bool:
    raw = (request.query_params.get(name) or "false").lower()
    if raw not in ("true", "false", "1", "0"):
        raise InvalidArgument(f"{name} must be true or false, not {raw!r}")
    return raw in ("true", "1")


def _path(request: Request) -> str:
    path = request.query_params.get("path")
    if path is None:
        raise InvalidArgument("path is required (a path inside the volume, e.g. /dir/file)")
    return path


def routes(control: ControlPlane, authed: Authed) -> list[Route]:
    catalog = control.volumes

    async def create(request: Request, team: Row) -> Response:
        name = typed(await json_body(request), "name", str)
        if not name:
            raise InvalidArgument("name is required")
        row = await catalog.create(team, name)
        return JSONResponse(shapes.volume(row, catalog.token(row["id"])), status_code=201)

    async def list_volumes(request: Request, team: Row) -> Response:
        return JSONResponse([shapes.volume(r) for r in await catalog.all(team)])

    async def get(request: Request, team: Row) -> Response:
        row = await catalog.get(team, str(request.path_params["volume_id"]))
        return JSONResponse(shapes.volume(row, catalog.token(row["id"])))

    async def delete(request: Request, team: Row) -> Response:
        await catalog.delete(team, str(request.path_params["volume_id"]))
        return Response(status_code=204)

    async def files(request: Request) -> VolumeFiles:
        return await catalog.files(str(request.path_params["volume_id"]),
                                   request.headers.get("authorization", ""))  # fmt: skip

    @guarded
    async def stat(request: Request) -> Response:
        entry = await asyncio.to_thread((await files(request)).stat, _path(request))
        return JSONResponse(entry)

    @guarded
    async def remove(request: Request) -> Response:
        await asyncio.to_thread((await files(request)).remove, _path(request))
        return Response(status_code=204)

    @guarded
    async def update(request: Request) -> Response:
        volume = await files(request)
        data = await json_body(request)
        entry = await asyncio.to_thread(
            volume.update, _path(request), uid=typed(data, "uid", int),
            gid=typed(data, "gid", int), mode=typed(data, "mode", int),
        )  # fmt: skip
        return JSONResponse(entry)

    @guarded
    async def list_dir(request: Request) -> Response:
        volume = await files(request)
        depth = _int(request, "depth")
        entries = await asyncio.to_thread(volume.list_dir, _path(request),
                                          1 if depth is None else depth)  # fmt: skip
        return JSONResponse(entries)

    @guarded
    async def make_dir(request: Request) -> Response:
        volume = await files(request)
        entry = await asyncio.to_thread(
            volume.make_dir, _path(request), uid=_int(request, "uid"), gid=_int(request, "gid"),
            mode=_int(request, "mode"), force=_bool(request, "force"),
        )  # fmt: skip
        return JSONResponse(entry, status_code=201)

    @guarded
    async def read(request: Request) -> Response:
        volume, path = await files(request), _path(request)
        fd, _ = await asyncio.to_thread(volume.open_read, path)  # errors answered here
        os.close(fd)

        async def chunks() -> AsyncIterator[bytes]:
            # Opened here, so that no descriptor is left open if the response never starts.
            fd, _ = await asyncio.to_thread(volume.open_read, path)
            try:
                while chunk := await asyncio.to_thread(os.read, fd, READ_CHUNK):
                    yield chunk
            finally:
                os.close(fd)

        return StreamingResponse(chunks(), media_type="application/octet-stream")

    @guarded
    async def write(request: Request) -> Response:
        volume = await files(request)
        pending = await asyncio.to_thread(
            volume.open_write, _path(request), uid=_int(request, "uid"),
            gid=_int(request, "gid"), mode=_int(request, "mode"), force=_bool(request, "force"),
        )  # fmt: skip
        try:
            async for chunk in request.stream():
                if chunk:
                    await asyncio.to_thread(pending.write, chunk)
            entry = await asyncio.to_thread(pending.commit)
        except VivariumError:  # a full volume, say: the client hears why once it has sent all
            await asyncio.to_thread(pending.abort)
            with contextlib.suppress(RuntimeError):  # "Stream consumed": all was read already
                async for _ in request.stream():
                    pass
            raise
        except BaseException:
            await asyncio.to_thread(pending.abort)
            raise
        return JSONResponse(entry, status_code=201)

    def writes(handler: Callable[[Request], Awaitable[Response]]) -> Callable[..., Any]:
        """A route that changes the volume: in a cluster, not handed to another node while it
        runs (api/volumes.py)."""

        async def endpoint(request: Request) -> Response:
            async with catalog.writing(str(request.path_params["volume_id"])):
                return await handler(request)

        return endpoint

    credential = secret.node_credential(control.settings.cluster_secret)

    @guarded
    async def hand_over(request: Request) -> Response:
        """Another node takes this node's volume (api/volumes.py). Only a cluster's node has
        this route, and it answers only another node (the cluster's API never passes on the
        credential nodes send each other)."""
        sent = request.headers.get(secret.NODE_HEADER, "")
        if not hmac.compare_digest(sent.encode(), credential.encode()):
            raise NotFound(f"{request.url.path} was not found on this server")
        to = typed(await json_body(request), "to", str)
        if not to:
            raise InvalidArgument("to (the node taking the volume) is required")
        await catalog.hand_over(str(request.path_params["volume_id"]), to)
        return JSONResponse({"volumeID": request.path_params["volume_id"], "nodeID": to})

    content = "/volumecontent/{volume_id}"
    cluster = [Route(HANDOVER, hand_over, methods=["POST"])]
    return [
        *(cluster if control.settings.role == "node" else []),
        Route("/volumes", authed(create), methods=["POST"]),
        Route("/volumes", authed(list_volumes), methods=["GET"]),
        Route("/volumes/{volume_id}", authed(get), methods=["GET"]),
        Route("/volumes/{volume_id}", authed(delete), methods=["DELETE"]),
        Route(content + "/path", stat, methods=["GET"]),
        Route(content + "/path", writes(remove), methods=["DELETE"]),
        Route(content + "/path", writes(update), methods=["PATCH"]),
        Route(content + "/dir", list_dir, methods=["GET"]),
        Route(content + "/dir", writes(make_dir), methods=["POST"]),
        Route(content + "/file", read, methods=["GET"]),
        Route(content + "/file", writes(write), methods=["PUT"]),
    ]

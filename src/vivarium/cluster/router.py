"""The public API of a cluster (`vivarium serve --role api`): every E2B request goes on to the
node that should answer it, with the caller's key and the cluster secret.

- A create is placed (placement.py) and tried node after node while nodes refuse it (draining,
  full, unreachable before it was sent). A create bound to one node, from a team's snapshot,
  template or volume kept there, goes to that node.
- A request that names a sandbox, snapshot, template or volume goes to the node the catalog
  says holds it.
- Anything else (listings, keys, teams, nodes, events: the catalog's business) goes to the first
  ready node, so that a multi-request exchange (a template build) stays on one node.

Nodes check the key themselves, as in the all-in-one server: the router holds no state but
the catalog's, so replicas can be added and lost freely.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from vivarium.api import nodes, store
from vivarium.api.store import Row
from vivarium.cluster.directory import Directory
from vivarium.cluster.placement import Placement
from vivarium.cluster.secret import HEADER
from vivarium.errors import NodeUnavailable, VivariumError

log = logging.getLogger(__name__)

MAX_CREATE_BODY = 1 << 20
# Hop-by-hop headers (RFC 9110 §7.6.1), and the secret a caller must not get to choose.
DROPPED = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
                     "te", "trailer", "transfer-encoding", "upgrade", "host", HEADER})  # fmt: skip
# What a node answers when another node should be tried: it takes no new sandboxes.
RETRY_CODES = frozenset({"node_unavailable", "node_full", "host_not_ready"})
# The path segment after which a request names an object a node holds.
KINDS = {"sandboxes": "sandbox", "volumes": "volume", "templates": "template"}


@dataclass(frozen=True)
class Target:
    """Where a request goes: a node by id, or placed (a create: among the nodes holding what
    it names, `bound`)."""

    node_id: str | None = None
    place: bool = False
    bound: bool = False


class Router:
    def __init__(self, directory: Directory, secret: str, verify: Any = True) -> None:
        self.directory = directory
        self.placement = Placement(directory)
        self._secret = secret
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(600.0, connect=5.0), verify=verify,
            limits=httpx.Limits(max_connections=1000, max_keepalive_connections=100),
        )  # fmt: skip

    async def close(self) -> None:
        await self._http.aclose()

    async def handle(self, request: Request) -> Response:
        try:
            if request.url.path == "/health":
                return JSONResponse({"status": "ok"})
            target = await self._target(request)
            if target.place:
                body = await request.body()
                if len(body) > MAX_CREATE_BODY:
                    return JSONResponse({"code": 413, "message": "request body too large"}, 413)
                only = await self._bound(request, body) if target.bound else None
                return await self._placed(request, body, only)
            node = await self._node(target.node_id)
            if request.url.path.startswith("/nodes/"):  # a drain: this replica knows at once
                self.directory.forget_nodes()
            return await self._forward(request, node, request.stream())
        except VivariumError as exc:
            return JSONResponse(exc.to_json(), exc.http_status)

    async def _target(self, request: Request) -> Target:
        if _is_create(request):
            return Target(place=True, bound=True)
        parts = [p for p in request.url.path.split("/") if p]
        if parts and parts[0] in ("v2", "v3"):
            parts = parts[1:]
        if len(parts) >= 2 and parts[0] in KINDS and parts[1] not in ("metrics", "aliases", "tags"):
            kind = KINDS[parts[0]]
            resuming = request.method == "POST" and parts[2:] in (["connect"], ["resume"])
            if kind == "sandbox" and resuming:
                home = await self.directory.sandbox_home(parts[1])
                if home is not None and home[1] == "paused" and not await self._alive(home[0]):
                    return Target(place=True)  # its node is lost: resumed on another
            owner = await self.directory.owner(kind, parts[1])
            if owner is None and kind == "template":  # DELETE /templates/{snapshot id}
                owner = await self.directory.owner("snapshot", parts[1])
            # A lost node's: any node answers from the catalog (its running sandboxes have
            # ended; a kill of a paused one deletes its row, the snapshot stays in the store).
            if owner is not None and await self._alive(owner):
                return Target(node_id=owner)
        return Target()

    async def _bound(self, request: Request, body: bytes) -> frozenset[str] | None:
        """The nodes a create may go to: the one holding the team's snapshot, template or
        volumes it names; None for any."""
        try:
            data = json.loads(body or b"{}")
        except ValueError:
            return None  # the node answers why
        if not isinstance(data, dict):
            return None
        team = await store.team_for_key(self.directory.engine, request.headers.get("x-api-key", ""))
        if team is None:
            return None
        held: set[str] = set()
        wanted = data.get("templateID") or data.get("name")
        if isinstance(wanted, str) and wanted:
            engine, name = self.directory.engine, wanted.split(":", 1)[0]
            for row in (await store.team_snapshot(engine, team["id"], wanted),
                        await store.team_template(engine, team["id"], name)):  # fmt: skip
                if row is not None:
                    held.add(row["node_id"])
        for mount in data.get("volumeMounts") or []:
            if isinstance(mount, dict) and isinstance(mount.get("name"), str):
                volume = await store.team_volume(self.directory.engine, team["id"],
                                                 name=mount["name"])  # fmt: skip
                if volume is not None:
                    held.add(volume["node_id"])
        return frozenset(held) if held else None

    async def _alive(self, node_id: str) -> bool:
        node = await self.directory.node(node_id)
        return node is not None and nodes.status(node) != "unhealthy"

    async def _node(self, node_id: str | None) -> Row:
        if node_id is not None:
            node = await self.directory.node(node_id)
            if node is None:
                raise NodeUnavailable(f"node {node_id!r} is not registered",
                                      "see `vivarium node list`")  # fmt: skip
            return node
        ready = await self.directory.ready()
        if not ready:
            raise NodeUnavailable(
                "no node is ready",
                "start a node agent (`vivarium serve --role node`), or undrain one",
            )
        return ready[0]

    async def _placed(self, request: Request, body: bytes, only: frozenset[str] | None) -> Response:
        candidates = await self.placement.candidates(set(only) if only is not None else None)
        if not candidates:
            where = f" among {', '.join(sorted(only))}, which hold what it names" if only else ""
            raise NodeUnavailable(f"no node is ready to start a sandbox{where}",
                                  "start or undrain a node (`vivarium node list`)")  # fmt: skip
        refused: Response | None = None
        for node in candidates:
            with self.placement.starting(node["id"]):
                try:
                    response = await self._forward(request, node, body, buffered=True)
                except NodeUnavailable as exc:
                    refused = JSONResponse(exc.to_json(), exc.http_status)
                    continue
            if not _refused(response):
                return response
            log.info("node %s refused a create: %s", node["id"], bytes(response.body)[:200])
            refused = response
        assert refused is not None
        return refused

    async def _forward(self, request: Request, node: Row, content: bytes | AsyncIterator[bytes],
                       *, buffered: bool = False) -> Response:  # fmt: skip
        """The request, sent on to `node`; its answer, streamed back (read whole if `buffered`).
        NodeUnavailable if it could not be sent at all: then the node did nothing."""
        url = node["address"].rstrip("/") + request.url.path
        if request.url.query:
            url += "?" + request.url.query
        headers = [(k, v) for k, v in request.headers.items() if k not in DROPPED]
        headers.append((HEADER, self._secret))
        if request.client is not None:
            headers.append(("x-forwarded-for", request.client.host))
        outgoing = self._http.build_request(request.method, url, headers=headers, content=content)
        try:
            response = await self._http.send(outgoing, stream=True)
        except (httpx.ConnectError, httpx.ConnectTimeout) as exc:
            self.directory.forget_nodes()
            raise NodeUnavailable(
                f"node {node['id']!r} at {node['address']} does not answer ({type(exc).__name__})",
                "see `vivarium node list`",
            ) from None
        except httpx.TransportError as exc:
            raise NodeUnavailable(
                f"node {node['id']!r} did not answer {request.method} {request.url.path}: {exc!r}",
                "retry; see the node's log",
            ) from None
        kept = {k: v for k, v in response.headers.items() if k not in DROPPED}
        if buffered:
            try:
                data = await response.aread()
            finally:
                await response.aclose()
            return Response(data, response.status_code, headers=kept)
        return StreamingResponse(response.aiter_raw(), response.status_code, headers=kept,
                                 background=BackgroundTask(response.aclose))  # fmt: skip


def _is_create(request: Request) -> bool:
    path = request.url.path.rstrip("/")
    return request.method == "POST" and path in ("/sandboxes", "/v2/sandboxes", "/volumes",
                                                  "/v3/templates")  # fmt: skip


def _refused(response: Response) -> bool:
    """A node's no to a new sandbox that another node may say yes to."""
    if response.status_code not in (429, 503):
        return False
    try:
        code = json.loads(bytes(response.body)).get("error_code")
    except (ValueError, AttributeError):
        return False
    return code in RETRY_CODES


def create_app(router: Router) -> Starlette:
    methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS"]
    return Starlette(routes=[Route("/{path:path}", router.handle, methods=methods)])

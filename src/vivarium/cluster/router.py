"""The public API of a cluster (`vivarium serve --role api`): every E2B request goes on to the
node that should answer it, with the caller's key and the cluster secret.

- A create is placed (placement.py) and tried node after node while nodes refuse it (draining,
  full, unreachable before it was sent). A create from a team's snapshot goes to the node that
  took it and one mounting a volume to the node that keeps it, while that node is ready (else
  elsewhere, where it is fetched or the volume moved: api/volumes.py), and one from a team's
  template to any node with the runsc of the node that built it (the build is fetched where it
  is missing).
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
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import httpx
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from vivarium.api import store
from vivarium.api.store import Row
from vivarium.cluster.directory import Directory
from vivarium.cluster.placement import Placement
from vivarium.cluster.secret import HEADER, NODE_HEADER, REFUSED
from vivarium.errors import InvalidArgument, NodeUnavailable, UpstreamFailed, VivariumError
from vivarium.httpjson import error_response, parse_json, small_body

log = logging.getLogger(__name__)

# Hop-by-hop headers (RFC 9110 §7.6.1), what the router sets itself, and the secret a caller
# must not get to choose. Host passes: the node answers with links to where the client is.
DROPPED = frozenset({"connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
                     "te", "trailer", "transfer-encoding", "upgrade", "x-forwarded-for",
                     "x-forwarded-proto", HEADER, NODE_HEADER})  # fmt: skip
# What a node answers when another node should be tried: it takes no new sandboxes.
RETRY_CODES = frozenset({"node_unavailable", "node_full", "host_not_ready"})
# The path segment after which a request names an object a node holds.
KINDS = {"sandboxes": "sandbox", "volumes": "volume", "volumecontent": "volume",
         "templates": "template"}  # fmt: skip


@dataclass(frozen=True)
class Target:
    """Where a request goes: a node by id (None: the first ready one), or placed (a create:
    among the nodes holding what it names)."""

    node_id: str | None = None
    place: bool = False


class Router:
    def __init__(self, directory: Directory, secret: str, verify: Any = True) -> None:
        self.directory = directory
        self.placement = Placement(directory)
        self._secret = secret
        self._http = httpx.AsyncClient(
            timeout=httpx.Timeout(600.0, connect=5.0), verify=verify,
            trust_env=False,  # never an HTTP_PROXY of the environment: keys and the secret
            limits=httpx.Limits(max_connections=1000, max_keepalive_connections=100),
        )  # fmt: skip

    async def close(self) -> None:
        await self._http.aclose()

    async def handle(self, request: Request) -> Response:
        try:
            if request.url.path == "/health":
                return JSONResponse({"status": "ok"})
            if _for_nodes(request):
                return JSONResponse({"code": 404, "message": f"{request.url.path} was not "
                                     "found on this server"}, 404)  # fmt: skip
            target = await self._target(request)
            if target.place:
                body = await small_body(request)  # read whole: it may go to several nodes
                return await self._placed(request, body, await self._bound(request, body))
            node = await self._node(target.node_id)
            if request.url.path.startswith("/nodes/"):  # a drain: this replica knows at once
                self.directory.forget_nodes()
            return await self._forward(request, node, request.stream())
        except VivariumError as exc:
            return error_response(exc)
        except Exception:
            log.exception("unexpected error routing %s %s", request.method, request.url.path)
            return JSONResponse({"code": 500, "message": "internal error; see the server log"},
                                status_code=500)  # fmt: skip

    async def _target(self, request: Request) -> Target:
        if _is_create(request):
            return Target(place=True)
        parts = [p for p in request.url.path.split("/") if p]
        if parts and parts[0] in ("v2", "v3"):
            parts = parts[1:]
        if len(parts) < 2 or parts[0] not in KINDS or parts[1] in ("metrics", "aliases", "tags"):
            return Target()
        kind, object_id = KINDS[parts[0]], parts[1]
        if kind == "sandbox":
            home = await self.directory.sandbox_home(object_id)
            if home is None:
                return Target()
            node_id, state = home
            resuming = request.method == "POST" and parts[2:] in (["connect"], ["resume"])
            if await self._alive(node_id) and not (resuming and state == "paused"
                                                   and not await self._ready(node_id)):  # fmt: skip
                return Target(node_id=node_id)
            # Its node is lost (or draining, for a resume): every request for it goes to one
            # node, so that a kill and a resume racing meet in one place.
            stand_in = await self.directory.stand_in(object_id)
            return Target(node_id=stand_in["id"] if stand_in else None)
        owner = await self.directory.owner(kind, object_id)
        if owner is None and kind == "template":  # DELETE /templates/{snapshot id}
            owner = await self.directory.owner("snapshot", object_id)
        if owner is None and kind == "template":  # by name: the caller's own
            owner = await self._named_template(request, object_id)
        if owner is not None and await self._alive(owner):
            return Target(node_id=owner)
        if owner is not None and kind == "volume":  # its node is lost: one node takes it over
            stand_in = await self.directory.stand_in(object_id)
            return Target(node_id=stand_in["id"] if stand_in else None)
        return Target()

    async def _named_template(self, request: Request, name: str) -> str | None:
        """The node holding the caller's template or snapshot of that name (a delete by name)."""
        engine = self.directory.engine
        team = await store.team_for_key(engine, request.headers.get("x-api-key", ""))
        if team is None:
            return None
        for row in (await store.team_template(engine, team["id"], name.split(":", 1)[0]),
                    await store.team_snapshot(engine, team["id"], name)):  # fmt: skip
            if row is not None:
                return str(row["node_id"])
        return None

    async def _bound(self, request: Request, body: bytes) -> frozenset[str] | None:
        """The nodes a create may go to: those holding what it names, or able to fetch it
        (None: any node)."""
        try:
            data = parse_json(body or b"{}")
        except InvalidArgument:
            return None  # the node answers why
        if not isinstance(data, dict):
            return None
        team = await store.team_for_key(self.directory.engine, request.headers.get("x-api-key", ""))
        if team is None:
            return None
        bound: frozenset[str] | None = None

        def within(nodes: frozenset[str]) -> None:
            nonlocal bound
            bound = nodes if bound is None else bound & nodes

        wanted = data.get("templateID") or data.get("name")
        if isinstance(wanted, str) and wanted:
            engine, name = self.directory.engine, wanted.split(":", 1)[0]
            # A snapshot on its node, where its files are (on another that restores what that
            # node made while it is draining or lost: it fetches the snapshot); a team
            # template on any node that restores what its builder built (the others fetch the
            # build); volumes as _volume_home says.
            snapshot = await store.team_snapshot(engine, team["id"], wanted)
            if snapshot is not None:
                home = snapshot["node_id"]
                alike = await self.directory.alike(home) or frozenset({home})
                nodes = frozenset({home}) if await self._ready(home) else alike
                for mount in snapshot["volume_mounts"]:  # where its volumes are, if they moved
                    volume = await store.get_volume(engine, mount["volume_id"])
                    if volume is not None:
                        there = await self._volume_home(volume)
                        nodes = nodes & there or alike & there
                within(nodes)
            template = await store.team_template(engine, team["id"], name)
            if template is not None and (same := await self.directory.alike(template["node_id"])):
                within(same)
        mounts = data.get("volumeMounts")
        for mount in mounts if isinstance(mounts, list) else []:
            if isinstance(mount, dict) and isinstance(mount.get("name"), str):
                volume = await store.team_volume(self.directory.engine, team["id"],
                                                 name=mount["name"])  # fmt: skip
                if volume is not None:
                    within(await self._volume_home(volume))
        return bound

    async def _volume_home(self, volume: Row) -> frozenset[str]:
        """Where a sandbox mounting the volume may start: its node while it is ready, else the
        one node that takes it over (the same from every replica)."""
        if await self._ready(volume["node_id"]):
            return frozenset({volume["node_id"]})
        stand_in = await self.directory.stand_in(volume["id"])
        return frozenset({stand_in["id"]}) if stand_in else frozenset()

    async def _alive(self, node_id: str) -> bool:
        return await self.directory.status(node_id) in ("ready", "draining")

    async def _ready(self, node_id: str) -> bool:
        return await self.directory.status(node_id) == "ready"

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
                except NodeUnreachable as exc:
                    refused = error_response(exc)
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
        NodeUnreachable if it could not be sent at all (the node did nothing: another may be
        tried); UpstreamFailed if the node took it and did not answer in full."""
        target = request.scope["raw_path"] or request.url.path.encode()
        if request.scope["query_string"]:
            target += b"?" + request.scope["query_string"]
        url = node["address"].rstrip("/") + target.decode("latin-1")
        headers = [(k, v) for k, v in request.headers.items() if k not in DROPPED]
        # The node builds the links it answers with (upload URLs) from what the client used;
        # the client's own X-Forwarded-For is not passed on (a node trusts the first entry).
        if request.client is not None:
            headers.append(("x-forwarded-for", request.client.host))
        headers += [("x-forwarded-proto", request.url.scheme), (HEADER, self._secret)]
        outgoing = self._http.build_request(request.method, url, headers=headers, content=content)
        try:
            response = await self._http.send(outgoing, stream=True)
        except (httpx.ConnectError, httpx.ConnectTimeout, httpx.PoolTimeout) as exc:
            self.directory.forget_nodes()
            raise NodeUnreachable(
                f"node {node['id']!r} at {node['address']} does not answer ({type(exc).__name__})",
                "see `vivarium node list`",
            ) from None
        except httpx.TransportError as exc:
            raise _failed(node, request, exc) from None
        if response.status_code == 401 and REFUSED in response.headers:
            await response.aclose()
            raise NodeUnreachable(
                f"node {node['id']!r} refused this API replica's cluster secret",
                "set the same VIVARIUM_CLUSTER_SECRET on the API replicas and the nodes",
            )
        kept = [(k.encode("latin-1"), v.encode("latin-1"))
                for k, v in response.headers.multi_items() if k not in DROPPED]  # fmt: skip
        if buffered:
            try:
                data = b"".join([chunk async for chunk in response.aiter_raw()])
            except httpx.TransportError as exc:
                raise _failed(node, request, exc) from None
            finally:
                await response.aclose()
            answer: Response = Response(data, response.status_code)
        else:
            answer = StreamingResponse(response.aiter_raw(), response.status_code,
                                       background=BackgroundTask(response.aclose))  # fmt: skip
        answer.raw_headers = kept  # as the node sent them (content-length included)
        return answer


class NodeUnreachable(NodeUnavailable):
    """The request could not be sent: the node did nothing with it."""


def _failed(node: Row, request: Request, exc: Exception) -> UpstreamFailed:
    return UpstreamFailed(
        f"node {node['id']!r} did not answer {request.method} {request.url.path} in full "
        f"({exc!r}); it may have acted on it",
        "look before retrying (a create may have made a sandbox: list them)",
    )


def _for_nodes(request: Request) -> bool:
    """Whether the request names a route for nodes only, or could reach one: a path with dot
    segments (httpx resolves them before sending)."""
    raw = urllib.parse.unquote((request.scope.get("raw_path") or b"").decode("latin-1"))
    segments = raw.split("/") + request.url.path.split("/")
    return request.url.path.startswith("/cluster/") or any(s in (".", "..") for s in segments)


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

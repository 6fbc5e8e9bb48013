"""Prometheus metrics (`GET /metrics` on the API and on the node socket), with the official
`prometheus_client`: one registry for the process (node, API and proxy run in one), so tests and
several servers in one interpreter never share counters.

Counters and histograms move where things happen; the gauges (sandboxes by state, the node's
capacity, the snapshot store's size) are read when Prometheus scrapes (`refresh_node`,
`refresh_catalog`).
"""

from __future__ import annotations

import asyncio
import functools
import hmac
import ipaddress
import os
import time
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, ParamSpec, TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.routing import Match, Route
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from vivarium.config import Settings
from vivarium.errors import Forbidden, NotFound, Unauthenticated

if TYPE_CHECKING:
    from vivarium.node.node import Node

P = ParamSpec("P")
T = TypeVar("T")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
REGISTRY = CollectorRegistry()
# From a warm create (tens of ms) to a resume of a large snapshot on a busy host (a minute).
BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)

OPERATIONS = Histogram(
    "vivarium_operation_seconds", "Time of sandbox operations, by operation and outcome",
    ["operation", "outcome"], buckets=BUCKETS, registry=REGISTRY,
)  # fmt: skip
API_REQUESTS = Counter(
    "vivarium_api_requests", "API requests, by route template, method and status",
    ["route", "method", "status"], registry=REGISTRY,
)  # fmt: skip
PROXY_REQUESTS = Counter(
    "vivarium_proxy_requests",
    "Sandbox proxy requests: forwarded to a sandbox, or answered by the proxy with a status",
    ["outcome"], registry=REGISTRY,
)  # fmt: skip
SANDBOXES = Gauge(
    "vivarium_sandboxes", "Sandboxes in the catalog, by state and template",
    ["state", "template"], registry=REGISTRY,
)  # fmt: skip
NODE_SANDBOXES = Gauge(
    "vivarium_node_sandboxes", "Sandboxes this node runs, by template", ["template"],
    registry=REGISTRY,
)  # fmt: skip
NODE_CAPACITY = Gauge("vivarium_node_capacity_sandboxes",
                      "Sandboxes this node may run at once", registry=REGISTRY)  # fmt: skip
NODE_OCCUPIED = Gauge("vivarium_node_occupied_sandboxes",
                      "Running, starting and warm sandboxes: what counts against the capacity",
                      registry=REGISTRY)  # fmt: skip
NODE_WARM = Gauge("vivarium_node_warm_sandboxes", "Warm sandboxes waiting, by template",
                  ["template"], registry=REGISTRY)  # fmt: skip
SNAPSHOT_BYTES = Gauge("vivarium_snapshot_store_bytes",
                       "Bytes of the node's local snapshot store (snapshots and chunks)",
                       registry=REGISTRY)  # fmt: skip
VOLUMES = Gauge("vivarium_node_volumes", "Volumes on this node", registry=REGISTRY)

SIZE_EVERY_S = 60.0  # walking the snapshot store is not free: at most this often
_sized: tuple[float, int] = (0.0, 0)


@contextmanager
def timed(operation: str) -> Iterator[None]:
    """Observe how long `operation` takes, labelled ok or error."""
    start = time.perf_counter()
    outcome = "error"
    try:
        yield
        outcome = "ok"
    finally:
        OPERATIONS.labels(operation, outcome).observe(time.perf_counter() - start)


def timed_operation(
    operation: str,
) -> Callable[[Callable[P, Awaitable[T]]], Callable[P, Awaitable[T]]]:
    """`timed` around every call of an async function."""

    def decorate(fn: Callable[P, Awaitable[T]]) -> Callable[P, Awaitable[T]]:
        @functools.wraps(fn)
        async def wrapper(*args: P.args, **kwargs: P.kwargs) -> T:
            with timed(operation):
                return await fn(*args, **kwargs)

        return wrapper

    return decorate


def _tree_bytes(root: Path) -> int:
    total = 0
    for directory, _dirs, files in os.walk(root):
        for name in files:
            try:
                total += os.lstat(os.path.join(directory, name)).st_blocks * 512
            except OSError:
                continue
    return total


async def refresh_node(node: Node) -> None:
    global _sized
    NODE_SANDBOXES.clear()
    for record in node.list_sandboxes():
        NODE_SANDBOXES.labels(record.template).inc()
    NODE_CAPACITY.set(node.settings.max_sandboxes)
    NODE_OCCUPIED.set(node.occupied())
    NODE_WARM.clear()
    for template, count in node.warm.ready().items():
        NODE_WARM.labels(template).set(count)
    VOLUMES.set(len(await asyncio.to_thread(node.volumes.ids)))
    when, size = _sized
    if time.monotonic() - when > SIZE_EVERY_S or when == 0.0:
        size = await asyncio.to_thread(_tree_bytes, node.snapshots.root)
        _sized = (time.monotonic(), size)
    SNAPSHOT_BYTES.set(size)


def refresh_catalog(counts: list[tuple[str, str, int]]) -> None:
    """(state, template, count) rows of the catalog's sandboxes that have not ended."""
    SANDBOXES.clear()
    for state, template, count in counts:
        SANDBOXES.labels(state, template).set(count)


def exposition() -> bytes:
    return generate_latest(REGISTRY)


def check_access(settings: Settings, client_host: str | None, authorization: str) -> None:
    """VIVARIUM_METRICS: off (404), local (this host's clients only: 403 to others) or token
    (a bearer token: 401 without it)."""
    if settings.metrics == "off":
        raise NotFound("metrics are off", "set VIVARIUM_METRICS=local or token")
    if settings.metrics == "local":
        try:
            local = client_host is not None and ipaddress.ip_address(client_host).is_loopback
        except ValueError:
            local = False
        if not local:
            raise Forbidden("metrics are served to this host's clients only",
                            "scrape from the host, or set VIVARIUM_METRICS=token")  # fmt: skip
        return
    scheme, _, token = authorization.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(
        token.strip().encode(), settings.metrics_token.encode()
    ):
        raise Unauthenticated("a metrics token is required",
                              "send Authorization: Bearer <VIVARIUM_METRICS_TOKEN>")  # fmt: skip


class RequestMetrics:
    """ASGI middleware: every API request counted by its route's template (never the raw path,
    whose ids would make a series per sandbox), method and status."""

    def __init__(self, app: ASGIApp, routes: list[Any]) -> None:
        self.app = app
        self.routes = [r for r in routes if isinstance(r, Route)]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = [500]

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, sending)
        finally:
            API_REQUESTS.labels(self._template(scope), scope["method"], str(status[0])).inc()

    def _template(self, scope: Scope) -> str:
        partial = "unmatched"
        for route in self.routes:
            match, _ = route.matches(scope)
            if match == Match.FULL:
                return str(route.path)
            if match == Match.PARTIAL and partial == "unmatched":  # another method's route
                partial = str(route.path)
        return partial

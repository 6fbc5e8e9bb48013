"""Prometheus metrics (telemetry.py): requests counted by route template, operations timed by
outcome, access as configured, and output that Prometheus' own parser reads."""

from __future__ import annotations

import asyncio

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Route

from vivarium import telemetry
from vivarium.config import Settings
from vivarium.errors import ConfigError, Forbidden, NotFound, Unauthenticated


def _samples(name: str) -> dict[tuple[tuple[str, str], ...], float]:
    out = {}
    for family in text_string_to_metric_families(telemetry.exposition().decode()):
        for sample in family.samples:
            if sample.name == name:
                out[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def test_requests_are_counted_by_route_template_method_and_status() -> None:
    async def sandbox(request: Request) -> Response:
        return PlainTextResponse(
            "x", status_code=404 if request.path_params["id"] == "gone" else 200
        )

    routes = [Route("/sandboxes/{id}", sandbox, methods=["GET"])]
    app = Starlette(routes=routes, middleware=[Middleware(telemetry.RequestMetrics, routes=routes)])

    async def calls() -> None:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as http:
            for path in ("/sandboxes/a", "/sandboxes/b", "/sandboxes/gone", "/nowhere"):
                await http.get(path)
            await http.delete("/sandboxes/a")

    before = _samples("vivarium_api_requests_total")
    asyncio.run(calls())
    after = _samples("vivarium_api_requests_total")

    def moved(route: str, method: str, status: str) -> float:
        key = (("method", method), ("route", route), ("status", status))
        return after.get(key, 0) - before.get(key, 0)

    assert moved("/sandboxes/{id}", "GET", "200") == 2  # one series, not one per sandbox
    assert moved("/sandboxes/{id}", "GET", "404") == 1
    assert moved("unmatched", "GET", "404") == 1
    assert moved("/sandboxes/{id}", "DELETE", "405") == 1


def test_operations_are_timed_by_outcome() -> None:
    @telemetry.timed_operation("unit-op")
    async def work(fail: bool) -> str:
        if fail:
            raise RuntimeError("no")
        return "done"

    assert asyncio.run(work(False)) == "done"
    with pytest.raises(RuntimeError):
        asyncio.run(work(True))
    counts = _samples("vivarium_operation_seconds_count")
    assert counts[(("operation", "unit-op"), ("outcome", "ok"))] == 1
    assert counts[(("operation", "unit-op"), ("outcome", "error"))] == 1


def test_catalog_gauges_are_replaced_on_each_scrape() -> None:
    telemetry.refresh_catalog([("running", "base", 3), ("paused", "base", 1)])
    telemetry.refresh_catalog([("running", "base", 2)])
    gauges = _samples("vivarium_sandboxes")
    assert gauges == {(("state", "running"), ("template", "base")): 2}


def test_access_follows_the_setting() -> None:
    local = Settings(metrics="local")
    telemetry.check_access(local, "127.0.0.1", "")
    telemetry.check_access(local, "::1", "")
    for stranger in ("10.0.0.5", None, "not-an-address"):
        with pytest.raises(Forbidden):
            telemetry.check_access(local, stranger, "")
    with pytest.raises(NotFound):
        telemetry.check_access(Settings(metrics="off"), "127.0.0.1", "")
    token = Settings(metrics="token", metrics_token="s3cret-token-of-length")
    telemetry.check_access(token, "10.0.0.5", "Bearer s3cret-token-of-length")
    for wrong in ("", "Bearer nope", "s3cret-token-of-length", "Basic s3cret-token-of-length"):
        with pytest.raises(Unauthenticated):
            telemetry.check_access(token, "127.0.0.1", wrong)


def test_bad_metrics_settings_are_refused() -> None:
    with pytest.raises(ConfigError):
        Settings(metrics="public").validate()
    with pytest.raises(ConfigError):
        Settings(metrics="token", metrics_token="short").validate()

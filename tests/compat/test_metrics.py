"""`GET /metrics` of a real server, read with Prometheus' own parser: the counters and gauges
move as sandboxes come and go through the official client."""

from __future__ import annotations

import httpx
from e2b import Sandbox
from prometheus_client.parser import text_string_to_metric_families

from tests.compat.conftest import Compat

Labels = tuple[tuple[str, str], ...]


def _scrape(compat: Compat) -> dict[str, dict[Labels, float]]:
    response = httpx.get(f"{compat.api_url}/metrics", timeout=60)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/plain")
    out: dict[str, dict[Labels, float]] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def _value(metrics: dict[str, dict[Labels, float]], name: str, **labels: str) -> float:
    return metrics.get(name, {}).get(tuple(sorted(labels.items())), 0.0)


def test_metrics_follow_sandboxes_as_they_come_and_go(compat: Compat) -> None:
    before = _scrape(compat)
    sandbox = Sandbox.create(timeout=120)
    try:
        assert sandbox.commands.run("echo hi").stdout == "hi\n"  # through the proxy
        during = _scrape(compat)
        assert _value(during, "vivarium_sandboxes", state="running", template="base") >= 1
        assert _value(during, "vivarium_node_sandboxes", template="base") >= 1
        assert _value(during, "vivarium_node_capacity_sandboxes") == 40  # the compat server's
        assert _value(during, "vivarium_node_occupied_sandboxes") >= 1
        created = _value(during, "vivarium_operation_seconds_count", operation="create",
                         outcome="ok")  # fmt: skip
        assert created == _value(before, "vivarium_operation_seconds_count", operation="create",
                                 outcome="ok") + 1  # fmt: skip
        posts = ("vivarium_api_requests_total", {"route": "/v2/sandboxes", "method": "POST",
                                                 "status": "201"})  # fmt: skip
        assert _value(during, posts[0], **posts[1]) >= _value(before, posts[0], **posts[1]) + 1
        forwarded = _value(during, "vivarium_proxy_requests_total", outcome="forwarded")
        assert forwarded > _value(before, "vivarium_proxy_requests_total", outcome="forwarded")
        assert _value(during, "vivarium_snapshot_store_bytes") >= 0
    finally:
        sandbox.kill()
    after = _scrape(compat)
    assert _value(after, "vivarium_operation_seconds_count", operation="kill", outcome="ok") == (
        _value(during, "vivarium_operation_seconds_count", operation="kill", outcome="ok") + 1
    )
    # Errors are counted by route and status too: an unknown sandbox is a 404.
    with compat.admin() as http:
        assert http.get("/sandboxes/inope").status_code == 404
    key = {"route": "/sandboxes/{sandbox_id}", "method": "GET", "status": "404"}
    assert _value(_scrape(compat), "vivarium_api_requests_total", **key) >= 1

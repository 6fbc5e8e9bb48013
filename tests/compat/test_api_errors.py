"""Bad input to the REST API and the proxy: E2B's JSON errors with the right status codes, and
nothing about other teams' sandboxes leaks."""

from __future__ import annotations

import uuid
from collections.abc import Iterator

import httpx
import pytest

from tests.compat.conftest import Compat

pytestmark = pytest.mark.timeout(600)


@pytest.fixture(scope="module")
def api(compat: Compat) -> Iterator[httpx.Client]:
    with compat.admin() as http:
        yield http


@pytest.fixture(scope="module")
def running(api: httpx.Client) -> Iterator[str]:
    created = api.post("/v2/sandboxes", json={"templateID": "base", "timeout": 120})
    assert created.status_code == 201, created.text
    sandbox_id = str(created.json()["sandboxID"])
    yield sandbox_id
    api.delete(f"/sandboxes/{sandbox_id}")


def _error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["code"] == status and isinstance(body["message"], str) and body["message"]
    return str(body["message"])


def test_authentication(compat: Compat) -> None:
    assert httpx.get(f"{compat.api_url}/health").status_code == 200
    _error(httpx.get(f"{compat.api_url}/v2/sandboxes"), 401)
    wrong = {"X-API-Key": "e2b_" + "f" * 40}
    _error(httpx.get(f"{compat.api_url}/v2/sandboxes", headers=wrong), 401)
    _error(httpx.get(f"{compat.api_url}/v2/sandboxes", headers={"X-API-Key": "nonsense"}), 401)


def test_create_validation(api: httpx.Client) -> None:
    post = "/v2/sandboxes"
    assert "JSON" in _error(api.post(post, content=b"{bad"), 400)
    _error(api.post(post, json=["not", "an", "object"]), 400)
    _error(api.post(post, json={}), 400)
    assert "timeout" in _error(api.post(post, json={"templateID": "base", "timeout": "x"}), 400)
    _error(api.post(post, json={"templateID": "base", "timeout": True}), 400)
    _error(api.post(post, json={"templateID": "base", "timeout": -5}), 400)
    _error(api.post(post, json={"templateID": "base", "timeout": 10**9}), 400)
    _error(api.post(post, json={"templateID": "base", "metadata": {"a": 1}}), 400)
    _error(api.post(post, json={"templateID": "base", "envVars": "FOO=bar"}), 400)
    # Variables every later process would inherit: refused now, not at every command's start.
    for env in ({"A": "x\0y"}, {"A=B": "c"}, {"": "c"}, {"BIG": "x" * (65 << 10)}):
        assert "envVars" in _error(api.post(post, json={"templateID": "base", "envVars": env}),
                                   400)  # fmt: skip
    deep = b"[" * 100_000 + b"]" * 100_000  # nested past Python's recursion limit
    assert "JSON" in _error(api.post(post, content=deep), 400)
    assert "over" in _error(api.post(post, content=b" " * (2 << 20)), 400)
    many = [{"name": f"v{i}", "path": f"/mnt/{i}"} for i in range(10_000)]
    assert "at most 16" in _error(api.post(post, json={"templateID": "base",
                                                       "volumeMounts": many}), 400)  # fmt: skip
    _error(api.post(post, json={"templateID": 42}), 400)
    assert "not found" in _error(api.post(post, json={"templateID": "nope"}), 404)
    _error(api.post(post, json={"templateID": "base", "volumeMounts": [{"name": "v"}]}), 400)
    mcp = {"templateID": "base", "mcp": {"github": {}}}  # MCP gateways are not built (yet)
    assert "MCP gateways" in _error(api.post(post, json=mcp), 400)
    # Nor these: refused, rather than a sandbox that silently lacks them.
    for unsupported in ({"network": {"httpsPorts": [8443]}},
                        {"network": {"maskRequestHost": "localhost:${PORT}"}},
                        {"iam": {"tokens": [{"name": "gh"}]}}):  # fmt: skip
        body = {"templateID": "base", **unsupported}
        assert "not supported" in _error(api.post(post, json=body), 400)
    # Only a sandbox that pauses at its timeout can be resumed by traffic (as the client checks).
    assert "autoPause" in _error(
        api.post(post, json={"templateID": "base", "autoResume": {"enabled": True}}), 400
    )


def test_routes_and_queries(api: httpx.Client, running: str) -> None:
    _error(api.get("/no/such/route"), 404)
    _error(api.put("/v2/sandboxes"), 405)
    _error(api.get("/v2/sandboxes", params={"limit": "0"}), 400)
    _error(api.get("/v2/sandboxes", params={"limit": "many"}), 400)
    _error(api.get("/v2/sandboxes", params={"limit": "²"}), 400)  # a digit to str.isdigit
    _error(api.get("/events", params={"after": "9" * 5000}), 400)
    _error(api.get(f"/sandboxes/{running}/metrics", params={"start": "²"}), 400)
    _error(api.get("/v2/sandboxes", params={"state": "exploded"}), 400)
    _error(api.get("/v2/sandboxes", params={"nextToken": "%%%"}), 400)
    _error(api.get("/v2/sandboxes", params={"startedAfter": "yesterday"}), 400)
    _error(api.get("/sandboxes/inope"), 404)
    _error(api.post(f"/sandboxes/{running}/timeout", json={}), 400)
    _error(api.post(f"/sandboxes/{running}/timeout", json={"timeout": -1}), 400)
    assert api.post(f"/sandboxes/{running}/timeout", json={"timeout": 10**9}).status_code == 204
    assert api.post(f"/sandboxes/{running}/refreshes", json={"duration": 30}).status_code == 204
    logs = api.get(f"/sandboxes/{running}/logs")
    assert logs.status_code == 200 and isinstance(logs.json()["logs"], list)


def test_another_teams_sandbox_does_not_exist(compat: Compat, running: str) -> None:
    key = compat.new_team(f"outsider-{uuid.uuid4().hex[:6]}")
    with httpx.Client(base_url=compat.api_url, headers={"X-API-Key": key}) as other:
        for response in (
            other.get(f"/sandboxes/{running}"),
            other.delete(f"/sandboxes/{running}"),
            other.post(f"/sandboxes/{running}/timeout", json={"timeout": 5}),
            other.post(f"/v2/sandboxes/{running}/connect", json={"timeout": 5}),
            other.get(f"/sandboxes/{running}/metrics"),
            other.get(f"/sandboxes/{running}/logs"),
        ):
            assert "was not found" in _error(response, 404)
        assert other.get("/v2/sandboxes").json() == []
        _error(other.post("/teams", json={"name": "sneaky"}), 404)  # not an admin key
    with compat.admin() as admin:
        assert admin.get(f"/sandboxes/{running}").status_code == 200  # untouched


def test_proxy_errors(compat: Compat) -> None:
    _error(httpx.get(f"{compat.sandbox_url}/"), 400)  # no routing headers
    headers = {"E2b-Sandbox-Id": "inotasandbox", "E2b-Sandbox-Port": "49983"}
    assert "was not found" in _error(
        httpx.get(f"{compat.sandbox_url}/health", headers=headers), 502
    )
    _error(httpx.get(f"{compat.sandbox_url}/", headers={**headers, "E2b-Sandbox-Port": "x"}), 400)

"""Every route of the REST API, walked from its own OpenAPI document: without a key, with a
wrong key and with another team's key, nothing of a team's sandbox is seen or changed."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from tests.integration.support import Server, sdk_options


def _api(server: Server, key: str | None) -> httpx.Client:
    headers = {"X-API-Key": key} if key is not None else {}
    return httpx.Client(base_url=sdk_options(server)["api_url"], headers=headers, timeout=60)


@pytest.fixture(scope="module")
def owner(server: Server) -> Iterator[httpx.Client]:
    with _api(server, sdk_options(server)["api_key"]) as http:
        yield http


@pytest.fixture(scope="module")
def victim(owner: httpx.Client) -> Iterator[dict[str, Any]]:
    created = owner.post("/v2/sandboxes", json={"templateID": "base", "timeout": 600,
                                                "metadata": {"owner": "a"}})  # fmt: skip
    assert created.status_code == 201, created.text
    sandbox_id = created.json()["sandboxID"]
    snapshot = owner.post(f"/sandboxes/{sandbox_id}/snapshots", json={})  # the team's, too
    assert snapshot.status_code == 201, snapshot.text
    volume = owner.post("/volumes", json={"name": f"walk-{uuid.uuid4().hex[:6]}"})  # and this
    assert volume.status_code == 201, volume.text
    key = owner.post("/api-keys", json={"name": "walk-victim"})  # and one of its keys
    assert key.status_code == 201, key.text
    yield {
        "keyID": key.json()["id"],
        **created.json(),
        "snapshotID": snapshot.json()["snapshotID"],
        "volumeID": volume.json()["volumeID"],
        "volumeToken": volume.json()["token"],
    }
    owner.delete(f"/sandboxes/{sandbox_id}")
    owner.delete(f"/templates/{snapshot.json()['snapshotID']}")
    owner.delete(f"/volumes/{volume.json()['volumeID']}")


@pytest.fixture(scope="module")
def routes(owner: httpx.Client) -> list[tuple[str, str]]:
    paths = owner.get("/openapi.json").json()["paths"]
    found = [(method, path) for path, ops in paths.items() for method, op in ops.items()
             if op.get("security") != []]  # fmt: skip
    assert len(found) >= 18  # the walk is over the real document, not an empty one
    return found


def _call(http: httpx.Client, method: str, path: str, victim: dict[str, Any]) -> httpx.Response:
    body = {"timeout": 5, "duration": 5, "name": f"probe-{uuid.uuid4().hex[:6]}",
            "templateID": "base"}  # fmt: skip
    url = path.replace("{sandbox_id}", victim["sandboxID"])
    url = url.replace("{template_id}", victim["snapshotID"])
    url = url.replace("{volume_id}", victim["volumeID"])
    url = url.replace("{key_id}", victim["keyID"])
    url = url.replace("{node_id}", "local")  # the server's own node
    if url == "/sandboxes/metrics":
        url += f"?sandbox_ids={victim['sandboxID']}"
    if "/volumecontent/" in url:
        url += "?path=/"
    if method in ("post", "put", "patch"):
        return http.request(method, url, json=body)
    return http.request(method, url)


def _json_error(response: httpx.Response, status: int) -> None:
    assert response.status_code == status, (response.request.url, response.text)
    body = response.json()
    assert body["code"] == status and body["message"]


@pytest.mark.parametrize("key", ["missing", "wrong", "malformed"])
def test_every_route_refuses_a_caller_without_a_valid_key(
    server: Server, routes: list[tuple[str, str]], victim: dict[str, Any], key: str
) -> None:
    sent = {"missing": None, "wrong": "e2b_" + "0" * 40, "malformed": "Bearer x"}[key]
    with _api(server, sent) as stranger:
        for method, path in routes:
            _json_error(_call(stranger, method, path, victim), 401)


def test_another_team_sees_and_changes_nothing_of_a_sandbox(
    server: Server, owner: httpx.Client, routes: list[tuple[str, str]], victim: dict[str, Any]
) -> None:
    sandbox_id = victim["sandboxID"]
    before = owner.get(f"/sandboxes/{sandbox_id}").json()
    team = owner.post("/teams", json={"name": f"other-{uuid.uuid4().hex[:6]}"})
    assert team.status_code == 201, team.text
    with _api(server, team.json()["apiKey"]) as other:
        for method, path in routes:
            response = _call(other, method, path, victim)
            if path.startswith("/volumecontent/"):
                _json_error(response, 401)  # the volume's token, not a team's key, opens it
            elif any(
                f"{{{p}}}" in path for p in ("sandbox_id", "template_id", "volume_id", "key_id")
            ):
                _json_error(response, 404)
            elif path == "/teams" or path.startswith("/nodes"):
                _json_error(response, 404)  # only admin keys make teams and steer nodes
            elif path == "/v3/templates":  # a template of its own, in its own team
                assert response.status_code == 202, response.text
                assert other.delete(f"/templates/{response.json()['templateID']}").is_success
            elif path.startswith("/templates/aliases/"):
                _json_error(response, 404)
            elif path == "/templates/tags":
                _json_error(response, 400)  # the probe names no template of its own
            elif (path.endswith("sandboxes") or path == "/snapshots") and method == "get":
                assert response.status_code == 200 and sandbox_id not in response.text
                assert victim["snapshotID"] not in response.text
            elif path.endswith("sandboxes") and method == "post":  # its own, in its own team
                assert response.status_code == 201, response.text
                other.delete(f"/sandboxes/{response.json()['sandboxID']}")
            elif path == "/volumes" and method == "post":
                assert response.status_code == 201, response.text
                other.delete(f"/volumes/{response.json()['volumeID']}")
            elif path == "/volumes":
                assert response.status_code == 200 and victim["volumeID"] not in response.text
            elif path in ("/events", "/sandboxes/metrics"):
                assert response.status_code == 200 and sandbox_id not in response.text
            elif path == "/api-keys":
                assert response.status_code in (200, 201)
                assert owner.headers["X-API-Key"] not in response.text
            else:
                assert response.status_code == 200, (path, response.text)
        keys = other.get("/api-keys").json()
        mine = {k["id"] for k in owner.get("/api-keys").json()}
        assert mine.isdisjoint(k["id"] for k in keys)
        assert victim["keyID"] in mine  # not revoked by another team
    after = owner.get(f"/sandboxes/{sandbox_id}").json()
    assert after["state"] == "running" and after["endAt"] == before["endAt"]
    assert after["metadata"] == {"owner": "a"}
    token = {"Authorization": f"Bearer {victim['volumeToken']}"}
    listing = owner.get(f"/volumecontent/{victim['volumeID']}/dir", params={"path": "/"},
                        headers=token)  # fmt: skip
    assert listing.status_code == 200 and listing.json() == []  # nothing written into it
    listed = owner.get("/snapshots", params={"sandboxID": sandbox_id}).json()
    assert [s["snapshotID"] for s in listed] == [victim["snapshotID"]]
    assert [n["status"] for n in owner.get("/nodes").json()] == ["ready"]  # not drained


def test_nobody_sets_a_sandboxs_envd_token_through_the_proxy(
    server: Server, victim: dict[str, Any]
) -> None:
    """envd's /init takes a new access token: through the proxy it would hand the sandbox to
    whoever knew its id. The node calls it at the slot address; the proxy refuses it."""
    proxy = sdk_options(server)["sandbox_url"]
    routing = {"E2b-Sandbox-Id": victim["sandboxID"], "E2b-Sandbox-Port": "49983"}
    hijack = httpx.post(f"{proxy}/init", headers=routing, json={"accessToken": "mine-now"})
    assert hijack.status_code == 403, hijack.text
    token = victim["envdAccessToken"]
    listed = httpx.post(f"{proxy}/process.Process/List", content=b"{}",
                        headers={**routing, "X-Access-Token": token,
                                 "Content-Type": "application/json"})  # fmt: skip
    assert listed.status_code == 200, listed.text  # the owner's token still opens it

"""The node registry through the API and `vivarium node`: the server's own node registers and
heartbeats; drained, it refuses new sandboxes (with what to do) while its running ones go on;
undrained, it takes them again. Only admin keys see nodes."""

from __future__ import annotations

import json
import time

import httpx
import pytest
from e2b import Sandbox

from tests.integration.support import Server, sdk_options

pytestmark = pytest.mark.timeout(300)


def _nodes(server: Server) -> list[dict[str, object]]:
    listed = server.cli("node", "list", "--json")
    assert listed.returncode == 0, listed.stderr
    return json.loads(listed.stdout)  # type: ignore[no-any-return]


def test_the_servers_node_is_registered_and_heartbeats(server: Server) -> None:
    with server.client() as client:
        info = client.info()
    [node] = _nodes(server)
    assert node["nodeID"] == "local" and node["status"] == "ready"
    assert node["runscVersion"] == info["runsc_version"] and node["platform"] == info["platform"]
    assert node["maxSandboxes"] == 40 and node["address"].startswith("unix:")  # type: ignore[attr-defined]
    table = server.cli("node", "list")
    assert table.returncode == 0 and "local" in table.stdout and "ready" in table.stdout
    sbx = Sandbox.create(timeout=120, **sdk_options(server))  # type: ignore[arg-type]
    try:
        deadline = time.monotonic() + 30  # a heartbeat every 5 s brings the count
        while (node := _nodes(server)[0])["sandboxes"] < 1:  # type: ignore[operator]
            assert time.monotonic() < deadline, node
            time.sleep(1)
        assert node["allocatedMemoryMB"] >= 512 and node["heartbeatAt"] != ""  # type: ignore[operator]
    finally:
        sbx.kill()


def test_a_drained_node_refuses_new_sandboxes_and_keeps_its_running_ones(server: Server) -> None:
    options = sdk_options(server)
    running = Sandbox.create(timeout=120, **options)  # type: ignore[arg-type]
    drained = server.cli("node", "drain", "local")
    assert drained.returncode == 0, drained.stderr
    try:
        assert _nodes(server)[0]["status"] == "draining"
        with pytest.raises(Exception, match="draining") as refused:
            Sandbox.create(timeout=60, **options)  # type: ignore[arg-type]
        assert "vivarium node undrain local" in str(refused.value)
        response = httpx.post(f"{options['api_url']}/sandboxes", json={"templateID": "base"},
                              headers={"X-API-Key": options["api_key"]})  # fmt: skip
        assert response.status_code == 503, response.text
        assert response.json()["code"] == 503
        assert running.commands.run("echo still here").stdout == "still here\n"
    finally:
        undrained = server.cli("node", "undrain", "local")
        assert undrained.returncode == 0, undrained.stderr
    assert _nodes(server)[0]["status"] == "ready"
    again = Sandbox.create(timeout=60, **options)  # type: ignore[arg-type]
    for sbx in (again, running):
        sbx.kill()


def test_only_admin_keys_see_and_steer_nodes(server: Server) -> None:
    options = sdk_options(server)
    api, admin = options["api_url"], {"X-API-Key": options["api_key"]}
    team = httpx.post(f"{api}/teams", json={"name": f"not-admin-{time.time_ns()}"},
                      headers=admin)  # fmt: skip
    assert team.status_code == 201, team.text
    other = {"X-API-Key": team.json()["apiKey"]}
    assert httpx.get(f"{api}/nodes", headers=other).status_code == 404
    assert httpx.post(f"{api}/nodes/local/drain", headers=other).status_code == 404
    assert _nodes(server)[0]["status"] == "ready"
    assert httpx.get(f"{api}/nodes", headers={"X-API-Key": "e2b_" + "0" * 40}).status_code == 401
    missing = httpx.post(f"{api}/nodes/nobody/drain", headers=admin)
    assert missing.status_code == 404 and "vivarium node list" in missing.json()["message"]

"""Pause and resume given the wrong sandbox, a snapshot gone missing, or several callers at
once: clear errors, nothing lost, and the catalog, the node and the snapshots always agree."""

from __future__ import annotations

import shutil
import threading
from collections.abc import Callable, Iterator
from functools import partial

import httpx
import pytest
from e2b import Sandbox

from tests.integration.support import Server
from tests.pause.conftest import API_PORT
from tests.pause.conftest import opts as _opts

pytestmark = pytest.mark.timeout(600)


@pytest.fixture
def api(server: Server) -> Iterator[httpx.Client]:
    key = (server.state_dir / "admin.key").read_text().strip()
    with httpx.Client(base_url=f"http://127.0.0.1:{API_PORT}", headers={"X-API-Key": key},
                      timeout=120) as client:  # fmt: skip
        yield client


def _error(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert body["code"] == status and body["message"]
    return str(body["message"])


def test_pause_and_connect_of_unknown_killed_and_paused_sandboxes(
    server: Server, api: httpx.Client
) -> None:
    assert "not found" in _error(api.post("/sandboxes/inope00000000000000/pause"), 404)
    assert "not found" in _error(api.post("/v2/sandboxes/inope00000000000000/connect",
                                          json={"timeout": 60}), 404)  # fmt: skip
    sbx = Sandbox.create(timeout=120, **_opts(server))  # type: ignore[arg-type]
    assert api.post(f"/sandboxes/{sbx.sandbox_id}/pause").status_code == 204
    _error(api.post(f"/sandboxes/{sbx.sandbox_id}/pause"), 409)  # already paused
    assert api.delete(f"/sandboxes/{sbx.sandbox_id}").status_code == 204
    _error(api.post(f"/sandboxes/{sbx.sandbox_id}/pause"), 404)  # killed
    _error(api.post(f"/v2/sandboxes/{sbx.sandbox_id}/connect", json={"timeout": 60}), 404)
    _error(api.post(f"/sandboxes/{sbx.sandbox_id}/resume", json={"timeout": 60}), 404)


def test_missing_snapshot_is_a_clear_error_and_the_record_stays(
    server: Server, api: httpx.Client
) -> None:
    sbx = Sandbox.create(timeout=120, **_opts(server))  # type: ignore[arg-type]
    assert sbx.pause()
    snapshot = server.state_dir / "snapshots" / sbx.sandbox_id
    aside = snapshot.with_name(f"aside-{sbx.sandbox_id}")
    snapshot.rename(aside)
    try:
        response = api.post(f"/v2/sandboxes/{sbx.sandbox_id}/connect", json={"timeout": 60})
        assert response.status_code == 404, response.text
        assert "snapshot" in response.json()["message"]
        # Never a blank sandbox in its place: still paused, for inspection.
        assert api.get(f"/sandboxes/{sbx.sandbox_id}").json()["state"] == "paused"
        aside.rename(snapshot)
        resumed = Sandbox.connect(sbx.sandbox_id, **_opts(server))  # type: ignore[arg-type]
        assert resumed.commands.run("echo back").stdout == "back\n"
    finally:
        if aside.exists():
            shutil.rmtree(aside)
        api.delete(f"/sandboxes/{sbx.sandbox_id}")


def _together(calls: list[Callable[[], httpx.Response]]) -> list[int]:
    barrier = threading.Barrier(len(calls))
    statuses: list[int] = [0] * len(calls)

    def run(i: int) -> None:
        barrier.wait()
        statuses[i] = calls[i]().status_code

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(calls))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return statuses


def test_concurrent_pause_kill_and_connect_are_serialized(
    server: Server, api: httpx.Client
) -> None:
    for _ in range(3):
        sbx = Sandbox.create(timeout=120, **_opts(server))  # type: ignore[arg-type]
        sid = sbx.sandbox_id
        pause, kill, connect = _together([
            partial(api.post, f"/sandboxes/{sid}/pause"),
            partial(api.delete, f"/sandboxes/{sid}"),
            partial(api.post, f"/v2/sandboxes/{sid}/connect", json={"timeout": 60}),
        ])  # fmt: skip
        assert pause in (204, 404, 409) and kill == 204 and connect in (200, 201, 404, 409)
        # Whatever the order, the kill wins in the end and leaves nothing behind.
        assert api.get(f"/sandboxes/{sid}").status_code == 404
        assert not (server.state_dir / "snapshots" / sid).exists()
        with server.client() as node:
            assert sid not in {s["sandbox_id"] for s in node.list_sandboxes()}
    for _ in range(3):  # pause against connect: both states are fine, but they must agree
        sbx = Sandbox.create(timeout=120, **_opts(server))  # type: ignore[arg-type]
        sid = sbx.sandbox_id
        _together([
            partial(api.post, f"/sandboxes/{sid}/pause"),
            partial(api.post, f"/v2/sandboxes/{sid}/connect", json={"timeout": 60}),
        ])  # fmt: skip
        state = api.get(f"/sandboxes/{sid}").json()["state"]
        with server.client() as node:
            on_node = sid in {s["sandbox_id"] for s in node.list_sandboxes()}
        snapshot = (server.state_dir / "snapshots" / sid).exists()
        # (A resumed sandbox keeps its last snapshot until the next pause replaces it.)
        assert (state, on_node) in (("running", True), ("paused", False))
        if state == "running":
            resumed = Sandbox.connect(sid, **_opts(server))  # type: ignore[arg-type]
            assert resumed.commands.run("true").exit_code == 0
        else:
            assert snapshot
        assert api.delete(f"/sandboxes/{sid}").status_code == 204

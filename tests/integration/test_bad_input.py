"""Bad input gets a clear error and leaves nothing half-created."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest

from tests.integration.support import (
    VIVARIUM,
    Server,
    containers,
    host_links,
    make_server,
    netns_names,
    running_server,
)
from vivarium.node.client import NodeClient, NodeError


def _raw(server: Server, method: str, path: str, content: bytes | None = None) -> httpx.Response:
    transport = httpx.HTTPTransport(uds=str(server.socket))
    with httpx.Client(transport=transport, base_url="http://node") as http:
        return http.request(method, path, content=content,
                            headers={"content-type": "application/json"})  # fmt: skip


@pytest.mark.parametrize(
    ("fields", "status", "words"),
    [
        ({"template": "no-such-template"}, 404, "not found"),
        ({"template": "../etc"}, 400, "invalid template name"),
        ({"memory_mb": 1}, 400, "memory_mb"),
        ({"memory_mb": 10**9}, 400, "memory_mb"),
        ({"cpus": 0}, 400, "cpus"),
        ({"timeout": -5}, 400, "timeout"),
        ({"timeout": 10**9}, 400, "timeout"),
        ({"timeout": "soon"}, 400, "timeout"),
        ({"metadata": {"a": 1}}, 400, "metadata"),
        ({"allow_internet_access": "yes"}, 400, "allow_internet_access"),
    ],
)
def test_create_rejects_bad_fields(
    server: Server, client: NodeClient, fields: dict[str, object], status: int, words: str
) -> None:
    before = netns_names("vt")
    count = len(client.list_sandboxes())
    with pytest.raises(NodeError) as excinfo:
        client.create(**fields)
    assert excinfo.value.http_status == status
    assert words in excinfo.value.message
    assert len(client.list_sandboxes()) == count
    assert netns_names("vt") == before


def test_malformed_requests(server: Server) -> None:
    bad_json = _raw(server, "POST", "/sandboxes", b"{not json")
    assert bad_json.status_code == 400
    assert bad_json.json()["code"] == 400 and "JSON" in bad_json.json()["message"]
    not_object = _raw(server, "POST", "/sandboxes", b"[1, 2]")
    assert not_object.status_code == 400
    unknown = _raw(server, "GET", "/sandboxes/inotasandbox000000000")
    assert unknown.status_code == 404 and "not found" in unknown.json()["message"]
    weird_id = _raw(server, "DELETE", "/sandboxes/..%2F..%2Fetc")
    assert weird_id.status_code == 404


def test_exec_rejects_bad_input(client: NodeClient, sandbox: Callable[..., str]) -> None:
    sandbox_id = sandbox()
    for options, words in [
        ({"user": "mallory"}, "unknown user"),
        ({"timeout": 0}, "timeout"),
        ({"timeout": 0.5, "cmd": ["sleep", "5"]}, "did not finish"),
    ]:
        cmd = options.pop("cmd", ["true"])
        with pytest.raises(NodeError) as excinfo:
            client.exec(sandbox_id, cmd, **options)  # type: ignore[arg-type]
        assert excinfo.value.http_status == 400
        assert words in excinfo.value.message
    with pytest.raises(NodeError) as excinfo:
        client.exec(sandbox_id, [])
    assert excinfo.value.http_status == 400
    missing = client.exec(sandbox_id, ["/no/such/binary"])
    assert missing["exit_code"] != 0
    # The sandbox is still fine after all of that.
    assert client.exec(sandbox_id, ["echo", "ok"])["stdout"] == "ok\n"


def test_missing_runsc_is_a_clear_error() -> None:
    srv = make_server("norunsc", "vn", "10.236.0.0/24", 3102, runsc="/nonexistent/runsc")
    result = subprocess.run([VIVARIUM, "serve"], env=srv.env, capture_output=True, text=True,
                            timeout=60)  # fmt: skip
    assert result.returncode != 0
    assert "runsc not found" in result.stderr and "make system-deps" in result.stderr
    assert "bookworm-backports" in result.stderr
    assert netns_names("vn") == set() and not containers(srv.state_dir)
    doctor = subprocess.run([VIVARIUM, "doctor"], env=srv.env, capture_output=True, text=True,
                            timeout=60)  # fmt: skip
    assert doctor.returncode == 1
    assert "[FAIL] runsc" in doctor.stdout


OLD_RUNSC = """#!/bin/sh
# Answers like Debian 12's own runsc, and nothing else.
if [ "$1" = "--version" ]; then
    echo "runsc version 0.0~20221219.0"; echo "spec: 1.1.0-rc.1"; exit 0
fi
echo "this fake runsc only answers --version" >&2; exit 1
"""


def test_a_runsc_older_than_2024_is_refused_with_what_to_do(tmp_path: Path) -> None:
    fake = tmp_path / "runsc"
    fake.write_text(OLD_RUNSC)
    fake.chmod(0o755)
    srv = make_server("oldrunsc", "vn", "10.236.0.0/24", 3102, runsc=str(fake))
    result = subprocess.run([VIVARIUM, "serve"], env=srv.env, capture_output=True, text=True,
                            timeout=60)  # fmt: skip
    assert result.returncode != 0
    assert "runsc 0.0~20221219.0 is too old" in result.stderr
    assert "bookworm-backports" in result.stderr
    assert netns_names("vn") == set() and not host_links("vn")
    assert not containers(srv.state_dir)


def test_a_template_built_for_another_platform_is_refused_with_what_to_do() -> None:
    # `make` built the shared template for the default platform (systrap).
    with running_server("otherplatform", "vn", "10.236.0.0/24", 3104,
                        runsc_platform="ptrace") as srv, srv.client() as client:  # fmt: skip
        with pytest.raises(NodeError) as excinfo:
            client.create(template="base")
        assert excinfo.value.http_status == 503
        assert "(systrap)" in excinfo.value.message and "(ptrace)" in excinfo.value.message
        assert "vivarium template build base" in excinfo.value.message
        assert client.list_sandboxes() == [] and not containers(srv.state_dir)


def test_conflicting_slot_range_is_refused() -> None:
    # 127.0.0.0/24 overlaps the host's loopback route.
    srv = make_server("conflict", "vc", "127.0.0.0/24", 3103)
    result = subprocess.run([VIVARIUM, "serve"], env=srv.env, capture_output=True, text=True,
                            timeout=60)  # fmt: skip
    assert result.returncode != 0
    assert "overlaps" in result.stderr or "contains" in result.stderr
    assert "VIVARIUM_SLOT_CIDR" in result.stderr


@pytest.mark.parametrize("shares", ["state directory", "slot prefix"])
def test_a_second_node_on_the_same_state_is_refused_and_harms_nothing(
    server: Server, client: NodeClient, sandbox: Callable[..., str], shares: str
) -> None:
    sandbox_id = sandbox()
    slots = netns_names("vt")
    second = make_server("second", "vs", "10.236.1.0/24", 3105)
    if shares == "state directory":
        second.env["VIVARIUM_STATE_DIR"] = str(server.state_dir)
        second.env["VIVARIUM_SLOT_PREFIX"] = "vt"  # and so may not reset the first's slots
        second.env["VIVARIUM_SLOT_CIDR"] = server.env["VIVARIUM_SLOT_CIDR"]
        setting = "VIVARIUM_STATE_DIR"
    else:
        second.env["VIVARIUM_SLOT_PREFIX"] = "vt"
        setting = "VIVARIUM_SLOT_PREFIX"
    result = subprocess.run([VIVARIUM, "serve"], env=second.env, capture_output=True, text=True,
                            timeout=60)  # fmt: skip
    assert result.returncode != 0
    assert f"another vivarium node (pid {server.proc.pid}) is running with {shares}" in (  # type: ignore[union-attr]
        result.stderr
    )
    assert setting in result.stderr
    # The first node's sandbox, slots and ready disks are as they were.
    assert netns_names("vt") == slots
    assert client.exec(sandbox_id, ["echo", "ok"])["stdout"] == "ok\n"
    assert client.get(sandbox_id)["sandbox_id"] == sandbox_id


def test_not_root_is_told_to_use_sudo() -> None:
    result = subprocess.run(
        # An unprivileged user who can read the checkout wherever it is (CI may clone into a
        # private directory): not root, only allowed to read and search files.
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
         "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search", VIVARIUM, "doctor"],
        capture_output=True, text=True, timeout=60,
        env={**os.environ, "VIVARIUM_STATE_DIR": "/tmp/vivarium-nobody"},
    )  # fmt: skip
    assert result.returncode == 1
    assert "root" in result.stdout and "sudo" in result.stdout


def test_doctor_passes_on_this_host(server: Server) -> None:
    result = server.cli("doctor")
    assert result.returncode == 0, result.stdout
    assert "[ok  ] runsc" in result.stdout

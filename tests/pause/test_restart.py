"""Volumes and egress rules across a restart of the server (whose stop also unmounts the
volumes, as a host restart would): a running sandbox that mounts one is adopted and keeps
writing into it, a paused one resumes with it, and what either wrote is in the volume; the
running one's egress rules hold, names included (the egress proxy listens anew), and so does
another's tunnel through its SOCKS5 proxy."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2b import ALL_TRAFFIC, Sandbox, Volume

from tests.fakenet import BY_IP, DENIED, DNS, NAMED, SOCKS
from tests.integration.support import Server, running_server, sdk_options

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def server(internet: dict[str, str]) -> Iterator[Server]:
    with running_server("restart", "vm", "10.252.0.0/24", 3131, volume_size_mb="64",
                        **internet) as srv:  # fmt: skip
        yield srv


def _reaches(sbx: Sandbox, url: str, side: str = "local") -> str:
    """The address that answered `url` (or, with side="peer", the one the request came from),
    as the fake internet says; "" if nothing did."""
    out = sbx.commands.run(f"curl -sk -m 5 {url}; true", user="root").stdout
    return str(json.loads(out)[side]) if out.startswith("{") else ""


def test_volumes_and_rules_outlive_a_restart_with_their_sandboxes_running_and_paused(
    server: Server,
) -> None:  # fmt: skip
    opts = sdk_options(server)
    api = {"api_key": opts["api_key"], "api_url": opts["api_url"]}
    vol = Volume.create("kept", **api)  # type: ignore[arg-type]
    rules = {"deny_out": [ALL_TRAFFIC], "allow_out": ["pkg.example.test"], "dns_servers": [DNS]}
    running = Sandbox.create(timeout=600, volume_mounts={"/mnt/data": vol}, network=rules,  # type: ignore[arg-type]
                             **opts)  # fmt: skip
    paused = Sandbox.create(timeout=600, volume_mounts={"/data": vol}, **opts)  # type: ignore[arg-type]
    proxy = {"address": f"{SOCKS}:1081", "username": "proxy-user", "password": "proxy-pass"}
    tunnelled = Sandbox.create(timeout=600, network={"egress_proxy": proxy}, **opts)  # type: ignore[arg-type]
    try:
        assert _reaches(tunnelled, f"http://{BY_IP}:8080/", "peer") == SOCKS
        running.files.write("/mnt/data/before.txt", "before")
        running.commands.run(f"echo nameserver {DNS} > /etc/resolv.conf", user="root")
        assert _reaches(running, "https://pkg.example.test/") == NAMED
        paused.commands.run("sleep 600", background=True, timeout=0)
        assert paused.pause()
        server.stop()
        mounts = Path("/proc/self/mountinfo").read_text()
        assert str(server.state_dir / "volumes") not in mounts  # as after a host restart
        server.start()

        running = Sandbox.connect(running.sandbox_id, **opts)  # type: ignore[arg-type]
        running.files.write("/mnt/data/after.txt", "after")
        assert _reaches(running, "https://pkg.example.test/") == NAMED
        assert _reaches(running, f"http://{DENIED}:8080/") == ""
        assert vol.read_file("/after.txt", api_url=opts["api_url"]) == "after"
        # Its tunnel kept (pointed at the tunnel's new port), never opened in between.
        tunnelled = Sandbox.connect(tunnelled.sandbox_id, **opts)  # type: ignore[arg-type]
        assert _reaches(tunnelled, f"http://{BY_IP}:8080/", "peer") == SOCKS
        paused = Sandbox.connect(paused.sandbox_id, **opts)  # type: ignore[arg-type]
        assert "sleep 600" in paused.commands.run("ps -eo args").stdout
        assert paused.files.read("/data/before.txt") == "before"
        assert paused.files.read("/data/after.txt") == "after"
        paused.files.write("/data/resumed.txt", "resumed")
        assert running.files.read("/mnt/data/resumed.txt") == "resumed"
    finally:
        running.kill()
        paused.kill()
        tunnelled.kill()
    names = sorted(e.name for e in vol.list("/", api_url=opts["api_url"]))
    assert names == ["after.txt", "before.txt", "resumed.txt"]
    assert Volume.destroy(vol.volume_id, **api)  # type: ignore[arg-type]
    assert not (server.state_dir / "volumes" / vol.volume_id).exists()

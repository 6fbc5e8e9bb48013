"""Server restarts, crashes and capacity, each against a server instance of its own."""

from __future__ import annotations

import signal
import subprocess
from collections.abc import Iterator
from typing import Any

import pytest

from tests.integration.support import (
    Server,
    containers,
    host_links,
    make_server,
    netns_names,
    slacks_seen_during,
)
from vivarium.node.client import NodeError
from vivarium.runtime.cgroups import DEFAULT_TIMER_SLACK_NS, set_timer_slack

PREFIX = "vr"


@pytest.fixture()
def own_server() -> Iterator[Server]:
    srv = make_server("lifecycle", PREFIX, "10.235.0.0/24", 3101, max_sandboxes="3",
                      slot_prewarm="1")  # fmt: skip
    srv.start()
    try:
        yield srv
    finally:
        if srv.proc is None:
            srv.start()
        with srv.client() as client:
            for record in client.list_sandboxes():
                client.kill(record["sandbox_id"])
        assert srv.stop() == 0
        # A clean stop with no sandboxes leaves nothing behind on the host.
        assert netns_names(PREFIX) == set()
        assert host_links(PREFIX) == set()
        assert containers(srv.state_dir) == []


def _slot_names(count: int) -> int:
    """Namespaces per slot: router + sandbox."""
    return 2 * count


def test_crash_recovery_adopts_running_and_reports_lost(own_server: Server) -> None:
    with own_server.client() as client:
        kept = client.create()["sandbox_id"]
        doomed = client.create()["sandbox_id"]
        client.exec(kept, ["sh", "-c", "echo before-crash > /tmp/mark"])

    own_server.stop(signal.SIGKILL)
    # While the server is down, one sandbox dies and garbage appears: an unknown container's
    # worth of slot and a sandbox directory without a record.
    subprocess.run(["runsc", "--root", str(own_server.state_dir / "runsc"), "kill", doomed,
                    "KILL"], check=False)  # fmt: skip
    subprocess.run(["ip", "netns", "add", f"{PREFIX}-sb-77"], check=True)
    (own_server.state_dir / "sandboxes" / "istray0000000000000").mkdir()

    own_server.start()
    with own_server.client() as client:
        alive = {r["sandbox_id"] for r in client.list_sandboxes()}
        assert alive == {kept}
        assert client.exec(kept, ["cat", "/tmp/mark"])["stdout"] == "before-crash\n"
        lost = [e for e in client.info()["events"] if e["sandbox_id"] == doomed]
        assert lost and "restart" in lost[0]["reason"]
        # Only the adopted sandbox's slot and the prewarmed one remain.
        assert len(netns_names(PREFIX)) == _slot_names(2)
        assert f"{PREFIX}-sb-77" not in netns_names(PREFIX)
        assert containers(own_server.state_dir) == [client.get(kept)["container_id"]]
        assert not (own_server.state_dir / "sandboxes" / "istray0000000000000").exists()


def test_clean_restart_keeps_sandboxes(own_server: Server) -> None:
    with own_server.client() as client:
        created = client.create(metadata={"k": "v"})
    sandbox_id, container_id = created["sandbox_id"], created["container_id"]
    set_timer_slack(container_id, 20_000_000)  # idle when the last run stopped
    assert own_server.stop(signal.SIGTERM) == 0
    own_server.start()
    with own_server.client() as client:
        record = client.get(sandbox_id)
        assert record["metadata"] == {"k": "v"}
        # The new run does not know how idle it was: the first use makes its timers precise.
        ran: list[dict[str, Any]] = []
        seen = slacks_seen_during(
            [container_id], lambda: ran.append(client.exec(sandbox_id, ["true"]))
        )
    assert ran[0]["exit_code"] == 0
    assert {DEFAULT_TIMER_SLACK_NS} in seen[container_id]


def test_capacity_limit_is_clean(own_server: Server) -> None:
    with own_server.client() as client:
        records = [client.create() for _ in range(3)]
        before_ns = netns_names(PREFIX)
        before_dirs = sorted(p.name for p in (own_server.state_dir / "sandboxes").iterdir())
        with pytest.raises(NodeError) as excinfo:
            client.create()
        assert excinfo.value.http_status == 429
        assert "maximum" in excinfo.value.message
        assert netns_names(PREFIX) == before_ns
        after_dirs = sorted(p.name for p in (own_server.state_dir / "sandboxes").iterdir())
        assert after_dirs == before_dirs
        assert sorted(containers(own_server.state_dir)) == sorted(
            r["container_id"] for r in records
        )

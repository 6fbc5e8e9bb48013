"""Resource limits: a sandbox that runs away takes down only itself."""

from __future__ import annotations

import time
from collections.abc import Callable

from tests.integration.support import sh
from vivarium.node.client import NodeClient


def _wait_gone(client: NodeClient, sandbox_id: str, seconds: float = 20) -> dict[str, object]:
    """Wait until the node noticed the sandbox ended; return the event it recorded."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        events = [e for e in client.info()["events"] if e["sandbox_id"] == sandbox_id]
        if events and sandbox_id not in {r["sandbox_id"] for r in client.list_sandboxes()}:
            return dict(events[-1])
        time.sleep(0.25)
    raise AssertionError(f"sandbox {sandbox_id} was not reported as ended")


def test_memory_limit_kills_only_the_offender(
    client: NodeClient, sandbox: Callable[..., str]
) -> None:
    hog = sandbox(memory_mb=128)
    bystander = sandbox(memory_mb=128)
    sh(client, bystander, "echo kept > /tmp/state")

    result = client.exec(hog, ["python3", "-c", "b = bytearray(400 * 1024 * 1024); print('no')"])
    assert "no" not in result["stdout"]

    event = _wait_gone(client, hog)
    assert "out of memory" in str(event["reason"])
    assert sh(client, bystander, "cat /tmp/state")["stdout"] == "kept\n"


def test_fork_bomb_leaves_host_and_others_responsive(
    client: NodeClient, sandbox: Callable[..., str]
) -> None:
    bomb = sandbox()
    other = sandbox()
    client.exec(bomb, ["bash", "-c", ":(){ :|:& };:; sleep 10"], timeout=20)

    started = time.monotonic()
    assert client.exec(other, ["echo", "alive"])["stdout"] == "alive\n"
    assert time.monotonic() - started < 10
    assert client.info()["sandboxes"] >= 1

    # The bombed sandbox is either still running but contained, or ended and reported.
    if bomb in {r["sandbox_id"] for r in client.list_sandboxes()}:
        client.kill(bomb)
    else:
        reason = [e for e in client.info()["events"] if e["sandbox_id"] == bomb][-1]["reason"]
        assert "processes" in reason or "stopped" in reason
    assert client.exec(other, ["echo", "still"])["stdout"] == "still\n"

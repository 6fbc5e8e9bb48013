"""Resource limits: a sandbox that runs away takes down only itself."""

from __future__ import annotations

import contextlib
from collections.abc import Callable

from tests.integration.support import sh
from vivarium.node.client import NodeClient, NodeError


def test_memory_limit_kills_only_the_offender(
    client: NodeClient, sandbox: Callable[..., str]
) -> None:
    hog = sandbox(memory_mb=256)
    bystander = sandbox(memory_mb=256)
    sh(client, hog, "echo mine > /tmp/state")
    sh(client, bystander, "echo kept > /tmp/state")

    result = client.exec(hog, ["python3", "-c", "b = bytearray(1024**3); print('no')"])
    assert "no" not in result["stdout"]
    assert result["exit_code"] != 0

    # The process is gone, not the sandbox: its files and envd are there.
    assert sh(client, hog, "cat /tmp/state")["stdout"] == "mine\n"
    assert hog in {r["sandbox_id"] for r in client.list_sandboxes()}
    assert sh(client, bystander, "cat /tmp/state")["stdout"] == "kept\n"


def test_fork_bomb_leaves_host_and_others_responsive(
    client: NodeClient, sandbox: Callable[..., str]
) -> None:
    bomb = sandbox()
    other = sandbox()
    with contextlib.suppress(NodeError):  # the bomb may keep its exec from finishing in time
        client.exec(bomb, ["bash", "-c", ":(){ :|:& };:; sleep 5"], timeout=12)

    assert client.exec(other, ["echo", "alive"])["stdout"] == "alive\n"
    assert other in {r["sandbox_id"] for r in client.list_sandboxes()}

    # The bombed sandbox is either still running but contained, or ended and reported.
    if bomb in {r["sandbox_id"] for r in client.list_sandboxes()}:
        client.kill(bomb)
    else:
        reason = [e for e in client.info()["events"] if e["sandbox_id"] == bomb][-1]["reason"]
        assert "processes" in reason or "stopped" in reason
    assert client.exec(other, ["echo", "still"])["stdout"] == "still\n"

"""Two sandboxes from one template share nothing, and the template stays untouched."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from tests.integration.support import TEMPLATE_DIR, sh
from vivarium.node.client import NodeClient


def test_sandboxes_are_independent(client: NodeClient, sandbox: Callable[..., str]) -> None:
    a, b = sandbox(), sandbox()
    wrote = sh(client, a, "echo only-a > /home/user/a.txt && echo root-a > /etc/a.conf")
    assert wrote["exit_code"] == 0, wrote["stderr"]
    assert sh(client, a, "cat /home/user/a.txt")["stdout"] == "only-a\n"

    assert sh(client, b, "test -e /home/user/a.txt")["exit_code"] == 1
    assert sh(client, b, "test -e /etc/a.conf")["exit_code"] == 1

    rootfs = (Path(TEMPLATE_DIR) / "base" / "current" / "rootfs").resolve()
    assert not (rootfs / "home" / "user" / "a.txt").exists()
    assert not (rootfs / "etc" / "a.conf").exists()

    # Processes and hostnames-level state are separate too.
    sh(client, a, "nohup sleep 300 >/dev/null 2>&1 &")
    assert "sleep 300" in sh(client, a, "ps -eo args")["stdout"]
    assert "sleep 300" not in sh(client, b, "ps -eo args")["stdout"]


def test_new_sandbox_starts_from_template_state(
    client: NodeClient, sandbox: Callable[..., str]
) -> None:
    first = sandbox()
    sh(client, first, "rm -rf /home/user/.bashrc")
    second = sandbox()
    assert sh(client, second, "test -f /home/user/.bashrc")["exit_code"] == 0

"""`vivarium sandbox pause` and `resume`: the CLI over the same API the official client uses."""

from __future__ import annotations

import pytest

from tests.integration.support import Server

pytestmark = pytest.mark.timeout(900)


def test_cli_pause_and_resume(server: Server) -> None:
    created = server.cli("sandbox", "create", "--auto-pause", "--timeout", "120")
    assert created.returncode == 0, created.stderr
    sandbox_id = created.stdout.strip().splitlines()[-1]
    try:
        wrote = server.cli("sandbox", "exec", sandbox_id, "--", "sh", "-c",
                           "echo kept > /home/user/work.txt")  # fmt: skip
        assert wrote.returncode == 0, wrote.stderr
        paused = server.cli("sandbox", "pause", sandbox_id)
        assert paused.returncode == 0, paused.stderr
        assert f"paused {sandbox_id}" in paused.stdout
        listed = [line for line in server.cli("sandbox", "list").stdout.splitlines()
                  if line.startswith(sandbox_id)]  # fmt: skip
        assert len(listed) == 1 and " paused " in listed[0]
        again = server.cli("sandbox", "pause", sandbox_id)
        assert again.returncode != 0 and "409" in again.stderr
        resumed = server.cli("sandbox", "resume", sandbox_id, "--timeout", "60")
        assert resumed.returncode == 0, resumed.stderr
        read = server.cli("sandbox", "exec", sandbox_id, "--", "cat", "/home/user/work.txt")
        assert read.stdout == "kept\n"
    finally:
        server.cli("sandbox", "kill", sandbox_id)
    unknown = server.cli("sandbox", "pause", "inope00000000000000")
    assert unknown.returncode != 0 and "not found" in unknown.stderr

"""A runaway process loses only itself: memory, disk and fork bombs through the official client.

After each bomb a command proves the sandbox alive and its files intact, and a neighbour
sandbox is unaffected. The server gives sandboxes 512 MiB of memory and a 512 MiB disk so that
the bombs are quick.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator

import httpx
import pytest
from e2b import CommandExitException, Sandbox, SandboxMetrics

from tests.integration.support import Server, running_server, sdk_options

pytestmark = pytest.mark.timeout(900)

API_PORT = 3121  # proxy on API_PORT + 1000
MEMORY_MB = 512
DISK_MB = 512


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    with running_server("runaway", "vk", "10.247.0.0/24", API_PORT,
                        default_memory_mb=str(MEMORY_MB),
                        default_disk_mb=str(DISK_MB)) as srv:  # fmt: skip
        yield srv


@pytest.fixture(scope="module")
def neighbour(server: Server) -> Iterator[Sandbox]:
    sbx = Sandbox.create(timeout=600, **sdk_options(server))  # type: ignore[arg-type]
    sbx.files.write("/home/user/mine.txt", "neighbour's")
    yield sbx
    with contextlib.suppress(Exception):
        sbx.kill()


@pytest.fixture()
def victim(server: Server) -> Iterator[Sandbox]:
    sbx = Sandbox.create(timeout=300, **sdk_options(server))  # type: ignore[arg-type]
    sbx.files.write("/home/user/kept.txt", "kept")
    # timeout=0: without a deadline, as the SDK's default of 60 s would end it mid-test.
    sbx.commands.run("sleep 3600", background=True, timeout=0)
    yield sbx
    with contextlib.suppress(Exception):
        sbx.kill()


def _fails(sbx: Sandbox, cmd: str, **kwargs: object) -> CommandExitException:
    with pytest.raises(CommandExitException) as info:
        sbx.commands.run(cmd, **kwargs)  # type: ignore[call-overload]
    return info.value


def _sample_when_full(sbx: Sandbox) -> SandboxMetrics:
    """The first metrics sample that shows the disk filled: the host sees the sandbox's writes
    only once they reach its disk, some seconds after the writer got ENOSPC under load."""
    deadline = time.monotonic() + 120
    while True:
        taken = sbx.get_metrics()
        if taken and taken[-1].disk_used > 0.9 * taken[-1].disk_total:
            return taken[-1]
        assert time.monotonic() < deadline, f"the disk never showed full: {taken[-1:]}"
        time.sleep(1)


def _intact(sbx: Sandbox, neighbour: Sandbox, server: Server | None = None) -> None:
    """The sandbox answers, its files and other processes are there; the neighbour too."""
    assert sbx.commands.run("echo alive").stdout == "alive\n"
    assert sbx.files.read("/home/user/kept.txt") == "kept"
    processes = sbx.commands.run("ps -eo args").stdout
    # Its console says why, should the process be gone (the guest's OOM and fork-bomb guards
    # write there).
    assert "sleep 3600" in processes, (processes, server and _log(server, sbx.sandbox_id))
    assert neighbour.commands.run("cat /home/user/mine.txt").stdout == "neighbour's"


def _log(server: Server, sandbox_id: str) -> str:
    response = httpx.get(f"http://127.0.0.1:{API_PORT}/sandboxes/{sandbox_id}/logs",
                         headers={"X-API-Key": sdk_options(server)["api_key"]})  # fmt: skip
    response.raise_for_status()
    return "\n".join(entry["line"] for entry in response.json()["logs"])


def test_a_memory_bomb_is_killed_and_the_sandbox_lives_on(
    server: Server, victim: Sandbox, neighbour: Sandbox
) -> None:
    # Far past the sandbox's memory: what brought a whole sandbox down before.
    failed = _fails(victim, "python3 -c 'x = bytearray(8 * 1024**3)'", timeout=120)
    # Killed as a kernel's OOM killer would (envd reports a signal as E2B's does: exit code -1).
    assert failed.error == "signal: killed" or "MemoryError" in failed.stderr, failed
    _intact(victim, neighbour, server)
    assert "out of memory: killed process" in _log(server, victim.sandbox_id)
    # Memory is free again: an ordinary allocation works.
    victim.commands.run("python3 -c 'x = bytearray(100 * 1024**2)'")


def test_parallel_memory_bombs_are_all_killed(
    server: Server, victim: Sandbox, neighbour: Sandbox
) -> None:
    # The command's whole process group goes: its memory is spread over several processes.
    bombs = "for i in 1 2 3 4; do python3 -c 'x = bytearray(1024**3)' & done; wait"
    failed = _fails(victim, bombs, timeout=120)
    assert failed.error == "signal: killed", failed
    _intact(victim, neighbour, server)


def test_a_full_disk_fails_writes_with_enospc_and_the_sandbox_lives_on(
    server: Server, victim: Sandbox, neighbour: Sandbox
) -> None:
    failed = _fails(victim, "dd if=/dev/zero of=/home/user/fill bs=1M", timeout=120)
    assert "No space left on device" in failed.stderr
    # The disk's size and use, as the official client reads them (`df` inside shows gVisor's
    # 8 EiB: this runsc has no way to report the real size to statfs).
    metric = _sample_when_full(victim)
    assert 0.9 * DISK_MB * 2**20 < metric.disk_total <= DISK_MB * 2**20
    assert metric.disk_used > 0.9 * metric.disk_total
    _intact(victim, neighbour, server)
    # The memory limit was not spent on the written data: memory is still there.
    victim.commands.run("python3 -c 'x = bytearray(200 * 1024**2)'")
    victim.commands.run("rm /home/user/fill")
    victim.files.write("/home/user/after.txt", "written after")
    assert victim.files.read("/home/user/after.txt") == "written after"


# How long a classic fork bomb may make the sandbox crawl (below): the longest seen was ~2 min.
BOMB_S = 360

# Starts processes until the process limit and stays there, retrying.
FORK_AND_HOLD = "while :; do sleep 1000 & done"


def _wait_log(server: Server, sandbox_id: str, text: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while text not in _log(server, sandbox_id):
        assert time.monotonic() < deadline, f"no {text!r} in the sandbox's log"
        time.sleep(1)


def _process_count(sbx: Sandbox) -> int:
    return int(sbx.commands.run("ps -e --no-headers | wc -l", user="root", timeout=BOMB_S).stdout)


def test_a_user_held_at_the_process_limit_loses_that_session(
    server: Server, victim: Sandbox, neighbour: Sandbox
) -> None:
    victim.commands.run(f"bash -c '{FORK_AND_HOLD}'", background=True)
    # fork() fails with EAGAIN at the limit; a user held there for seconds is running a fork
    # bomb, and the session of the command that started it is killed.
    _wait_log(server, victim.sandbox_id, "process limit: uid 1000")
    _intact(victim, neighbour, server)
    assert _process_count(victim) < 20


def test_a_classic_fork_bomb_leaves_the_sandbox_alive(
    server: Server, victim: Sandbox, neighbour: Sandbox
) -> None:
    victim.commands.run("bash -c ':(){ :|:& };:'", background=True)
    # envd answers throughout, slowly while the bomb runs (root is exempt from the limit): the
    # bomb's processes hold the sandbox's one CPU, and gVisor gives no task priority over
    # another, so each system call of envd's, or of the init that kills the bomb at the limit,
    # waits its turn behind them. A minute or two, measured.
    assert victim.commands.run("echo alive", user="root", timeout=BOMB_S).stdout == "alive\n"
    deadline = time.monotonic() + BOMB_S
    while True:  # it dies out, or is killed at the limit
        # Meanwhile the bomb's memory may get a command of ours OOM-killed too: look again.
        with contextlib.suppress(CommandExitException):
            if _process_count(victim) < 20:
                break
        assert time.monotonic() < deadline, "the fork bomb goes on"
        time.sleep(1)
    _intact(victim, neighbour, server)


# Bad input for pause: a sandbox busy running away at the moment it is paused.


def _snapshot_mib(server: Server, sandbox_id: str) -> float:
    """The size of the sandbox's image (kept as chunks, which share what they can)."""
    manifest = server.state_dir / "snapshots" / sandbox_id / "manifest.json"
    return int(json.loads(manifest.read_text())["size_bytes"]) / 2**20


def test_a_pause_while_a_process_writes_to_disk_as_fast_as_it_can(
    server: Server, victim: Sandbox, neighbour: Sandbox
) -> None:
    flood = "while :; do dd if=/dev/zero of=/home/user/flood bs=1M count=200 2>/dev/null; done"
    victim.commands.run(f"bash -c '{flood}'", background=True)
    time.sleep(1)
    assert victim.pause() is True
    resumed = Sandbox.connect(victim.sandbox_id, timeout=300, **sdk_options(server))  # type: ignore[arg-type]
    assert "bash -c" in resumed.commands.run("ps -eo args").stdout  # the writer carries on
    resumed.commands.run("pkill -f '[w]hile :'")
    _intact(resumed, neighbour, server)


def test_a_pause_during_a_memory_bomb(server: Server, victim: Sandbox, neighbour: Sandbox) -> None:
    victim.commands.run("python3 -c 'x = bytearray(8 * 1024**3)'", background=True)
    time.sleep(0.3)
    # Either the pause saves the bomb too (and it is killed after the resume), or the bomb is
    # killed first; either way the sandbox and its state are kept.
    assert victim.pause() is True
    resumed = Sandbox.connect(victim.sandbox_id, timeout=300, **sdk_options(server))  # type: ignore[arg-type]
    deadline = time.monotonic() + 60
    while "bytearray" in resumed.commands.run("ps -eo args").stdout:
        assert time.monotonic() < deadline, "the memory bomb survived the resume"
        time.sleep(0.5)
    _intact(resumed, neighbour, server)


def test_a_sandbox_with_a_full_disk_pauses_and_resumes_with_its_files(
    server: Server, victim: Sandbox, neighbour: Sandbox
) -> None:
    # Random bytes: what does not compress shows what a full disk costs a snapshot.
    _fails(victim, "dd if=/dev/urandom of=/home/user/fill bs=1M", timeout=180)
    size = victim.commands.run("stat -c %s /home/user/fill").stdout.strip()
    assert victim.pause() is True
    assert _snapshot_mib(server, victim.sandbox_id) > int(size) / 2**20  # every written byte
    resumed = Sandbox.connect(victim.sandbox_id, timeout=300, **sdk_options(server))  # type: ignore[arg-type]
    assert resumed.commands.run("stat -c %s /home/user/fill").stdout.strip() == size
    resumed.commands.run("rm /home/user/fill")
    _intact(resumed, neighbour, server)

"""Details where the official client, or code written against E2B, expects exactly what E2B does:
each found by driving the client as a new user would (docs/compatibility.md, "Details")."""

from __future__ import annotations

import concurrent.futures
import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import httpx
import pytest
from e2b import FilesystemEventType, Sandbox, SandboxException

from tests.compat.conftest import Compat
from tests.integration.support import REPO

CREATE, CHMOD, WRITE = (FilesystemEventType.CREATE, FilesystemEventType.CHMOD,
                        FilesystemEventType.WRITE)  # fmt: skip


@pytest.fixture()
def sbx(compat: Compat) -> Iterator[Sandbox]:
    sandbox = Sandbox.create(timeout=120)
    try:
        yield sandbox
    finally:
        sandbox.kill()


# --- 1. the watch events of files.write -----------------------------------------------------------


def test_a_written_file_is_create_chmod_write_at_once(sbx: Sandbox) -> None:
    # envd creates the file, gives it to the user, then writes: the client's own tests read all
    # three with one get_new_events() right after write() returns.
    sbx.files.make_dir("watched")
    handle = sbx.files.watch_dir("watched")
    try:
        sbx.files.write("watched/new.txt", "first")
        assert [(e.type, e.name) for e in handle.get_new_events()] == [
            (CREATE, "new.txt"), (CHMOD, "new.txt"), (WRITE, "new.txt")]  # fmt: skip
        sbx.files.write("watched/new.txt", "second")  # replacing: ownership again, truncate+write
        assert [(e.type, e.name) for e in handle.get_new_events()] == [
            (CHMOD, "new.txt"), (WRITE, "new.txt")]  # fmt: skip
        sbx.files.write("watched/empty.txt", "")  # nothing written, no write event
        assert [(e.type, e.name) for e in handle.get_new_events()] == [
            (CREATE, "empty.txt"), (CHMOD, "empty.txt")]  # fmt: skip
    finally:
        handle.stop()


def test_recursive_watches_report_the_same_sequence(sbx: Sandbox) -> None:
    sbx.files.make_dir("tree/nested")
    handle = sbx.files.watch_dir("tree", recursive=True)
    try:
        sbx.files.write("tree/nested/deep.txt", "x")
        assert [(e.type, e.name) for e in handle.get_new_events()] == [
            (CREATE, "nested/deep.txt"), (CHMOD, "nested/deep.txt"),
            (WRITE, "nested/deep.txt")]  # fmt: skip
        # A directory made after the watch started is watched too.
        sbx.files.make_dir("tree/later")
        sbx.files.write("tree/later/file.txt", "y")
        events = [(e.type, e.name) for e in handle.get_new_events()]
        assert events[0] == (CREATE, "later")
        assert [t for t, name in events if name == "later/file.txt"] == [CREATE, CHMOD, WRITE]
    finally:
        handle.stop()


# --- signed file URLs ----------------------------------------------------------------------------


def test_signed_file_urls_work_as_the_client_returns_them(sbx: Sandbox) -> None:
    """upload_url() and download_url() point at E2B_SANDBOX_URL with no sandbox named: the
    proxy finds the sandbox whose token made the signature, and envd checks it again."""
    upload = sbx.upload_url("/home/user/signed.txt", use_signature_expiration=60)
    sent = httpx.post(upload, files={"file": ("signed.txt", b"through a signed URL")})
    assert sent.status_code == 200, sent.text
    download = sbx.download_url("/home/user/signed.txt", use_signature_expiration=60)
    assert httpx.get(download).content == b"through a signed URL"
    forged = download.replace("signature=v1_", "signature=v1_A")
    assert httpx.get(forged).status_code == 400  # no sandbox signed it: nothing is reached
    as_write = upload.replace("signed.txt", "other.txt")  # signed for another path
    assert httpx.post(as_write, files={"file": ("x", b"x")}).status_code == 400


def test_get_host_works_as_returned_with_no_dns_set_up(sbx: Sandbox) -> None:
    """get_host(port) is `<port>-<id>.localhost:<proxy port>`: *.localhost is loopback for the
    client library (libnss-myhostname) and for curl alike, and the proxy routes by the name."""
    sbx.files.write("/home/user/site/page.txt", "served through get_host")
    sbx.commands.run("python3 -m http.server 8000 --directory /home/user/site", background=True)
    host = sbx.get_host(8000)
    proxy_port = os.environ["E2B_SANDBOX_URL"].rsplit(":", 1)[1]
    assert host == f"8000-{sbx.sandbox_id}.localhost:{proxy_port}"
    deadline = time.monotonic() + 30
    while True:
        answer = httpx.get(f"http://{host}/page.txt")
        if answer.status_code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.2)  # the server is still starting: the proxy answers 502 meanwhile
    assert answer.text == "served through get_host"
    curl = subprocess.run(["curl", "-sS", f"http://{host}/page.txt"], capture_output=True,
                          text=True, timeout=30, check=True)  # fmt: skip
    assert curl.stdout == "served through get_host"
    other = httpx.get(f"http://8000-nosuchsandbox.localhost:{proxy_port}/page.txt")
    assert other.status_code == 502 and "nosuchsandbox was not found" in other.text


# --- 4. metrics over a range ---------------------------------------------------------------------


def test_metrics_come_only_from_inside_the_range_asked_for(sbx: Sandbox) -> None:
    now = datetime.now(UTC)
    past = sbx.get_metrics(start=now - timedelta(hours=2), end=now - timedelta(hours=1))
    assert past == []  # nothing was sampled then; a sample taken now is not from then
    sbx.commands.run("python3 -c 'sum(range(10**7))'")  # some CPU between samples
    time.sleep(11)  # the node samples every 5 s: two intervals and more, even if one runs late
    later = datetime.now(UTC)
    samples = sbx.get_metrics(start=now - timedelta(minutes=1), end=later)
    assert len(samples) >= 2
    assert all(now - timedelta(minutes=1) <= s.timestamp <= later for s in samples)
    assert [s.timestamp for s in samples] == sorted(s.timestamp for s in samples)
    assert all(s.mem_total > 0 and 0 < s.mem_used <= s.mem_total for s in samples)
    assert all(0 <= s.cpu_used_pct <= 100 and s.disk_total > 0 for s in samples)
    middle = samples[len(samples) // 2].timestamp  # ranges are whole seconds on the wire
    narrower = sbx.get_metrics(start=middle, end=later)
    assert narrower and all(s.timestamp >= middle - timedelta(seconds=1) for s in narrower)
    assert len(narrower) < len(samples)
    with pytest.raises(SandboxException, match="400: start .* is after end"):
        sbx.get_metrics(start=now, end=now - timedelta(hours=1))


# --- 5. `python` ----------------------------------------------------------------------------------


@pytest.mark.parametrize("template", ["base", "code-interpreter-v1"])
def test_python_is_python_3(compat: Compat, template: str) -> None:
    sandbox = Sandbox.create(template, timeout=60)
    try:
        assert sandbox.commands.run("python --version").stdout.startswith("Python 3.")
        assert sandbox.commands.run("python -c 'print(6 * 7)'").stdout == "42\n"
    finally:
        sandbox.kill()


# --- 6. machine identity --------------------------------------------------------------------------

IDENTITY = "cat /etc/machine-id; hostname; cat /etc/hostname"


def test_each_sandbox_is_its_own_machine_named_like_e2bs(compat: Compat) -> None:
    # Siblings restored from one template checkpoint: each gets its own machine id. (Not its own
    # boot id: gVisor keeps it in the checkpointed kernel and refuses mounts over /proc, see
    # docs/compatibility.md.)
    first, second = Sandbox.create(timeout=120), Sandbox.create(timeout=120)
    try:
        machine_a, host_a, file_a = first.commands.run(IDENTITY).stdout.split()
        machine_b, host_b, _ = second.commands.run(IDENTITY).stdout.split()
        assert re.fullmatch("[0-9a-f]{32}", machine_a) and re.fullmatch("[0-9a-f]{32}", machine_b)
        assert machine_a != machine_b
        assert host_a == host_b == file_a == "e2b.local"
        # Paused and resumed, a machine is still itself.
        first.pause()
        again = Sandbox.connect(first.sandbox_id, timeout=120)
        assert again.commands.run("cat /etc/machine-id").stdout.strip() == machine_a
    finally:
        first.kill()
        second.kill()


# --- the same scenario through the current client and one users pin (2.45) ------------------------

OLD_CLIENT = REPO / ".venv-e2b-2.45" / "bin" / "python"
CLIENTS = {"2.63": sys.executable, "2.45": str(OLD_CLIENT)}

# Each scenario prints one JSON line: for the sync and the async client, the exception raised as
# (is it a TimeoutException, its class, its message), or null when none was.
KILLED_WHILE_RUNNING = """
import asyncio, json
from e2b import AsyncSandbox, Sandbox, TimeoutException

def seen(exc):
    return [isinstance(exc, TimeoutException), type(exc).__name__, str(exc)]

def sync():
    sbx = Sandbox.create(timeout=120)
    handle = sbx.commands.run("sleep 60", background=True)
    sbx.kill()
    try:
        handle.wait()
    except Exception as exc:
        return seen(exc)

async def async_():
    sbx = await AsyncSandbox.create(timeout=120)
    handle = await sbx.commands.run("sleep 60", background=True)
    await sbx.kill()
    try:
        await handle.wait()
    except Exception as exc:
        return seen(exc)

print(json.dumps({"sync": sync(), "async": asyncio.run(async_())}))
"""

COMMAND_TIMEOUT = """
import asyncio, json
from e2b import AsyncSandbox, Sandbox, TimeoutException

def seen(exc):
    return [isinstance(exc, TimeoutException), type(exc).__name__, str(exc)]

def sync():
    sbx = Sandbox.create(timeout=120)
    try:
        sbx.commands.run("sleep 10", timeout=2)
    except Exception as exc:
        return seen(exc)
    finally:
        sbx.kill()

async def async_():
    sbx = await AsyncSandbox.create(timeout=120)
    try:
        await sbx.commands.run("sleep 10", timeout=2)
    except Exception as exc:
        return seen(exc)
    finally:
        await sbx.kill()

print(json.dumps({"sync": sync(), "async": asyncio.run(async_())}))
"""

PAUSED_ELSEWHERE = """
import asyncio, json
from e2b import Sandbox, SandboxException

def seen(exc):
    return [isinstance(exc, SandboxException), type(exc).__name__, str(exc)]

sbx = Sandbox.create(timeout=120)
Sandbox.pause(sbx.sandbox_id)  # another client pauses it
out = {}
for name, call in (("commands.run", lambda: sbx.commands.run("echo hi")),
                   ("files.read", lambda: sbx.files.read("/etc/hostname"))):
    try:
        call()
        out[name] = None
    except Exception as exc:
        out[name] = seen(exc)
Sandbox.kill(sbx.sandbox_id)
print(json.dumps(out))
"""


def _run_client(compat: Compat, version: str, script: str) -> dict[str, Any]:
    if not OLD_CLIENT.exists():
        pytest.fail(f"no {OLD_CLIENT}: `make old-clients` (which `make test` runs) installs it")
    env = {**os.environ, "E2B_API_KEY": compat.api_key, "E2B_API_URL": compat.api_url,
           "E2B_SANDBOX_URL": compat.sandbox_url}  # fmt: skip
    # e2b 2.45 talks through pyqwest, whose Rust threads can race CPython 3.11's shutdown and
    # abort it (PyO3's "PyGILState_Release ... finalizing"). The test is about what the client
    # raised, printed before exit, so the script leaves without running finalization.
    script += "\nimport os, sys\nsys.stdout.flush()\nos._exit(0)\n"
    done = subprocess.run([CLIENTS[version], "-c", script], env=env, capture_output=True,
                          text=True, timeout=240)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize("version", sorted(CLIENTS))
def test_a_wait_on_a_killed_sandbox_says_it_was_killed(compat: Compat, version: str) -> None:
    # 2.45 adds the phrase only once its own /health probe, after the dropped stream, hears that
    # the sandbox is gone (502, "was not found"); 2.63 knows it from the proxy's answer.
    seen = _run_client(compat, version, KILLED_WHILE_RUNNING)
    for mode in ("sync", "async"):
        assert seen[mode] is not None, f"{mode}: wait() returned"
        is_timeout, _, message = seen[mode]
        assert is_timeout, (mode, seen[mode])
        assert "killed or reached its" in message, (mode, seen[mode])


@pytest.mark.parametrize("version", sorted(CLIENTS))
def test_a_command_past_its_timeout_raises_a_timeout(compat: Compat, version: str) -> None:
    # envd ends the stream with deadline_exceeded at the deadline, as connect-go does: the
    # client reports a timeout, not the exit status of the process the deadline killed.
    seen = _run_client(compat, version, COMMAND_TIMEOUT)
    for mode in ("sync", "async"):
        assert seen[mode] is not None and seen[mode][0], (mode, seen[mode])


@pytest.mark.parametrize("version", sorted(CLIENTS))
def test_a_sandbox_paused_by_another_client_says_so_and_how_to_resume(
    compat: Compat, version: str
) -> None:
    seen = _run_client(compat, version, PAUSED_ELSEWHERE)
    for call in ("commands.run", "files.read"):
        assert seen[call] is not None, f"{call} worked on a paused sandbox"
        is_sandbox_error, _, message = seen[call]
        assert is_sandbox_error, (call, seen[call])
        assert "is paused" in message and "Sandbox.connect(" in message, (call, seen[call])


# --- the Idempotency-Key of a create -------------------------------------------------------------


def test_a_create_sent_again_with_its_idempotency_key_gets_the_same_sandbox(
    compat: Compat,
) -> None:
    # The client resends a create whose answer it lost (a 502 on the way, a timeout): with a
    # key, resends, even concurrent ones, make one sandbox.
    key = f"lesson-{uuid.uuid4()}"
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        made = list(pool.map(lambda _: Sandbox.create(timeout=60, idempotency_key=key), range(3)))
    try:
        assert len({s.sandbox_id for s in made}) == 1
        assert made[0].commands.run("echo one").stdout == "one\n"  # its tokens work from each
        assert made[2].commands.run("echo same").stdout == "same\n"
        other = Sandbox.create(timeout=60, idempotency_key=f"lesson-{uuid.uuid4()}")
        assert other.sandbox_id != made[0].sandbox_id
        other.kill()
    finally:
        made[0].kill()
    with compat.admin() as http:
        bad = http.post("/sandboxes", json={"templateID": "base"},
                        headers={"Idempotency-Key": "Not_Allowed"})  # fmt: skip
        assert bad.status_code == 400 and "Idempotency-Key" in bad.json()["message"]

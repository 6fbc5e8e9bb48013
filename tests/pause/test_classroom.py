"""The classroom scenario through the official client: a student's sandbox auto-pauses at its
timeout, the server restarts, and `Sandbox.connect` brings back the files, the pip-installed
package, a running background process (continuing its count) and a Python REPL's variables."""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import threading
import time
import zipfile
from collections.abc import Callable

import pytest
from e2b import PtySize, Sandbox, SandboxState

from tests.integration.support import Server
from tests.pause.conftest import opts as _opts
from vivarium.node.chunks import ChunkStore
from vivarium.node.snapshots import chunk_recipes

pytestmark = pytest.mark.timeout(900)


def _wheel() -> bytes:
    """A tiny pure-Python wheel built here: the sandbox installs it with no network."""
    files = {
        "greeting/__init__.py": "def hello():\n    return 'hello from a wheel'\n",
        "greeting-1.0.dist-info/METADATA": "Metadata-Version: 2.1\nName: greeting\nVersion: 1.0\n",
        "greeting-1.0.dist-info/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: "
        "true\nTag: py3-none-any\n",
    }
    record = "".join(f"{name},,\n" for name in files) + "greeting-1.0.dist-info/RECORD,,\n"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as wheel:
        for name, text in {**files, "greeting-1.0.dist-info/RECORD": record}.items():
            wheel.writestr(name, text)
    return buffer.getvalue()


def _wait_for(check: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


def _attach(sbx: Sandbox, pid: int, sink: bytearray) -> None:
    handle = sbx.pty.connect(pid)

    def drain() -> None:
        with contextlib.suppress(Exception):  # the stream ends at the pause, the REPL does not
            handle.wait(on_pty=sink.extend)

    threading.Thread(target=drain, daemon=True).start()


# Replaces its file whole, so that a read (or a pause) never meets it truncated and empty.
COUNTER = (
    "import os, time\nn = 0\nwhile True:\n    n += 1\n"
    "    open('/home/user/count.tmp', 'w').write(str(n))\n"
    "    os.replace('/home/user/count.tmp', '/home/user/count.txt')\n    time.sleep(0.2)\n"
)


def test_student_comes_back_to_everything(server: Server) -> None:
    opts = _opts(server)
    sbx = Sandbox.create(timeout=300, metadata={"student": "ada"},
                         lifecycle={"on_timeout": "pause"}, **opts)  # type: ignore[arg-type]  # fmt: skip
    sbx.files.write("/home/user/my_first_program.py", "print('my first program')\n")
    sbx.files.write("/home/user/exercises/ex1.py", "answer = 42\n")
    sbx.files.write("/home/user/greeting-1.0-py3-none-any.whl", _wheel())
    sbx.commands.run("python3 -m pip install --user --break-system-packages --no-index "
                     "/home/user/greeting-1.0-py3-none-any.whl")  # fmt: skip
    sbx.files.write("/home/user/counter.py", COUNTER)
    sbx.commands.run("python3 /home/user/counter.py", background=True, timeout=0)
    terminal = sbx.pty.create(PtySize(rows=24, cols=80))
    screen = bytearray()
    _attach(sbx, terminal.pid, screen)
    sbx.pty.send_stdin(terminal.pid, b"python3 -q\n")
    _wait_for(lambda: b">>> " in screen)
    sbx.pty.send_stdin(terminal.pid, b"secret = 6 * 7\n")
    _wait_for(lambda: int(sbx.files.read("/home/user/count.txt") or 0) >= 5)

    # The lesson ends: the timeout pauses the sandbox instead of killing it.
    sbx.set_timeout(2)
    _wait_for(lambda: Sandbox.get_info(sbx.sandbox_id, **opts).state == SandboxState.PAUSED)  # type: ignore[arg-type]
    paused_at = time.monotonic()

    # Overnight the server restarts.
    server.stop()
    server.start()
    assert [s.sandbox_id for s in Sandbox.list(**opts).next_items()] == [sbx.sandbox_id]  # type: ignore[arg-type]
    time.sleep(max(0.0, 3 - (time.monotonic() - paused_at)))

    back = Sandbox.connect(sbx.sandbox_id, timeout=300, **opts)  # type: ignore[arg-type]
    assert back.get_info().state == SandboxState.RUNNING
    assert back.get_info().metadata == {"student": "ada"}
    assert back.files.read("/home/user/my_first_program.py") == "print('my first program')\n"
    assert (
        back.commands.run("python3 /home/user/my_first_program.py").stdout == "my first program\n"
    )
    assert back.files.read("/home/user/exercises/ex1.py") == "answer = 42\n"
    imported = back.commands.run("python3 -c 'import greeting; print(greeting.hello())'")
    assert imported.stdout == "hello from a wheel\n"
    # The counter kept its memory: it continues from where it stood (frozen while paused),
    # instead of starting again from 1 or having run on through the pause.
    resumed = int(back.files.read("/home/user/count.txt"))
    _wait_for(lambda: int(back.files.read("/home/user/count.txt")) > resumed)
    assert resumed >= 5
    assert "counter.py" in back.commands.run("ps -eo args").stdout
    # The REPL still holds its variable.
    screen.clear()
    _attach(back, terminal.pid, screen)
    back.pty.send_stdin(terminal.pid, b"print('secret is', secret)\n")
    _wait_for(lambda: b"secret is 42" in screen)
    back.kill()


def test_pause_edge_cases(server: Server) -> None:
    opts = _opts(server)
    sbx = Sandbox.create(timeout=120, **opts)  # type: ignore[arg-type]
    sbx.files.write("/tmp/state.txt", "kept")
    assert sbx.pause() is True
    assert sbx.pause() is False  # already paused: 409, which the client reports as False
    with pytest.raises(Exception, match="not running"):
        sbx.set_timeout(30)
    # Kill of a paused sandbox removes its snapshot; it is gone for good.
    snapshot_dir = server.state_dir / "snapshots" / sbx.sandbox_id
    assert snapshot_dir.is_dir()
    assert Sandbox.kill(sbx.sandbox_id, **opts)  # type: ignore[arg-type]
    assert not snapshot_dir.exists()
    with pytest.raises(Exception, match="not found"):
        Sandbox.connect(sbx.sandbox_id, **opts)  # type: ignore[arg-type]


def test_corrupt_snapshot_is_refused_and_kept(server: Server) -> None:
    opts = _opts(server)
    sbx = Sandbox.create(timeout=120, **opts)  # type: ignore[arg-type]
    assert sbx.pause()
    # A chunk of its kernel state: every sandbox's own (tests/pause/test_dedup.py damages one
    # that siblings share).
    snapshots = server.state_dir / "snapshots"
    chunks = ChunkStore(snapshots / "chunks")
    manifest = json.loads((snapshots / sbx.sandbox_id / "manifest.json").read_text())
    chunk = chunks.path(chunk_recipes(manifest, chunks)["checkpoint.img"][0][0])
    original = chunk.read_bytes()
    chunk.write_bytes(original[:-1] + bytes([original[-1] ^ 0xFF]))
    with pytest.raises(Exception, match="corrupt"):
        Sandbox.connect(sbx.sandbox_id, **opts)  # type: ignore[arg-type]
    assert Sandbox.get_info(sbx.sandbox_id, **opts).state == SandboxState.PAUSED  # type: ignore[arg-type]
    chunk.write_bytes(original)  # repaired: the same snapshot resumes
    back = Sandbox.connect(sbx.sandbox_id, **opts)  # type: ignore[arg-type]
    assert back.commands.run("echo alive").stdout == "alive\n"
    back.kill()


def test_pause_on_a_full_disk_is_refused_and_keeps_the_sandbox(server: Server) -> None:
    sbx = Sandbox.create(timeout=120, **_opts(server))  # type: ignore[arg-type]
    snapshots = server.state_dir / "snapshots"
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(snapshots)], check=True)
    try:
        sbx.files.write("/home/user/work.txt", "unsaved work")
        with pytest.raises(Exception, match="not enough disk space"):
            sbx.pause()
        assert sbx.is_running()
        assert sbx.files.read("/home/user/work.txt") == "unsaved work"
        assert list(snapshots.iterdir()) == []  # nothing half-written
    finally:
        subprocess.run(["umount", str(snapshots)], check=True)
    assert sbx.pause() is True  # with room again, the same sandbox pauses
    back = Sandbox.connect(sbx.sandbox_id, **_opts(server))  # type: ignore[arg-type]
    assert back.files.read("/home/user/work.txt") == "unsaved work"
    back.kill()

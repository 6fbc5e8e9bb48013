"""envd on the host: a real `python -m vivarium.guest.envd` process on a free localhost port, and
the official `e2b` client pointed at it.

The client runs in debug mode (`E2B_DEBUG=true`): `Sandbox.create()` then makes no control-plane
call, and `E2B_SANDBOX_URL` sends all sandbox traffic to our envd. envd runs as whoever runs the
tests; processes it starts switch to the request's user, so the suite expects root.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2b import Sandbox

REPO = Path(__file__).resolve().parents[2]
ENVD_PIDS: dict[str, int] = {}  # base URL -> pid of the envd serving it


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=1) as response:
            return bool(200 <= response.status < 300)
    except OSError:
        return False


@contextlib.contextmanager
def run_envd() -> Iterator[str]:
    """A fresh envd process on a free port; yields its base URL."""
    if os.geteuid() != 0:
        pytest.fail("envd tests start processes as other users and need root (`make test`)")
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    # envd spawns every process through the helper templates compile from guest/spawn.c.
    helper = Path(tempfile.mkdtemp(prefix="vivarium-spawn-")) / "vivarium-spawn"
    subprocess.run(["gcc", "-O2", "-o", str(helper), str(REPO / "src/vivarium/guest/spawn.c")],
                   check=True)  # fmt: skip
    # envd's own output goes to a file so a failing start can show why.
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "vivarium.guest.envd", "--host", "127.0.0.1",
             "--port", str(port), "--default-user", "root"],
            cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
            env={**os.environ, "VIVARIUM_SPAWN_HELPER": str(helper)},
        )  # fmt: skip
        try:
            deadline = time.monotonic() + 20
            while not _healthy(url):
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    pytest.fail(f"envd did not come up:\n{log.read().decode(errors='replace')}")
                time.sleep(0.05)
            ENVD_PIDS[url] = proc.pid
            yield url
        finally:
            ENVD_PIDS.pop(url, None)
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            shutil.rmtree(helper.parent, ignore_errors=True)


# On hosts whose root profile runs `pyenv init` (this CI's machines do), every `bash -l` as root
# takes pyenv's rehash lock for a moment; a test that kills such a shell at that moment leaves
# the lock behind, and every later login shell then waits a minute for it. Not ours to fix, but
# it must not turn one killed process into a dozen timeouts.
PYENV_LOCK = Path.home() / ".pyenv" / "shims" / ".pyenv-shim"


@pytest.fixture(autouse=True)
def _no_stale_pyenv_lock() -> None:
    with contextlib.suppress(OSError):
        if time.time() - PYENV_LOCK.stat().st_mtime > 20:
            PYENV_LOCK.unlink()


@pytest.fixture(scope="session")
def envd_url() -> Iterator[str]:
    with run_envd() as url:
        yield url


@pytest.fixture
def sbx(envd_url: str, monkeypatch: pytest.MonkeyPatch) -> Sandbox:
    monkeypatch.setenv("E2B_DEBUG", "true")
    monkeypatch.setenv("E2B_SANDBOX_URL", envd_url)
    monkeypatch.setenv("E2B_API_KEY", "test")
    return Sandbox.create()

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


# envd runs commands in login shells, here as the host's root. On hosts whose root profile runs
# `pyenv init` (this CI's machines do), each such shell takes pyenv's rehash lock and writes to
# stderr while another holds it: noise in what the tests compare. So the test envd runs in a
# mount namespace of its own, where root's shell startup files are empty (exec keeps its pid).
HIDE_ROOT_PROFILE = [
    "unshare", "--mount", "--propagation", "private", "sh", "-c",
    'for f in ~/.bashrc ~/.profile ~/.bash_profile ~/.bash_login; do'
    ' if [ -f "$f" ]; then mount --bind /dev/null "$f" || exit 1; fi; done; exec "$@"',
    "sh",
]  # fmt: skip


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
            [*HIDE_ROOT_PROFILE, sys.executable, "-m", "vivarium.guest.envd",
             "--host", "127.0.0.1", "--port", str(port), "--default-user", "root"],
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

"""Other local users (and the sandboxes' sentries, which run on the host as `nobody`) reach none
of the server's state: not the node socket, not a record's token or env vars, not a snapshot's
memory image, not the catalog or the keys. Each probe runs as `nobody`."""

from __future__ import annotations

import os
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from e2b import Sandbox

from tests.integration.support import VIVARIUM, Server, make_server, sdk_options
from tests.security.conftest import API_PORT

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
# nobody allowed to read and search everything (but not to write): so that a connection to the
# socket tests the socket's own mode, not only the state directory's.
NOBODY_SEARCHING = [*NOBODY, "--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"]
SECRET = "correct-horse-battery-staple"

# Prints each path given on stdin that it could open for reading, or connect to.
PROBE = """
import socket, sys
for path in sys.stdin.read().split("\\0"):
    if not path:
        continue
    try:
        if path.endswith(".sock"):
            s = socket.socket(socket.AF_UNIX)
            s.connect(path)
        else:
            open(path, "rb").read(1)
    except OSError:
        continue
    print(path)
"""


def reachable(paths: list[Path], user: list[str]) -> list[str]:
    result = subprocess.run([*user, "/usr/bin/python3", "-c", PROBE], capture_output=True,
                            text=True, timeout=60, input="\0".join(map(str, paths)))  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout.split()


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


@pytest.fixture(scope="module")
def state(server: Server) -> Iterator[Server]:
    """One sandbox running and one paused, both holding the secret in an env var and a file."""
    running = Sandbox.create(envs={"SECRET": SECRET}, timeout=600, **sdk_options(server))  # type: ignore[arg-type]
    paused = Sandbox.create(envs={"SECRET": SECRET}, timeout=600, **sdk_options(server))  # type: ignore[arg-type]
    for sbx in (running, paused):
        sbx.files.write("/home/user/secret.txt", SECRET)
    assert paused.pause() is True
    yield server
    running.kill()
    Sandbox.kill(paused.sandbox_id, **sdk_options(server))  # type: ignore[arg-type]


def test_no_file_of_the_state_directory_is_readable_by_other_users(state: Server) -> None:
    root = state.state_dir
    files = [Path(d) / f for d, _, names in os.walk(root) for f in names]
    names = {p.name for p in files}
    # What holds the secrets is there to be probed: tokens and env vars, a memory image, the
    # catalog, the keys, the socket.
    assert {"record.json", "vivarium.db", "admin.key", "secret.key", "node.sock"} <= names
    assert any(p.parent.parent.name == "chunks" for p in files)  # a paused sandbox's memory
    assert any(SECRET in p.read_text(errors="replace") for p in files if p.name == "record.json")
    assert reachable(files, NOBODY) == []
    assert mode(root) == 0o700 and root.stat().st_uid == 0
    # The files themselves are closed too, in case a parent is ever opened.
    private = [p for p in files if p.name in ("record.json", "vivarium.db", "admin.key",
                                              "secret.key", "node.sock")]  # fmt: skip
    assert {str(p): oct(mode(p)) for p in private} == {str(p): "0o600" for p in private}


def test_the_node_socket_refuses_other_users(state: Server) -> None:
    sock = state.socket
    assert mode(sock) == 0o600 and sock.stat().st_uid == 0
    assert reachable([sock], NOBODY) == [] and reachable([sock], NOBODY_SEARCHING) == []
    # root still gets in: the probe itself works.
    assert reachable([sock], []) == [str(sock)]
    listing = subprocess.run([*NOBODY, "ls", str(state.state_dir)], capture_output=True,
                             text=True, timeout=30)  # fmt: skip
    assert listing.returncode != 0 and "Permission denied" in listing.stderr


def test_a_loose_state_directory_is_tightened_at_start() -> None:
    srv = make_server("loose", "vl", "10.248.1.0/24", API_PORT + 1)
    root = srv.state_dir
    root.chmod(0o755)
    for name in ("sandboxes", "snapshots", "runsc"):
        (root / name).mkdir(mode=0o755)
        (root / name).chmod(0o755)
    old = root / "snapshots" / "abc" / "checkpoint"
    old.mkdir(parents=True)
    (old / "checkpoint.img").write_bytes(b"memory")
    (old / "checkpoint.img").chmod(0o644)
    for name in ("admin.key", "secret.key", "vivarium.db"):
        (root / name).touch()
        (root / name).chmod(0o644)
    srv.start()
    try:
        assert mode(root) == 0o700
        assert {n: oct(mode(root / n)) for n in ("sandboxes", "snapshots", "runsc")} == {
            n: "0o700" for n in ("sandboxes", "snapshots", "runsc")
        }
        assert mode(old / "checkpoint.img") == 0o600 and mode(old) == 0o700
        assert {n: oct(mode(root / n)) for n in ("admin.key", "secret.key", "vivarium.db")} == {
            n: "0o600" for n in ("admin.key", "secret.key", "vivarium.db")
        }
        assert "state directory tightened" in srv.log_tail(200)
        assert f"{root / 'admin.key'} 0644 -> 0600" in srv.log_tail(200)
    finally:
        srv.stop()


@pytest.mark.parametrize("parent_is", ["writable by others", "owned by another user"])
def test_a_state_directory_that_others_could_replace_is_refused(
    parent_is: str, tmp_path: Path
) -> None:
    parent = tmp_path / "unsafe"  # pytest removes it (old runs' too), not left in /tmp
    parent.mkdir()
    if parent_is == "writable by others":
        parent.chmod(0o777)
        words = "is writable by other users"
    else:
        os.chown(parent, 65534, 65534)
        words = "belongs to uid 65534"
    srv = make_server("unsafe", "vu", "10.248.2.0/24", API_PORT + 2)
    srv.env["VIVARIUM_STATE_DIR"] = str(parent / "state")
    result = subprocess.run([VIVARIUM, "serve"], env=srv.env, capture_output=True, text=True,
                            timeout=60)  # fmt: skip
    assert result.returncode != 0
    assert words in result.stderr
    assert "/var/lib/vivarium" in result.stderr  # what to use instead
    assert not (parent / "state").exists()


# Prints the HTTP status of a GET, or the error: argv[1] is the URL, argv[2:] headers "K: V".
FETCH = """
import sys, urllib.request
headers = dict(h.split(": ", 1) for h in sys.argv[2:])
try:
    print(urllib.request.urlopen(urllib.request.Request(sys.argv[1], headers=headers),
                                 timeout=5).status)
except Exception as exc:
    print(type(exc).__name__, exc)
"""


def fetch(user: list[str], url: str, *headers: str) -> str:
    result = subprocess.run([*user, "/usr/bin/python3", "-c", FETCH, url, *headers],
                            capture_output=True, text=True, timeout=60)  # fmt: skip
    return result.stdout.strip()


def test_other_local_users_reach_a_sandbox_only_through_the_proxy(server: Server) -> None:
    sbx = Sandbox.create(timeout=300, **sdk_options(server))  # type: ignore[arg-type]
    try:
        sbx.commands.run("python3 -m http.server 8000 --bind 0.0.0.0", background=True)
        with server.client() as client:
            address = client.get(sbx.sandbox_id)["slot_address"]
        direct = f"http://{address}:8000/"
        deadline = time.monotonic() + 30
        while fetch([], direct) != "200" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert fetch([], direct) == "200"  # root (the node, the proxy) goes straight in
        refused = fetch(NOBODY, direct)
        assert "Connection refused" in refused, refused
        envd = fetch(NOBODY, f"http://{address}:49983/health")
        assert "Connection refused" in envd, envd
        proxy = f"http://127.0.0.1:{server.env['VIVARIUM_PROXY_PORT']}/"
        assert fetch(NOBODY, proxy, f"E2b-Sandbox-Id: {sbx.sandbox_id}",
                     "E2b-Sandbox-Port: 8000") == "200"  # fmt: skip
    finally:
        sbx.kill()

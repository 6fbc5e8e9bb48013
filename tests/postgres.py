"""A throwaway PostgreSQL server for the tests: `initdb` into a temporary directory, run as the
`postgres` system user (PostgreSQL refuses to run as root), listening on a Unix socket only."""

from __future__ import annotations

import contextlib
import glob
import os
import pwd
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator

import pytest

PG_USER = "postgres"


def _bin(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}"))
    if not found:
        pytest.fail("PostgreSQL is not installed: `make test` installs the postgresql package")
    return found[-1]


def _as_postgres(argv: list[str], **kwargs: object) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["runuser", "-u", PG_USER, "--", *argv], check=True,
                          capture_output=True, text=True, **kwargs)  # type: ignore[call-overload]  # fmt: skip


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """Yields a SQLAlchemy URL (`postgresql://...`) of a fresh, empty database."""
    pw = pwd.getpwnam(PG_USER)
    root = tempfile.mkdtemp(prefix="vivarium-pg-")
    os.chown(root, pw.pw_uid, pw.pw_gid)
    data, sock = os.path.join(root, "data"), os.path.join(root, "sock")
    os.mkdir(sock)
    os.chown(sock, pw.pw_uid, pw.pw_gid)
    _as_postgres([_bin("initdb"), "-D", data, "-A", "trust", "-U", PG_USER, "--no-sync"])
    server = subprocess.Popen(
        ["runuser", "-u", PG_USER, "--", _bin("postgres"), "-D", data, "-k", sock,
         "-c", "listen_addresses=", "-c", "fsync=off", "-c", "max_connections=200"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while True:
            ready = subprocess.run([_bin("pg_isready"), "-h", sock, "-U", PG_USER],
                                   capture_output=True)  # fmt: skip
            if ready.returncode == 0:
                break
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(
                    f"PostgreSQL did not start: {server.stderr.read() if server.stderr else ''}"
                )
            time.sleep(0.1)
        _as_postgres([_bin("createdb"), "-h", sock, "-U", PG_USER, "vivarium"])
        yield f"postgresql://{PG_USER}@/vivarium?host={sock}"
    finally:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        shutil.rmtree(root, ignore_errors=True)

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


class Postgres:
    """A PostgreSQL server in `root`, which a test may stop and start again (same data)."""

    def __init__(self, root: str) -> None:
        self.data, self.sock = os.path.join(root, "data"), os.path.join(root, "sock")
        self.url = f"postgresql://{PG_USER}@/vivarium?host={self.sock}"
        self.server: subprocess.Popen[str] | None = None

    def start(self) -> None:
        self.server = subprocess.Popen(
            ["runuser", "-u", PG_USER, "--", _bin("postgres"), "-D", self.data, "-k", self.sock,
             "-c", "listen_addresses=", "-c", "fsync=off", "-c", "max_connections=200"],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        deadline = time.monotonic() + 30
        while True:
            ready = subprocess.run([_bin("pg_isready"), "-h", self.sock, "-U", PG_USER],
                                   capture_output=True)  # fmt: skip
            if ready.returncode == 0:
                return
            if self.server.poll() is not None or time.monotonic() > deadline:
                err = self.server.stderr.read() if self.server.stderr else ""
                pytest.fail(f"PostgreSQL did not start: {err}")
            time.sleep(0.1)

    def stop(self) -> None:
        """A fast shutdown: clients are disconnected, new connections refused."""
        if self.server is None:
            return
        # pg_ctl signals the postmaster itself (runuser, its parent, passes no SIGINT on) and
        # waits until it is gone.
        subprocess.run(["runuser", "-u", PG_USER, "--", _bin("pg_ctl"), "-D", self.data,
                        "-m", "fast", "-w", "stop"], capture_output=True)  # fmt: skip
        try:
            self.server.wait(20)
        except subprocess.TimeoutExpired:
            self.server.kill()
            self.server.wait()
        self.server = None


@contextlib.contextmanager
def postgres() -> Iterator[Postgres]:
    """A fresh PostgreSQL server with an empty database `vivarium`, removed afterwards."""
    pw = pwd.getpwnam(PG_USER)
    root = tempfile.mkdtemp(prefix="vivarium-pg-")
    os.chown(root, pw.pw_uid, pw.pw_gid)
    pg = Postgres(root)
    os.mkdir(pg.sock)
    os.chown(pg.sock, pw.pw_uid, pw.pw_gid)
    _as_postgres([_bin("initdb"), "-D", pg.data, "-A", "trust", "-U", PG_USER, "--no-sync"])
    try:
        pg.start()
        _as_postgres([_bin("createdb"), "-h", pg.sock, "-U", PG_USER, "vivarium"])
        yield pg
    finally:
        pg.stop()
        shutil.rmtree(root, ignore_errors=True)


@contextlib.contextmanager
def postgres_server() -> Iterator[str]:
    """Yields a SQLAlchemy URL (`postgresql://...`) of a fresh, empty database."""
    with postgres() as pg:
        yield pg.url

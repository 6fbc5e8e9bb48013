"""A host whose runsc is missing or too old: `vivarium serve` stops at once with a message that
says how to install the right one, and leaves nothing behind (no namespaces, links, containers).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.integration.support import VIVARIUM, containers, host_links, make_server, netns_names

pytestmark = pytest.mark.timeout(120)

PREFIX = "vy"
OLD_RUNSC = """#!/bin/sh
# Answers like Debian 12's own runsc, and nothing else.
if [ "$1" = "--version" ]; then
    echo "runsc version 0.0~20221219.0"; echo "spec: 1.1.0-rc.1"; exit 0
fi
echo "this fake runsc only answers --version" >&2; exit 1
"""


def _serve_fails(tmp_path: Path, runsc: str) -> str:
    srv = make_server("notready", PREFIX, "10.249.0.0/24", 3127, runsc=runsc)
    done = subprocess.run([VIVARIUM, "serve"], env=srv.env, capture_output=True, text=True,
                          timeout=60)  # fmt: skip
    assert done.returncode != 0
    assert not netns_names(PREFIX) and not host_links(PREFIX)
    assert not containers(srv.state_dir)
    return done.stdout + done.stderr


def test_a_missing_runsc_is_refused_with_what_to_do(tmp_path: Path) -> None:
    output = _serve_fails(tmp_path, str(tmp_path / "no-such-runsc"))
    assert "runsc" in output and "make system-deps" in output, output


def test_a_runsc_older_than_2024_is_refused_with_what_to_do(tmp_path: Path) -> None:
    fake = tmp_path / "runsc"
    fake.write_text(OLD_RUNSC)
    os.chmod(fake, 0o755)
    output = _serve_fails(tmp_path, str(fake))
    assert "runsc 0.0~20221219.0 is too old" in output, output
    assert "bookworm-backports" in output, output

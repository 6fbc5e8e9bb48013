"""`vivarium sandbox exec` feeds its stdin to the command from a daemon thread; the CLI must
still exit with the command's status while that thread waits on a pipe that stays open."""

from __future__ import annotations

import subprocess
import sys

# The thread is blocked reading when the interpreter exits (the main thread returns the code).
PROGRAM = """
import sys, threading, time
from vivarium.cli.envd.exec import _reader
read = _reader(sys.stdin.buffer)
threading.Thread(target=read, daemon=True).start()
time.sleep(0.3)
sys.exit(3)
"""


def test_a_feeder_blocked_on_open_stdin_does_not_abort_the_exit() -> None:
    # A buffered read in that thread held stdin's lock, and the exit aborted on it (SIGABRT,
    # "could not acquire lock for <stdin> at interpreter shutdown"): seen on a loaded host.
    proc = subprocess.Popen([sys.executable, "-c", PROGRAM], stdin=subprocess.PIPE,
                            stderr=subprocess.PIPE)  # fmt: skip
    try:
        assert proc.wait(timeout=60) == 3, proc.stderr.read() if proc.stderr else ""
    finally:
        assert proc.stdin is not None
        proc.stdin.close()
        if proc.stderr:
            proc.stderr.close()

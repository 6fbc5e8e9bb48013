"""Pause and resume one sandbox over and over; after every cycle each write made so far must be
there, and a process's memory must have carried on. `make soak` runs 1,000 cycles."""

from __future__ import annotations

import os

import pytest
from e2b import Sandbox

from tests.integration.support import Server
from tests.pause.conftest import opts

# 40 in `make test` (about 80 s, within the suite's 20 minutes); `make soak` runs 1000.
CYCLES = int(os.environ.get("VIVARIUM_SOAK_CYCLES", "8"))  # `make soak`: 1000
pytestmark = pytest.mark.timeout(300 + CYCLES * 60)

# Atomic writes (rename), so a reader never sees the file empty between truncate and write.
TICKER = """
import os, time
n = 0
while True:
    n += 1
    time.sleep(0.05)
    with open("/tmp/n.tmp", "w") as f:
        f.write(str(n))
    os.replace("/tmp/n.tmp", "/tmp/n")
"""


def test_pause_resume_cycles_lose_nothing(server: Server) -> None:
    sbx = Sandbox.create(timeout=600, **opts(server))  # type: ignore[arg-type]
    sbx.files.write("/home/user/ticker.py", TICKER)
    sbx.commands.run("python3 /home/user/ticker.py", background=True, timeout=0)
    started = sbx.commands.run("while [ ! -s /tmp/n ]; do sleep 0.05; done; cat /tmp/n")
    last_tick = first_tick = int(started.stdout)
    for cycle in range(CYCLES):
        sbx.files.write(f"/home/user/log/{cycle:04d}", f"write {cycle}\n")
        assert sbx.pause() is True, f"cycle {cycle}: pause"
        sbx = Sandbox.connect(sbx.sandbox_id, timeout=600, **opts(server))  # type: ignore[arg-type]
        listing = sbx.commands.run("cat /home/user/log/* | wc -l; cat /tmp/n").stdout.split()
        writes, tick = int(listing[0]), int(listing[1])
        assert writes == cycle + 1, f"cycle {cycle}: {writes} writes found, {cycle + 1} made"
        assert tick >= last_tick, f"cycle {cycle}: the ticker went back from {last_tick} to {tick}"
        last_tick = tick
    assert sbx.files.read(f"/home/user/log/{CYCLES - 1:04d}") == f"write {CYCLES - 1}\n"
    # The process kept running between pauses: it counted on, not only kept its count.
    assert last_tick > first_tick, f"the ticker made no progress ({first_tick} -> {last_tick})"
    sbx.kill()

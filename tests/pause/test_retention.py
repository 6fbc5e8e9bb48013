"""Retention: a paused sandbox whose snapshot is older than VIVARIUM_SNAPSHOT_MAX_AGE is deleted,
snapshot files included; younger ones and running sandboxes are not touched."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator

import pytest
from e2b import NotFoundException, Sandbox

from tests.integration.support import Server, make_server, sdk_options

pytestmark = pytest.mark.timeout(600)
API_PORT = 3113


@pytest.fixture(scope="module")
def short_lived() -> Iterator[Server]:
    if os.geteuid() != 0:
        pytest.fail("needs root (`make test`)")
    srv = make_server("retention", "vz", "10.242.0.0/24", API_PORT, snapshot_max_age="4")
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()


def test_old_snapshots_are_deleted(short_lived: Server) -> None:
    opts = sdk_options(short_lived)
    paused = Sandbox.create(timeout=120, **opts)  # type: ignore[arg-type]
    running = Sandbox.create(timeout=120, **opts)  # type: ignore[arg-type]
    assert paused.pause()
    snapshot = short_lived.state_dir / "snapshots" / paused.sandbox_id
    assert snapshot.is_dir()
    deadline = time.monotonic() + 20
    while snapshot.exists() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not snapshot.exists()
    with pytest.raises(NotFoundException):
        Sandbox.get_info(paused.sandbox_id, **opts)  # type: ignore[arg-type]
    assert running.is_running()
    running.kill()

"""Idle sandboxes' timers (node/idle_timers.py), in real sandboxes of the shared server: an idle
one's host threads get the idle slack, a request through the proxy makes them precise before it
is served, and a sandbox using CPU keeps them precise with nobody talking to it."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from e2b import Sandbox

from tests.integration.support import (
    IDLE_SLACK_NS,
    Server,
    sdk_options,
    slacks_seen_during,
    timer_slacks,
)
from vivarium.node.client import NodeClient
from vivarium.node.idle_timers import CHECK_S, IDLE_AFTER_S
from vivarium.node.metrics_history import INTERVAL_S as SAMPLE_INTERVAL_S
from vivarium.runtime.cgroups import DEFAULT_TIMER_SLACK_NS


def until_slack(container_id: str, wanted: int, seconds: float = 120) -> None:
    """The node's checks run every few seconds; a loaded host may run them late."""
    deadline = time.monotonic() + seconds
    while (seen := timer_slacks(container_id)) != {wanted}:
        assert time.monotonic() < deadline, f"timer slacks {seen}, not {wanted}"
        time.sleep(0.5)


@pytest.fixture()
def sbx(server: Server) -> Iterator[Sandbox]:
    made = Sandbox.create(timeout=300, **sdk_options(server))
    yield made
    made.kill()


def test_an_idle_sandbox_gets_coarse_timers_until_a_request_comes(
    sbx: Sandbox, client: NodeClient
) -> None:
    container_id = client.get(sbx.sandbox_id)["container_id"]
    until_slack(container_id, IDLE_SLACK_NS)
    # Precise from before the proxy forwards the request until IDLE_AFTER_S after it came.
    seen = slacks_seen_during([container_id], lambda: sbx.commands.run("echo hi"))[container_id]
    assert {DEFAULT_TIMER_SLACK_NS} in seen, f"never precise: {seen[:3]} ... {seen[-3:]}"
    until_slack(container_id, IDLE_SLACK_NS)  # and coarse again once nobody talks to it


def test_a_busy_sandbox_keeps_precise_timers_with_nobody_talking_to_it(
    sbx: Sandbox, client: NodeClient
) -> None:
    container_id = client.get(sbx.sandbox_id)["container_id"]
    until_slack(container_id, IDLE_SLACK_NS)  # the transition below is the node's doing
    sbx.commands.run("timeout 120 sh -c 'while :; do :; done'", background=True, timeout=0)
    # Until the node's samples show the CPU use, it may have turned coarse for a moment.
    time.sleep(IDLE_AFTER_S + 2 * SAMPLE_INTERVAL_S)
    for _ in range(10):  # long past the idle delay, with only the node's checks looking at it
        assert timer_slacks(container_id) == {DEFAULT_TIMER_SLACK_NS}
        time.sleep(CHECK_S / 2)

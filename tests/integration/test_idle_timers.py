"""Idle sandboxes' timers (node/idle_timers.py), in real sandboxes of the shared server: an idle
one's host threads get the idle slack, a request through the proxy makes them precise before it
is served, and a sandbox using CPU keeps them precise with nobody talking to it."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest
from e2b import Sandbox

from tests.integration.support import Server, sdk_options, timer_slacks
from vivarium.node.client import NodeClient
from vivarium.node.idle_timers import CHECK_S, IDLE_AFTER_S
from vivarium.runtime.cgroups import DEFAULT_TIMER_SLACK_NS

IDLE_SLACK_NS = 20_000_000  # VIVARIUM_IDLE_TIMER_SLACK_MS's default


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
    assert sbx.commands.run("echo hi").stdout == "hi\n"
    # Made precise before the proxy forwarded the request; coarse again only after IDLE_AFTER_S.
    assert timer_slacks(container_id) == {DEFAULT_TIMER_SLACK_NS}


def test_a_busy_sandbox_keeps_precise_timers_with_nobody_talking_to_it(
    sbx: Sandbox, client: NodeClient
) -> None:
    container_id = client.get(sbx.sandbox_id)["container_id"]
    sbx.commands.run("timeout 120 sh -c 'while :; do :; done'", background=True, timeout=0)
    # Long past the idle delay, with only the node's checks looking at it.
    quiet_until = time.monotonic() + IDLE_AFTER_S + 3 * CHECK_S
    while time.monotonic() < quiet_until:
        assert timer_slacks(container_id) == {DEFAULT_TIMER_SLACK_NS}
        time.sleep(0.5)

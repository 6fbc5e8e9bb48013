"""The pause's look at a sandbox's TCP table (rows as this gVisor prints them)."""

from __future__ import annotations

from vivarium.node.node import unsaveable_sockets

HEADER = "  sl  local_address rem_address   st tx_queue rx_queue tr tm->when retrnsmt   uid\n"
ENVD = "   5: 00000000:C33F 00000000:0000 0A 00000000:00000000 00:00000000 00000000     0        0        6 2 0000000000000000 0 0 0 0 -1\n"  # noqa: E501
POLL_SERVER = "  13: 00000000:1F40 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0       14 2 0000000000000000 0 0 0 0 -1\n"  # noqa: E501
EPOLL_SERVER = "  15: 00000000:1F41 00000000:0000 0A 00000000:00000000 00:00000000 00000000  1000        0       16 1 0000000000000000 0 0 0 0 -1\n"  # noqa: E501
CONNECTED = "  17: 1500FEA9:C33F 0100F50A:A81E 01 00000000:00000000 00:00000000 00000000     0        0       18 2 0000000000000000 0 0 0 0 -1\n"  # noqa: E501


def test_listeners_waited_on_with_poll_save() -> None:
    assert unsaveable_sockets("s1", HEADER + ENVD + POLL_SERVER + HEADER) is None
    assert unsaveable_sockets("s1", "") is None


def test_a_listener_an_event_loop_watches_is_refused_by_port() -> None:
    refusal = unsaveable_sockets("s1", HEADER + ENVD + EPOLL_SERVER)
    assert refusal is not None
    assert "listens on TCP port 8001 through an event loop" in refusal.message
    assert "keeps running" in refusal.hint


def test_connections_are_refused_first() -> None:
    refusal = unsaveable_sockets("s1", HEADER + ENVD + EPOLL_SERVER + CONNECTED)
    assert refusal is not None and "1 open TCP connection(s)" in refusal.message

"""TCP handshakes under way across a slot's router, as its conntrack table sees them (for pause).

This runsc cannot save a TCP endpoint mid-handshake: with --net-disconnect-ok it resets the
other endpoints at the save, but one in SYN-SENT or SYN-RECV crashes the sentry (a nil
dereference in the reset path), which loses the sandbox. Every such endpoint on the sandbox's
interface is a flow through the router namespace in conntrack's SYN_SENT or SYN_RECV state, so a
pause waits, with new connections refused (firewall.HOLD_RULES), until there are none left.
"""

from __future__ import annotations

from vivarium.network.addressing import Slot
from vivarium.proc import run

OPENING = frozenset({"SYN_SENT", "SYN_RECV"})


def parse(table: str) -> list[str]:
    """The handshakes in /proc/net/nf_conntrack's text, as "src:sport -> dst:dport"."""
    found = []
    for line in table.splitlines():
        fields = line.split()
        if "tcp" not in fields or not OPENING.intersection(fields):
            continue
        flow: dict[str, str] = {}
        for key, _, value in (f.partition("=") for f in fields if "=" in f):
            flow.setdefault(key, value)  # the first tuple is the originator's
        found.append(f"{flow['src']}:{flow['sport']} -> {flow['dst']}:{flow['dport']}")
    return found


async def under_way(slot: Slot) -> list[str]:
    """The TCP handshakes between the sandbox and anything outside it, right now."""
    result = await run(slot.in_router("cat", "/proc/net/nf_conntrack"))
    return parse(result.stdout)

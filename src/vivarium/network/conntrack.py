"""A slot's router namespace as a witness of its sandbox's TCP connections (for pause).

This gVisor cannot save a TCP endpoint that is connecting, connected or closing over the
sandbox's network interface (loopback ones save fine), and a refused save ends the whole sandbox.
Some such endpoints have no socket left inside, so the sandbox's /proc/net/tcp does not show
them: a connection the kernel accepted but no program accept()ed yet, a handshake in progress,
one the sandbox closed before (or while) its peer did, which stays 60 s in TIME_WAIT, and one
its peer closed first that this gVisor nevertheless leaves in FIN_WAIT2 for 60 s (a race in its
close path: a few percent of connections under load). Every one of them is a flow through the
router namespace, whose conntrack table sees it:
- a flow conntrack holds open (handshake, established, half-closed) has an endpoint inside;
- a closed flow (both FINs seen, or a reset) on which the sandbox sent a FIN in the last minute
  may have one left: `sweep` probes those and resets what it finds (tcpsweep.py).
A rule in the router's mangle table (firewall.ROUTER_PAUSE_RULES) marks the flows on which the
sandbox sent a FIN; a rule in its raw table keeps the router's own (probe) segments untracked.

Conntrack is to outlive the sandbox's endpoints: TIME_WAIT is 120 s there and 60 s in gVisor;
create_slot raises CLOSE_WAIT (one end closed, the other not yet) and LAST_ACK (a FIN not yet
acknowledged, retransmitted meanwhile, which refreshes the entry) from 60 and 30 s to 120 s.
The table is flushed whenever the slot is handed back, so it only holds its current sandbox's
flows.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from vivarium.network.addressing import GATEWAY_IF, SANDBOX_IP, Slot
from vivarium.proc import run

SANDBOX_SENT_FIN = 0x1  # connmark bit set by the router's mangle rule
# How long this gVisor keeps a closed endpoint (TIME_WAIT; FIN_WAIT2 once its socket is gone):
# measured, a save fails 58 s after the close and succeeds after 63 s. Plus a margin for the
# conntrack timer, which starts a little later.
GVISOR_LINGER_S = 60
LINGER_MARGIN_S = 3
CLOSED_STATES = ("CLOSE", "TIME_WAIT")
SWEEP_SCRIPT = Path(__file__).with_name("tcpsweep.py")

_READ = (
    "cat /proc/sys/net/netfilter/nf_conntrack_tcp_timeout_time_wait; echo @@; "
    "iptables-save -c -t filter; echo @@; cat /proc/net/nf_conntrack"
)

# Deletes every conntrack entry of the namespace it runs in (ctnetlink IPCTNL_MSG_CT_DELETE
# without a tuple); run by the host's Python under nsenter.
_FLUSH = """
import socket, struct, sys
s = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, 12)
body = struct.pack("=BBH", socket.AF_UNSPEC, 0, 0)
s.send(struct.pack("=IHHII", 16 + len(body), (1 << 8) | 2, 1 | 4, 1, 0) + body)
error = struct.unpack("=i", s.recv(4096)[16:20])[0]
sys.exit(f"conntrack flush failed: errno {-error}" if error else 0)
"""


@dataclass(frozen=True)
class Flow:
    """One TCP flow of the sandbox, as its original direction saw it."""

    state: str
    remaining_s: int  # until conntrack forgets it
    mark: int
    src: str
    sport: int
    dst: str
    dport: int

    def __str__(self) -> str:
        return f"{self.src}:{self.sport}->{self.dst}:{self.dport} {self.state}"

    @property
    def open(self) -> bool:
        return self.state not in CLOSED_STATES

    @property
    def sandbox_side(self) -> tuple[str, int, int]:
        """(peer address, peer port, sandbox port) as the sandbox sees the connection."""
        if self.src == SANDBOX_IP:  # opened by the sandbox (the router masquerades it)
            return self.dst, self.dport, self.sport
        return self.src, self.sport, self.dport  # opened towards it (the router DNATs it)


@dataclass(frozen=True)
class RouterView:
    syns_refused: int  # connection attempts from the sandbox refused while it is quiesced
    flows: tuple[Flow, ...]
    time_wait_s: int  # the namespace's conntrack TIME_WAIT timeout

    def open_flows(self) -> list[Flow]:
        return [f for f in self.flows if f.open]

    def recently_closed(self) -> list[tuple[Flow, int]]:
        """Closed flows whose endpoint inside may linger, each with the seconds until it surely
        does not: the sandbox sent a FIN on them (or unmarked: the router's rules predate the
        mark) less than a minute ago."""
        out = []
        for flow in self.flows:
            if flow.open or (flow.mark and not flow.mark & SANDBOX_SENT_FIN):
                continue
            elapsed = self.time_wait_s - flow.remaining_s if flow.state == "TIME_WAIT" else 0
            left = GVISOR_LINGER_S + LINGER_MARGIN_S - elapsed
            if left > 0:
                out.append((flow, left))
        return out


def parse(text: str) -> RouterView:
    """The output of _READ: TIME_WAIT timeout, iptables-save -c, /proc/net/nf_conntrack."""
    timeout_part, rules_part, table_part = (text.split("@@\n") + ["", ""])[:3]
    refused = 0
    for line in rules_part.splitlines():
        # "[pkts:bytes] -A FORWARD -i gw0 -p tcp ... -j REJECT --reject-with tcp-reset"
        if f"-i {GATEWAY_IF} " in line and "-j REJECT" in line and line.startswith("["):
            refused += int(line[1:].split(":", 1)[0])
    flows = []
    for line in table_part.splitlines():
        fields = line.split()
        # ipv4 2 tcp 6 <remaining> <STATE> src= dst= sport= dport= [flags] src= ... mark=N
        if len(fields) < 10 or fields[2] != "tcp":
            continue
        keys: dict[str, list[str]] = {}
        for item in fields[6:]:
            key, eq, value = item.partition("=")
            if eq:
                keys.setdefault(key, []).append(value)
        if SANDBOX_IP not in keys.get("src", []):  # neither way from the sandbox: not its flow
            continue
        flows.append(Flow(
            state=fields[5], remaining_s=int(fields[4]), mark=int(keys.get("mark", ["0"])[0]),
            src=keys["src"][0], sport=int(keys["sport"][0]),
            dst=keys["dst"][0], dport=int(keys["dport"][0]),
        ))  # fmt: skip
    timeout = timeout_part.strip()
    return RouterView(refused, tuple(flows), int(timeout) if timeout.isdigit() else 120)


async def read(slot: Slot) -> RouterView:
    return parse((await run(slot.in_router("sh", "-c", _READ))).stdout)


async def sweep(slot: Slot, flows: list[Flow]) -> list[Flow]:
    """Reset what is left inside of these closed flows; those still alive after that (TIME_WAIT:
    it ignores resets)."""
    if not flows:
        return []
    by_side = {f.sandbox_side: f for f in flows}
    request = {"sandbox": SANDBOX_IP, "iface": GATEWAY_IF, "flows": list(by_side)}
    argv = slot.in_router(sys.executable, "-I", "-S", str(SWEEP_SCRIPT))
    result = await run(argv, stdin=json.dumps(request).encode(), timeout=60)
    answer = json.loads(result.stdout)
    return [by_side[(p, int(pp), int(sp))] for p, pp, sp in answer["left"]]


async def flush(slot: Slot) -> None:
    await run(slot.in_router(sys.executable, "-I", "-S", "-c", _FLUSH))

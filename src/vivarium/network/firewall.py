"""Egress policy, enforced outside the sandbox: in the slot's router namespace and the root one.

Layers, so one mistake does not open everything:
- router ns: forwarding from the sandbox follows its egress rules (network/egress.py): none
  with internet access off; DNS goes to the node's resolver; HTTP and TLS to denied addresses
  go to the egress proxy when the rules allow hostnames. Traffic from the host into the
  sandbox is always let through (DNAT to the sandbox address).
- root ns: anything arriving from a slot for the host itself is dropped (INPUT), but for the
  egress proxy's ports (its own and its tunnel's) and the sandboxes' resolver's; forwarded
  traffic to private, link-local and other reserved ranges is dropped, which also separates
  sandboxes from each other; the rest is masqueraded out of the host. Of the host's own
  processes only root's (the node and the proxy) may open connections to a slot (OUTPUT):
  other local users reach sandboxes through the proxy, like everyone else.
Operator-listed `egress_allow` ranges pass both root-ns checks, for sandboxes whose own rules
let them out; the egress proxy holds allowed names to the same ranges.
"""

from __future__ import annotations

import logging

from vivarium.errors import RuntimeFailure
from vivarium.network.addressing import BLOCKED_RANGES, GATEWAY_IF, SANDBOX_IP, UPLINK_IF, Slot
from vivarium.network.egress import Egress
from vivarium.proc import run

log = logging.getLogger(__name__)

# A router namespace's rules load through iptables' legacy backend: a whole ruleset takes ~3 ms
# there against ~15 ms through nf_tables (iptables-nft-restore, 2026-12-03), and a warm create
# waits for it. The namespace is ours alone, so backends never mix in one (the host's own
# chains stay on the system's iptables); `-w`: legacy's lock is one for every namespace. A
# kernel without the legacy tables gets nf_tables (_restore falls back once).
LEGACY = ("iptables-legacy-restore", "-w")
NFT = ("iptables-nft-restore", "-w")
_router_backend = LEGACY
# Both backends' tables, emptied and open (what a namespace has before any rule).
_EMPTY = ("*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
          ":POSTROUTING ACCEPT [0:0]\nCOMMIT\n*filter\n:INPUT ACCEPT [0:0]\n"
          ":FORWARD ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\nCOMMIT\n")  # fmt: skip

# A connection the sandbox may not open is refused with a reset rather than dropped: the program
# sees ECONNREFUSED at once instead of hanging, and no endpoint sits in SYN-SENT, which a pause
# could not save (handshakes.py).
_REFUSE_TCP = "-p tcp -j REJECT --reject-with tcp-reset\n"


def router_rules(slot: Slot, egress: Egress, proxy_port: int | None = None,
                 dns_port: int | None = None) -> str:  # fmt: skip
    """The full iptables ruleset of a slot's router namespace (for iptables-restore).

    EGRESS decides what the sandbox may open (network/egress.py): allowed addresses are
    accepted before denied ones are refused. DNS, to any address, goes to the node's resolver
    (network/egress_dns.py), which answers by the same rules. With names allowed and a proxy,
    HTTP and TLS to a denied address (to any address, with rules that add headers) go to the
    egress proxy instead (EGRESS_NAMES, in nat), which decides by name."""
    allow = "".join(f"-A EGRESS -d {net} -j ACCEPT\n" for net in egress.allow_nets)
    deny = "".join(f"-A EGRESS -d {net} -j RETURN\n" for net in egress.deny_nets)
    nat = ""
    if dns_port is not None and not egress.is_closed:
        nat += "".join(f"-A PREROUTING -i {GATEWAY_IF} -p {proto} --dport 53 "
                       f"-j DNAT --to-destination {slot.host_ip}:{dns_port}\n"
                       for proto in ("udp", "tcp"))  # fmt: skip
        allow = "".join(f"-A EGRESS -d {slot.host_ip}/32 -p {proto} --dport {dns_port} "
                        "-j ACCEPT\n" for proto in ("udp", "tcp")) + allow  # fmt: skip
    if egress.allow_names and proxy_port is not None:
        proxy = f"{slot.host_ip}:{proxy_port}"
        allow = f"-A EGRESS -d {slot.host_ip}/32 -p tcp --dport {proxy_port} -j ACCEPT\n" + allow
        nat += f"-A PREROUTING -i {GATEWAY_IF} -j EGRESS_NAMES\n" + "".join(
            f"-A EGRESS_NAMES -d {net} -j RETURN\n" for net in egress.allow_nets
        ) + "".join(
            f"-A EGRESS_NAMES{dst} -p tcp -m multiport --dports 80,443 "
            f"-j DNAT --to-destination {proxy}\n"
            # Rules that add headers need every request: any address may serve their hosts.
            for dst in ([""] if egress.rules else [f" -d {n}" for n in egress.deny_nets])
        )  # fmt: skip
    return (
        "*nat\n"
        ":PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n"
        ":POSTROUTING ACCEPT [0:0]\n:EGRESS_NAMES - [0:0]\n"
        f"-A PREROUTING -i {UPLINK_IF} -j DNAT --to-destination {SANDBOX_IP}\n"
        f"{nat}"
        f"-A POSTROUTING -o {UPLINK_IF} -j MASQUERADE\n"
        "COMMIT\n"
        "*filter\n"
        ":INPUT DROP [0:0]\n:FORWARD DROP [0:0]\n:OUTPUT ACCEPT [0:0]\n:EGRESS - [0:0]\n"
        "-A INPUT -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT\n"
        "-A FORWARD -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT\n"
        f"-A FORWARD -i {UPLINK_IF} -o {GATEWAY_IF} -j ACCEPT\n"
        f"-A FORWARD -i {GATEWAY_IF} -o {UPLINK_IF} -j EGRESS\n"
        f"{allow}{deny}-A EGRESS -j ACCEPT\n"
        f"-A INPUT -i {GATEWAY_IF} {_REFUSE_TCP}"
        f"-A FORWARD -i {GATEWAY_IF} {_REFUSE_TCP}"
        "COMMIT\n"
    )


async def _restore(slot: Slot, rules: str, *flags: str) -> None:
    global _router_backend
    backend = _router_backend
    res = await run(slot.in_router(*backend, *flags), stdin=rules.encode(), check=False)
    if res.ok:
        return
    if backend == LEGACY:
        fallback = await run(slot.in_router(*NFT, *flags), stdin=rules.encode(), check=False)
        if fallback.ok:
            log.warning("iptables' legacy backend failed here (%s); router namespaces use "
                        "nf_tables", res.stderr.strip()[-200:])  # fmt: skip
            _router_backend = NFT
            return
    raise RuntimeFailure(f"iptables-restore in {slot.router_ns} failed: "
                         f"{res.stderr.strip()[-300:]}")  # fmt: skip


async def forget_other_backend(slot: Slot) -> None:
    """Empty the tables of the backend the router namespace does not use: an adopted sandbox's
    namespace may hold rules an earlier release loaded through nf_tables, which would go on
    filtering beside the ones loaded now."""
    if _router_backend == LEGACY:
        await run(slot.in_router(*NFT), stdin=_EMPTY.encode(), check=False)


async def apply_router_rules(slot: Slot, egress: Egress, proxy_port: int | None = None,
                             dns_port: int | None = None) -> None:  # fmt: skip
    """Replace the slot's rules at once (one iptables-restore): an update never leaves a moment
    with some of the old rules and some of the new."""
    await _restore(slot, router_rules(slot, egress, proxy_port, dns_port))


# While a pause saves the sandbox, every TCP connection opened to or from it is refused at once
# with a reset: this runsc cannot save an endpoint mid-handshake (handshakes.py), and a refused
# connection leaves none behind. A SYN the sandbox retransmits is refused too, which ends a
# handshake already under way. Inserted in front of the router's rules; gone with the next
# apply_router_rules.
_REFUSE_SYN = "-p tcp --syn -j REJECT --reject-with tcp-reset\n"
HOLD_RULES = (
    "*filter\n"
    f"-I INPUT 1 -i {GATEWAY_IF} {_REFUSE_SYN}"
    f"-I FORWARD 1 -i {GATEWAY_IF} {_REFUSE_SYN}"
    f"-I FORWARD 1 -i {UPLINK_IF} {_REFUSE_SYN}"
    "COMMIT\n"
)


async def refuse_new_connections(slot: Slot) -> None:
    """Refuse new TCP connections to and from the sandbox until apply_router_rules."""
    await _restore(slot, HOLD_RULES, "--noflush")


class HostFirewall:
    """Our chains in the root namespace, named after the slot prefix so instances coexist."""

    def __init__(self, prefix: str, slot_cidr: str, egress_allow: tuple[str, ...]) -> None:
        self.prefix = prefix
        self.slot_cidr = slot_cidr
        self.egress_allow = egress_allow
        self.proxy_port: int | None = None  # the egress proxy's, once it listens
        self.dns_port: int | None = None  # the sandboxes' resolver's, once it listens
        self.tunnel_port: int | None = None  # the egress proxy's for tunnelled TCP (SOCKS5)
        self._tunnelled: set[int] = set()  # slots whose TCP goes to tunnel_port
        self.in_chain = f"VIV-{prefix.upper()}-IN"
        self.fwd_chain = f"VIV-{prefix.upper()}-FWD"
        self.nat_chain = f"VIV-{prefix.upper()}-NAT"
        self.out_chain = f"VIV-{prefix.upper()}-OUT"
        self.tunnel_chain = f"VIV-{prefix.upper()}-TUN"
        self.slot_ifs = f"{prefix}h-+"

    def chain_rules(self) -> dict[tuple[str, str], list[list[str]]]:
        allow = [["-d", cidr, "-j", "ACCEPT"] for cidr in self.egress_allow]
        established = ["-m", "conntrack", "--ctstate", "ESTABLISHED,RELATED", "-j", "ACCEPT"]
        refuse = ["-p", "tcp", "-j", "REJECT", "--reject-with", "tcp-reset"]  # see _REFUSE_TCP
        proxy = ([["-p", "tcp", "--dport", str(self.proxy_port), "-j", "ACCEPT"]]
                 if self.proxy_port else [])  # fmt: skip
        proxy += [["-p", proto, "--dport", str(self.dns_port), "-j", "ACCEPT"]
                  for proto in ("udp", "tcp") if self.dns_port]  # fmt: skip
        if self.tunnel_port:
            proxy.append(["-p", "tcp", "--dport", str(self.tunnel_port), "-j", "ACCEPT"])
        blocked: list[list[str]] = []
        for cidr in BLOCKED_RANGES:
            blocked += [["-d", cidr, *refuse], ["-d", cidr, "-j", "DROP"]]
        return {
            ("filter", self.in_chain): [established, *allow, *proxy, refuse, ["-j", "DROP"]],
            ("filter", self.fwd_chain): [
                established,
                *allow,
                *blocked,
                ["-j", "ACCEPT"],
            ],
            ("filter", self.out_chain): [
                ["-m", "owner", "--uid-owner", "0", "-j", "RETURN"],
                # The kernel's own packets (the resets that refuse a sandbox's connections to
                # the host, ICMP errors, TIME_WAIT) belong to no process.
                ["-m", "owner", "!", "--socket-exists", "-j", "RETURN"],
                refuse,
                ["-j", "DROP"],
            ],
            ("nat", self.nat_chain): [
                ["-s", self.slot_cidr, "-d", self.slot_cidr, "-j", "RETURN"],
                ["-s", self.slot_cidr, "-j", "MASQUERADE"],
            ],
            ("nat", self.tunnel_chain): [],  # a rule per tunnelled slot (tunnel())
        }

    def jumps(self) -> list[tuple[str, str, list[str]]]:
        return [
            ("filter", "INPUT", ["-i", self.slot_ifs, "-j", self.in_chain]),
            ("filter", "FORWARD", ["-i", self.slot_ifs, "-j", self.fwd_chain]),
            # Nothing from outside may open a connection to a slot address.
            ("filter", "FORWARD", ["-o", self.slot_ifs, "-m", "conntrack", "!", "--ctstate",
                                   "ESTABLISHED,RELATED", "-j", "DROP"]),
            ("filter", "OUTPUT", ["-o", self.slot_ifs, "-j", self.out_chain]),
            ("nat", "POSTROUTING", ["-j", self.nat_chain]),
            ("nat", "PREROUTING", ["-i", self.slot_ifs, "-j", self.tunnel_chain]),
        ]  # fmt: skip

    async def tunnel(self, slot: Slot, on: bool) -> None:
        """Send the slot's TCP, as its router lets it out, to the egress proxy's tunnel (which
        carries it through the sandbox's SOCKS5 proxy), or stop. DNATed here, in the root
        namespace, so the tunnel reads each connection's original destination from conntrack
        (SO_ORIGINAL_DST); what the router already sends to the host itself stays as it is.
        Turn it on before the router lets anything out, and off after it no longer does."""
        if self.tunnel_port is None or on == (slot.index in self._tunnelled):
            return
        if not on:
            await self.untunnel(slot)
            return
        rule = self._tunnel_rule(slot.host_if, slot.host_ip)
        await run(["iptables", "-w", "-t", "nat", "-A", self.tunnel_chain, *rule])
        self._tunnelled.add(slot.index)

    async def untunnel(self, slot: Slot) -> None:
        """Remove the slot's tunnel rule whether or not it is known to be there: a slot being
        released may keep one that an add cut short (a cancelled create) left unrecorded."""
        self._tunnelled.discard(slot.index)
        if self.tunnel_port is None:
            return
        rule = self._tunnel_rule(slot.host_if, slot.host_ip)
        for _ in range(3):  # one is all there should be
            removed = await run(["iptables", "-w", "-t", "nat", "-D", self.tunnel_chain, *rule],
                                check=False)  # fmt: skip
            if not removed.ok:
                return

    def _tunnel_rule(self, host_if: str, host_ip: str) -> list[str]:
        return ["-i", host_if, "!", "-d", f"{host_ip}/32", "-p", "tcp", "-j", "DNAT",
                "--to-destination", f"{host_ip}:{self.tunnel_port}"]  # fmt: skip

    async def _keep_tunnels(self) -> None:
        """At a start: the tunnel rules are running sandboxes' (adopted next), so they are
        kept, never flushed (their TCP would leave directly meanwhile), and pointed at the
        tunnel's new port (until then, at a closed one: refused, the safe side)."""
        listed = await run(["iptables", "-w", "-t", "nat", "-S", self.tunnel_chain])
        rules = [line.split() for line in listed.stdout.splitlines()
                 if line.startswith(f"-A {self.tunnel_chain} ")]  # fmt: skip
        for number, parts in enumerate(rules, start=1):
            host_if = parts[parts.index("-i") + 1]
            host_ip = parts[parts.index("--to-destination") + 1].rsplit(":", 1)[0]
            if self.tunnel_port is not None:
                await run(["iptables", "-w", "-t", "nat", "-R", self.tunnel_chain, str(number),
                           *self._tunnel_rule(host_if, host_ip)])  # fmt: skip
            self._tunnelled.add(int(host_if.rsplit("-", 1)[1]))

    async def install(self) -> None:
        await run(["sysctl", "-qw", "net.ipv4.ip_forward=1"])
        for (table, chain), rules in self.chain_rules().items():
            exists = await run(["iptables", "-w", "-t", table, "-n", "-L", chain], check=False)
            if not exists.ok:
                await run(["iptables", "-w", "-t", table, "-N", chain])
            elif chain == self.tunnel_chain:
                await self._keep_tunnels()
                continue
            await run(["iptables", "-w", "-t", table, "-F", chain])
            for rule in rules:
                await run(["iptables", "-w", "-t", table, "-A", chain, *rule])
        for table, chain, rule in self.jumps():
            present = await run(["iptables", "-w", "-t", table, "-C", chain, *rule], check=False)
            if not present.ok:
                await run(["iptables", "-w", "-t", table, "-I", chain, "1", *rule])

    async def uninstall(self) -> None:
        for table, chain, rule in self.jumps():
            await run(["iptables", "-w", "-t", table, "-D", chain, *rule], check=False)
        for table, chain in self.chain_rules():
            await run(["iptables", "-w", "-t", table, "-F", chain], check=False)
            await run(["iptables", "-w", "-t", table, "-X", chain], check=False)

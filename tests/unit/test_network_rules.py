from __future__ import annotations

import pytest

from vivarium.network import egress, handshakes
from vivarium.network.addressing import BLOCKED_RANGES, SlotRange
from vivarium.network.egress import CLOSED, Egress
from vivarium.network.firewall import HostFirewall, router_rules


def test_slot_addresses_are_consecutive_slash30s() -> None:
    slots = SlotRange("viv", "10.231.0.0/18")
    assert slots.capacity == 4096
    first, second = slots.slot(0), slots.slot(1)
    assert (first.host_ip, first.router_ip) == ("10.231.0.1", "10.231.0.2")
    assert (second.host_ip, second.router_ip) == ("10.231.0.5", "10.231.0.6")
    last = slots.slot(slots.capacity - 1)
    assert last.router_ip == "10.231.63.254"
    with pytest.raises(ValueError):
        slots.slot(slots.capacity)


def test_slot_names_fit_interface_limits() -> None:
    slot = SlotRange("abcd", "10.0.0.0/8").slot(4_000_000)
    assert len(slot.host_if) <= 15
    assert slot.sandbox_ns == "abcd-sb-4000000"
    assert slot.netns_path == "/var/run/netns/abcd-sb-4000000"


def test_names_map_back_to_indexes_only_for_our_prefix() -> None:
    slots = SlotRange("viv", "10.231.0.0/18")
    assert slots.index_of_netns("viv-sb-12") == 12
    assert slots.index_of_netns("viv-rt-3") == 3
    assert slots.index_of_netns("vt-sb-3") is None
    assert slots.index_of_netns("viv-sb-x") is None
    assert slots.index_of_host_if("vivh-7") == 7
    assert slots.index_of_host_if("vivh-") is None


def test_overlap_detection() -> None:
    slots = SlotRange("viv", "10.231.0.0/18")
    assert slots.overlaps("10.0.0.0/8")
    assert slots.overlaps("10.231.5.0/24")
    assert not slots.overlaps("10.232.0.0/16")
    assert not slots.overlaps("fd00::/8")


SLOT = SlotRange("viv", "10.231.0.0/18").slot(1)  # host side 10.231.0.5


def test_router_rules_drop_sandbox_egress_unless_allowed() -> None:
    closed = router_rules(SLOT, CLOSED, 4000)
    opened = router_rules(SLOT, Egress(), 4000)
    assert ":FORWARD DROP" in closed and ":INPUT DROP" in closed
    assert "-A EGRESS -d 0.0.0.0/0 -j RETURN\n-A EGRESS -j ACCEPT" in closed  # nothing passes
    assert "-A EGRESS -d" not in opened and "-A EGRESS -j ACCEPT" in opened
    assert "EGRESS_NAMES -d" not in opened + closed  # no names allowed: no proxy
    # Inbound from the host always reaches the sandbox address.
    for rules in (closed, opened):
        assert "-A PREROUTING -i up0 -j DNAT --to-destination 169.254.0.21" in rules
        assert "-A FORWARD -i up0 -o gw0 -j ACCEPT" in rules
        # What the sandbox may not reach refuses TCP at once (no endpoint left in SYN-SENT).
        assert rules.endswith(
            "-A INPUT -i gw0 -p tcp -j REJECT --reject-with tcp-reset\n"
            "-A FORWARD -i gw0 -p tcp -j REJECT --reject-with tcp-reset\nCOMMIT\n"
        )


def test_router_rules_allow_before_they_deny_and_send_names_to_the_proxy() -> None:
    rules = egress.parse({"allowOut": ["192.0.2.4", "api.example.com"], "denyOut": ["0.0.0.0/0"],
                          "dnsServers": ["192.0.2.9"]}, internet=True)  # fmt: skip
    text = router_rules(SLOT, rules, 4000, 5300)
    order = [
        "-A EGRESS -d 10.231.0.5/32 -p tcp --dport 4000 -j ACCEPT",  # the egress proxy
        "-A EGRESS -d 10.231.0.5/32 -p udp --dport 5300 -j ACCEPT",  # the node's resolver
        "-A EGRESS -d 192.0.2.4/32 -j ACCEPT",
        "-A EGRESS -d 0.0.0.0/0 -j RETURN",
    ]
    assert [text.index(line) for line in order] == sorted(text.index(line) for line in order)
    assert "-A PREROUTING -i gw0 -j EGRESS_NAMES" in text
    assert "-A EGRESS_NAMES -d 192.0.2.4/32 -j RETURN" in text
    assert ("-A EGRESS_NAMES -d 0.0.0.0/0 -p tcp -m multiport --dports 80,443 "
            "-j DNAT --to-destination 10.231.0.5:4000") in text  # fmt: skip
    # Rules that add headers send HTTP and TLS to every address through the proxy.
    with_rules = egress.parse({"allowOut": ["api.example.com"], "rules": {"api.example.com": [
        {"transform": {"headers": {"A": "b"}}}]}}, internet=True)  # fmt: skip
    everything = "-A EGRESS_NAMES -p tcp -m multiport --dports 80,443 -j DNAT --to-destination"
    assert f"{everything} 10.231.0.5:4000" in router_rules(SLOT, with_rules, 4000)
    # Without a proxy listening, names cannot be checked: they stay closed.
    assert "EGRESS_NAMES -d" not in router_rules(SLOT, rules, None)


def test_dns_to_any_address_goes_to_the_nodes_resolver() -> None:
    for rules in (Egress(dns=("192.0.2.9",)),
                  egress.parse({"allowOut": ["192.0.2.4"], "dnsServers": ["192.0.2.9"]},
                               internet=False)):  # fmt: skip
        text = router_rules(SLOT, rules, 4000, 5300)
        for proto in ("udp", "tcp"):
            assert (f"-A PREROUTING -i gw0 -p {proto} --dport 53 -j DNAT --to-destination "
                    "10.231.0.5:5300") in text  # fmt: skip
            assert f"-A EGRESS -d 10.231.0.5/32 -p {proto} --dport 5300 -j ACCEPT" in text
        # The sandbox's own servers are not opened: its queries never leave but through us.
        assert "192.0.2.9" not in text
    # A free slot or a warm sandbox asks nothing.
    assert "--dport 53" not in router_rules(SLOT, CLOSED, 4000, 5300)


CONNTRACK = """\
ipv4     2 tcp      6 117 SYN_SENT src=169.254.0.21 dst=10.246.0.2 sport=40000 dport=7009 \
[UNREPLIED] src=10.246.0.2 dst=10.231.0.2 sport=7009 dport=40000 mark=0 zone=0 use=2
ipv4     2 tcp      6 59 SYN_RECV src=10.231.0.1 dst=10.231.0.2 sport=5000 dport=8000 \
src=169.254.0.21 dst=10.231.0.1 sport=8000 dport=5000 mark=0 zone=0 use=2
ipv4     2 tcp      6 431999 ESTABLISHED src=10.231.0.1 dst=10.231.0.2 sport=5001 dport=49983 \
src=169.254.0.21 dst=10.231.0.1 sport=49983 dport=5001 [ASSURED] mark=0 zone=0 use=2
ipv4     2 udp      17 29 src=169.254.0.21 dst=10.246.0.2 sport=5353 dport=53 [UNREPLIED] \
src=10.246.0.2 dst=10.231.0.2 sport=53 dport=5353 mark=0 zone=0 use=2
"""


def test_handshakes_are_read_from_conntrack() -> None:
    assert handshakes.parse(CONNTRACK) == [
        "169.254.0.21:40000 -> 10.246.0.2:7009",
        "10.231.0.1:5000 -> 10.231.0.2:8000",
    ]
    assert handshakes.parse("") == []


def test_host_firewall_blocks_private_ranges_after_operator_allows() -> None:
    fw = HostFirewall("viv", "10.231.0.0/18", ("10.9.9.9/32",))
    forward = fw.chain_rules()[("filter", fw.fwd_chain)]
    flat = [" ".join(rule) for rule in forward]
    allow_at = flat.index("-d 10.9.9.9/32 -j ACCEPT")
    for cidr in BLOCKED_RANGES:
        refused = flat.index(f"-d {cidr} -p tcp -j REJECT --reject-with tcp-reset")
        assert flat.index(f"-d {cidr} -j DROP") > refused > allow_at
    assert flat[-1] == "-j ACCEPT"
    host_input = [" ".join(rule) for rule in fw.chain_rules()[("filter", fw.in_chain)]]
    assert host_input[-1] == "-j DROP"
    assert "-d 10.9.9.9/32 -j ACCEPT" in host_input


def test_every_private_and_link_local_range_is_blocked() -> None:
    for cidr in ("10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16",
                 "127.0.0.0/8", "100.64.0.0/10"):  # fmt: skip
        assert cidr in BLOCKED_RANGES

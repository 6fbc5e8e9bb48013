"""Egress rules as parsed and matched (network/egress.py), and what the egress proxy reads of
a connection before it decides (network/egress_proxy.py)."""

from __future__ import annotations

import ssl

import pytest

from vivarium.errors import InvalidArgument
from vivarium.network import egress
from vivarium.network.egress import ALL_TRAFFIC, Egress
from vivarium.network.egress_proxy import http_host, server_name, with_headers


def test_entries_are_sorted_into_addresses_and_names() -> None:
    rules = egress.parse({"allowOut": ["192.0.2.4", "10.0.0.1/8", "API.Example.com.", "*.cdn.io",
                                       "1password.com", "192.0.2.4"],
                          "denyOut": [ALL_TRAFFIC]}, internet=True)  # fmt: skip
    assert rules.allow_nets == ["192.0.2.4/32", "10.0.0.0/8"]
    assert rules.allow_names == ["api.example.com", "*.cdn.io", "1password.com"]
    assert rules.deny_nets == [ALL_TRAFFIC]
    assert rules.dns is None  # none given: the node's own servers


def test_an_allow_list_resolves_its_names_only() -> None:
    allow_list = egress.parse({"allowOut": ["api.example.com", "*.cdn.io", "192.0.2.4"]},
                              internet=False)  # fmt: skip
    assert allow_list.resolves("api.example.com") and allow_list.resolves("a.cdn.io.")
    assert not allow_list.resolves("exfiltrate-this.attacker.example")
    assert not allow_list.resolves("4.2.0.192.in-addr.arpa")
    # Open to the internet, or denying some ranges only: names are not what protects anything.
    assert Egress().resolves("anything.example")
    assert egress.parse({"denyOut": ["192.0.2.0/24"]}, internet=True).resolves("x.example")


def test_names_match_exactly_or_below_a_wildcard() -> None:
    rules = Egress(allow=("api.example.com", "*.cdn.io"))
    assert rules.allows_name("api.example.com") and rules.allows_name("API.example.com.")
    assert not rules.allows_name("example.com") and not rules.allows_name("xapi.example.com")
    assert rules.allows_name("a.cdn.io") and rules.allows_name("a.b.cdn.io")
    assert not rules.allows_name("cdn.io") and not rules.allows_name("evilcdn.io")


def test_internet_off_denies_everything_the_rules_do_not_allow() -> None:
    assert egress.CLOSED.is_closed and egress.CLOSED.deny_nets == [ALL_TRAFFIC]
    allow_listed = egress.parse({"allowOut": ["192.0.2.1"]}, internet=False)
    assert not allow_listed.is_closed and allow_listed.deny_nets == [ALL_TRAFFIC]
    assert Egress.from_json(None, internet=False) == egress.CLOSED  # records before rules
    assert Egress.from_json(allow_listed.to_json(), internet=False) == allow_listed


def test_an_egress_proxy_is_kept_whole_and_shown_without_its_secrets() -> None:
    rules = egress.parse({"egressProxy": {"address": "Proxy.Example.com:1080", "username": "u",
                                          "password": "p", "tls": {"enabled": True,
                                                                   "serverName": "socks.example"}}},
                         internet=True)  # fmt: skip
    assert rules.socks == egress.Socks("proxy.example.com", 1080, "u", "p", True, "socks.example")
    assert Egress.from_json(rules.to_json()) == rules  # what a resume dials again
    assert rules.wire()["egressProxy"] == {"address": "proxy.example.com:1080", "username": "u",
                                           "tls": {"enabled": True,
                                                   "serverName": "socks.example"}}  # fmt: skip
    plain = egress.parse({"egressProxy": {"address": "192.0.2.1:1080"}}, internet=True)
    assert plain.socks == egress.Socks("192.0.2.1", 1080)
    assert plain.wire()["egressProxy"] == {"address": "192.0.2.1:1080"}


@pytest.mark.parametrize(
    ("network", "message"),
    [
        ({"allowOut": ["10.0.0.0/33"]}, "network.allowOut: '10.0.0.0/33' is not a valid"),
        ({"allowOut": ["1.2.3"]}, "network.allowOut: '1.2.3' is not a valid"),
        ({"allowOut": ["fd00::/8"]}, "IPv6"),
        ({"allowOut": ["*"]}, "is not an IPv4 address, CIDR block or hostname"),
        ({"allowOut": ["a..b"]}, "is not an IPv4 address, CIDR block or hostname"),
        ({"allowOut": ["-a.b"]}, "is not an IPv4 address, CIDR block or hostname"),
        ({"allowOut": ["x" * 64 + ".com"]}, "hostname"),
        ({"allowOut": ["a.com\r\nHost: b"]}, "network.allowOut: 'a.com\\r\\nHost: b' is not"),
        ({"denyOut": ["example.com"]}, "network.denyOut: 'example.com' is not an IPv4"),
        ({"denyOut": [f"10.{i // 256}.{i % 256}.0/24" for i in range(257)]}, "more than 256"),
        ({"dnsServers": ["192.0.2.1"] * 11}, "at most 10"),
        ({"dnsServers": ["::1"]}, "network.dnsServers: '::1' is not an IPv4 address"),
        ({"allowOut": [1]}, "must be a list of strings"),
        ({"egressProxy": {"address": "192.0.2.1:1080", "username": ""}}, "1 to 255 bytes"),
        (
            {
                "egressProxy": {
                    "address": "192.0.2.1:1080",
                    "tls": {"enabled": False, "serverName": "p.example"},
                }
            },
            "need TLS enabled",
        ),
        ({"egressProxy": {"address": "192.0.2.1:0"}}, "is not host:port"),
    ],
)
def test_bad_rules_name_their_field(network: dict[str, object], message: str) -> None:
    with pytest.raises(InvalidArgument) as caught:
        egress.parse(network, internet=True)
    assert message in caught.value.message


def _client_hello(name: str | None) -> bytes:
    context = ssl.create_default_context()
    if name is None:
        context.check_hostname = False
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = context.wrap_bio(incoming, outgoing, server_hostname=name)
    with pytest.raises(ssl.SSLWantReadError):
        tls.do_handshake()
    return outgoing.read()


def test_the_server_name_is_read_from_a_real_client_hello() -> None:
    hello = _client_hello("api.example.com")
    assert server_name(hello) == "api.example.com"
    assert server_name(_client_hello(None)) is None
    assert server_name(hello[:40]) is None  # cut short: no name, never an exception
    assert server_name(b"\x16\x03\x01\x00\x05\x02\x00\x00\x01\x00") is None  # not a hello


def test_the_host_is_read_from_an_http_request_head() -> None:
    assert http_host(b"GET / HTTP/1.1\r\nHost: Pkg.Example.test:8080\r\n\r\n") == "pkg.example.test"
    assert http_host(b"GET / HTTP/1.0\r\n\r\n") is None
    assert http_host(b"GET / HTTP/1.1\r\nHost: 10.0.0.1\r\n\r\n") is None  # an address
    assert http_host(b"not http at all\r\n\r\n") is None


def test_header_rules_pick_the_exact_host_then_the_longest_wildcard() -> None:
    rules = egress.parse(
        {"allowOut": ["api.example.com", "*.example.com"],
         "rules": {"*.example.com": [{"transform": {"headers": {"X-Who": "any"}}}],
                   "*.eu.example.com": [{"transform": {"headers": {"X-Who": "eu"}}}],
                   "api.example.com": [{"transform": {"headers": {"X-Who": "api"}}},
                                       {"transform": {"headers": {"x-who": "api2", "B": "1"}}}]}},
        internet=True,
    )  # fmt: skip
    assert rules.headers_for("api.example.com") == (("x-who", "api2"), ("B", "1"))
    assert rules.headers_for("a.eu.example.com") == (("X-Who", "eu"),)
    assert rules.headers_for("www.example.com") == (("X-Who", "any"),)
    assert rules.headers_for("example.com") is None and rules.headers_for("other.org") is None
    assert Egress.from_json(rules.to_json()) == rules


def test_headers_are_set_on_the_request_and_the_server_asked_to_close() -> None:
    head = (b"POST /v1/x HTTP/1.1\r\nHost: api.example.com\r\nAuthorization: mine\r\n"
            b"Connection: keep-alive\r\nContent-Length: 2\r\n\r\n")  # fmt: skip
    out = with_headers(head, (("Authorization", "Bearer s3cret"), ("X-Team", "blue")))
    assert out.startswith(b"POST /v1/x HTTP/1.1\r\n")
    lines = out.split(b"\r\n")
    assert b"Authorization: Bearer s3cret" in lines and b"Authorization: mine" not in lines
    assert b"X-Team: blue" in lines and b"Content-Length: 2" in lines
    assert [line for line in lines if line.lower().startswith(b"connection")] == [
        b"connection: close"
    ]

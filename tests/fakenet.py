"""A fake internet for the egress tests, on this machine: one network namespace behind a veth
from the root one, with several addresses, web servers under several names on each
(tests/fakenet_server.py) and a DNS server (Debian's dnsmasq) that answers for those names.
Nothing leaves the machine: every name and address here is the test's own."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import dns.exception
import dns.resolver

from tests.integration.support import outside_host

# `make bench` runs a fake internet of its own (VIVARIUM_FAKENET=bench, set before this is
# imported), so that it can run beside `make test`: its own namespace, link and addresses.
_BENCH = os.environ.get("VIVARIUM_FAKENET") == "bench"
NS, HOST_IF = ("fakenet-bench", "fakenetb0") if _BENCH else ("fakenet", "fakenet0")
_NET = "10.254.200" if _BENCH else "10.253.0"
GATEWAY = f"{_NET}.1"
DNS = f"{_NET}.2"
BY_IP = f"{_NET}.3"  # allowed by address
NAMED = f"{_NET}.4"  # pkg.example.test (allowed by name) and other.example.test (not)
CDN = f"{_NET}.5"  # names under cdn.example.test (a wildcard), and cdn.example.test itself
SOCKS = f"{_NET}.6"  # socks.example.test: a user's SOCKS5 proxy (tests/fakenet_socks.py)
DENIED = f"{_NET}.7"
CIDR, IN_CIDR = f"{_NET}.8/30", f"{_NET}.9"
UNOPENED = f"{_NET}.200"  # outside OPENED: no rule of a sandbox can reach it
OPENED = f"{_NET}.0/25"  # the operator's VIVARIUM_EGRESS_ALLOW
NAMES = {
    "pkg.example.test": NAMED, "other.example.test": NAMED, "cdn.example.test": CDN,
    "a.cdn.example.test": CDN, "b.deep.cdn.example.test": CDN, "socks.example.test": SOCKS,
}  # fmt: skip
ADDRESSES = [DNS, BY_IP, NAMED, CDN, SOCKS, DENIED, IN_CIDR, UNOPENED]
_query_log: Path | None = None  # the DNS server's, while the fake internet is up


def names_asked() -> list[str]:
    """Every name the fake internet's DNS server was asked for, in order."""
    assert _query_log is not None, "the fake internet is not up"
    text = _query_log.read_text() if _query_log.exists() else ""
    # "<time> dnsmasq[<pid>]: query[A] <name> from <address>"
    return [line.split("query[", 1)[1].split()[1] for line in text.splitlines()
            if "query[" in line]  # fmt: skip


@contextlib.contextmanager
def fake_internet(workdir: Path) -> Iterator[Path]:
    """Up until the block ends; yields the servers' certificate (self-signed: a server's
    egress proxy trusts it with VIVARIUM_EGRESS_CA_FILE)."""
    global _query_log
    cert, key = workdir / "fakenet.crt", workdir / "fakenet.key"
    _query_log = workdir / "dns-queries.log"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-days", "2", "-subj", "/CN=fakenet", "-keyout", str(key), "-out", str(cert),
         "-addext", "subjectAltName=DNS:example.test,DNS:*.example.test,DNS:*.cdn.example.test"],
        check=True, capture_output=True,
    )  # fmt: skip
    dnsmasq = ["dnsmasq", "--keep-in-foreground", "--conf-file=/dev/null", "--no-resolv",
               "--no-hosts", "--bind-interfaces", f"--listen-address={DNS}", "--local-ttl=60",
               f"--pid-file={workdir / 'dnsmasq.pid'}", "--log-queries",
               f"--log-facility={_query_log}",
               *[f"--host-record={name},{address}" for name, address in NAMES.items()]]  # fmt: skip
    web = [sys.executable, str(Path(__file__).with_name("fakenet_server.py")), str(cert), str(key)]
    socks = [sys.executable, str(Path(__file__).with_name("fakenet_socks.py")), SOCKS, str(cert),
             str(key)]  # fmt: skip
    with outside_host(NS, HOST_IF, GATEWAY, ADDRESSES, 24, dnsmasq, web, socks):
        _wait_until_up()
        yield cert


def _wait_until_up() -> None:
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers, resolver.lifetime = [DNS], 1
    deadline = time.monotonic() + 30
    while True:
        try:
            assert str(resolver.resolve("pkg.example.test", "A")[0]) == NAMED
            for url in (f"http://{NAMED}/", f"http://{NAMED}:8080/", f"https://{NAMED}/",
                        f"http://{NAMED}/ -x socks5://{SOCKS}:1080"):  # fmt: skip
                subprocess.run(["ip", "netns", "exec", NS, "curl", "-skf", "-m", "2", "-o",
                                "/dev/null", *url.split()], check=True)  # fmt: skip
            return
        except (dns.exception.DNSException, subprocess.CalledProcessError):
            assert time.monotonic() < deadline, "the fake internet did not come up"
            time.sleep(0.2)

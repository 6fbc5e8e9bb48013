"""A sandbox's egress rules (E2B's `allowOut`, `denyOut`, `dnsServers`): parsed, checked and
matched. Pure: the firewall (network/firewall.py) and the egress proxy (network/egress_proxy.py)
enforce them.

As in E2B:
- an allowed entry wins over a denied one; what neither names is allowed;
- `allow_internet_access=false` denies 0.0.0.0/0 (so `allowOut` then makes an allow-list);
- hostnames are allowed only (never denied), matched on what the sandbox asks for: the TLS
  server name on port 443, the HTTP Host on port 80. Other ports go by address alone;
- a wildcard `*.example.com` matches names below example.com at any depth, not example.com;
- DNS goes to the node's resolver (network/egress_dns.py), which asks `dnsServers` (default:
  the node's own servers) and, for an allow-list, answers only the names it allows;
- `rules` inject headers into the HTTP requests to hosts the rules allow: the egress proxy
  terminates their TLS with the deployment's CA (network/egress_ca.py) and adds them, so a
  secret never enters the sandbox. Exact hosts win over wildcards, longer wildcards over
  shorter ones; a host's transforms apply in order, later headers replacing earlier ones;
- `egressProxy` (bring your own proxy) tunnels every TCP connection the rules let out through
  the user's SOCKS5 proxy, on the host; it fails closed (egress_proxy.py). UDP (DNS, QUIC)
  is not tunnelled.
Private, link-local and host ranges stay closed whatever the rules say, unless the operator
opened them (VIVARIUM_EGRESS_ALLOW; see firewall.py).
"""

from __future__ import annotations

import ipaddress
import re
import ssl
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from typing import Any

from vivarium.errors import InvalidArgument
from vivarium.network.addressing import BLOCKED_RANGES

ALL_TRAFFIC = "0.0.0.0/0"
MAX_ENTRIES = 256  # per list: each is a firewall rule in the slot's router
MAX_DNS = 10
MAX_RULE_HOSTS = 64
MAX_HEADERS = 32  # per host
MAX_HEADER_VALUE = 8192
_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)\Z")
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]{1,256}\Z")  # RFC 9110 token
MAX_CREDENTIAL = 255  # bytes, RFC 1929
MAX_CA_CERT = 8192
Headers = tuple[tuple[str, str], ...]


@dataclass(frozen=True)
class Socks:
    """The user's SOCKS5 proxy (E2B's `egressProxy`) that the sandbox's TCP is tunnelled
    through. The password and CA certificate are kept (a resume dials again) but never shown."""

    host: str  # a hostname or an IPv4 address
    port: int
    username: str | None = None
    password: str | None = field(default=None, repr=False)  # never in a log line
    tls: bool = False
    server_name: str | None = None  # to verify the proxy's certificate against; None: host
    ca_cert: str | None = field(default=None, repr=False)  # PEM, instead of the system's CAs

    def to_json(self) -> dict[str, Any]:
        return {"host": self.host, "port": self.port, "username": self.username,
                "password": self.password, "tls": self.tls, "server_name": self.server_name,
                "ca_cert": self.ca_cert}  # fmt: skip

    def wire(self) -> dict[str, Any]:
        body: dict[str, Any] = {"address": f"{self.host}:{self.port}"}
        if self.username is not None:
            body["username"] = self.username
        if self.tls:
            body["tls"] = {"enabled": True, **({"serverName": self.server_name}
                                               if self.server_name else {})}  # fmt: skip
        return body

    def tls_context(self) -> ssl.SSLContext:
        """Verified, TLS 1.2 or later, against `ca_cert` alone when one was given."""
        context = ssl.create_default_context(cadata=self.ca_cert)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        return context


@dataclass(frozen=True)
class Egress:
    allow: tuple[str, ...] = ()  # CIDRs and hostnames, as normalised by parse()
    deny: tuple[str, ...] = ()  # CIDRs
    dns: tuple[str, ...] | None = None  # None: the node's DNS servers
    internet: bool = True  # false denies ALL_TRAFFIC on top of `deny`
    rules: tuple[tuple[str, Headers], ...] = ()  # (host, headers to inject), as parsed
    socks: Socks | None = None  # the user's proxy every TCP connection is tunnelled through

    @property
    def allow_nets(self) -> list[str]:
        return [e for e in self.allow if _is_net(e)]

    @property
    def allow_names(self) -> list[str]:
        return [e for e in self.allow if not _is_net(e)]

    @property
    def deny_nets(self) -> list[str]:
        return [*self.deny, *([] if self.internet else [ALL_TRAFFIC])]

    @property
    def is_closed(self) -> bool:
        """Nothing at all may leave: the state of a free slot and of a warm sandbox."""
        return ALL_TRAFFIC in self.deny_nets and not self.allow

    def allows_name(self, name: str) -> bool:
        name = name.lower().rstrip(".")
        for entry in self.allow_names:
            if entry.startswith("*."):
                if name.endswith(entry[1:]) and len(name) > len(entry) - 1:
                    return True
            elif name == entry:
                return True
        return False

    @property
    def walled(self) -> bool:
        """An allow-list: everything denied but what the rules allow."""
        return ALL_TRAFFIC in self.deny_nets

    def resolves(self, name: str) -> bool:
        """Whether the sandbox's DNS answers `name`: an allow-list's names only (anything
        else could only carry data out in its queries), every name otherwise."""
        return not self.walled or self.allows_name(name)

    def headers_for(self, name: str) -> Headers | None:
        """The headers to inject into requests to `name`; None if no rule covers it."""
        name = name.lower().rstrip(".")
        best: tuple[int, Headers] | None = None
        for host, headers in self.rules:
            if host == name:
                return headers
            wild = host.startswith("*.") and name.endswith(host[1:])
            if wild and (best is None or len(host) > best[0]):
                best = (len(host), headers)
        return None if best is None else best[1]

    def to_json(self) -> dict[str, Any]:
        """The rules but `internet`, which records and rows keep as `allow_internet`."""
        return {"allow": list(self.allow), "deny": list(self.deny),
                "dns": None if self.dns is None else list(self.dns),
                "rules": [[host, [list(h) for h in hs]] for host, hs in self.rules],
                "socks": None if self.socks is None else self.socks.to_json()}  # fmt: skip

    @classmethod
    def from_json(cls, data: dict[str, Any] | None, internet: bool = True) -> Egress:
        """From to_json() and the `allow_internet` kept beside it (alone in records and rows
        written before rules existed)."""
        if not data:
            return cls(internet=internet)
        dns = data.get("dns")
        rules = tuple((str(host), tuple((str(k), str(v)) for k, v in headers))
                      for host, headers in data.get("rules", ()))  # fmt: skip
        socks = data.get("socks")
        return cls(tuple(data.get("allow", ())), tuple(data.get("deny", ())),
                   None if dns is None else tuple(dns),
                   internet, rules, None if socks is None else Socks(**socks))  # fmt: skip

    def wire(self) -> dict[str, Any]:
        """The rules as `SandboxNetworkConfig` shows them (get_info)."""
        body: dict[str, Any] = {"allowOut": list(self.allow), "denyOut": list(self.deny_nets)}
        if self.dns is not None:
            body["dnsServers"] = list(self.dns)
        if self.rules:
            body["rules"] = {host: [{"transform": {"headers": dict(headers)}}]
                             for host, headers in self.rules}  # fmt: skip
        if self.socks is not None:
            body["egressProxy"] = self.socks.wire()
        return body


CLOSED = Egress(internet=False)


def parse(network: dict[str, Any], internet: bool, where: str = "network") -> Egress:
    """The rules of a `SandboxNetworkConfig` (or `SandboxNetworkUpdateConfig`), checked: every
    error names the field."""
    allow = _entries(network.get("allowOut"), f"{where}.allowOut", names=True)
    deny = _entries(network.get("denyOut"), f"{where}.denyOut", names=False)
    raw_dns = network.get("dnsServers")
    dns: tuple[str, ...] | None = None
    if raw_dns is not None:
        if not isinstance(raw_dns, list) or len(raw_dns) > MAX_DNS:
            raise InvalidArgument(f"{where}.dnsServers must be a list of at most {MAX_DNS} "
                                  "IPv4 addresses")  # fmt: skip
        dns = tuple(_address(v, f"{where}.dnsServers") for v in raw_dns)
    egress = Egress(allow, deny, dns, internet, socks=_socks(network.get("egressProxy"),
                                                             f"{where}.egressProxy"))  # fmt: skip
    return replace(egress, rules=_rules(network.get("rules"), egress, f"{where}.rules"))


def _socks(raw: Any, field: str) -> Socks | None:
    if raw is None:
        return None
    if not isinstance(raw, dict) or not isinstance(raw.get("address"), str):
        raise InvalidArgument(f'{field} must be {{"address": "host:port", ...}}')
    host, sep, port = raw["address"].strip().rpartition(":")
    if not sep or not (port.isascii() and port.isdigit() and 0 < int(port) < 65536):
        raise InvalidArgument(f"{field}.address: {raw['address']!r} is not host:port",
                              'like "proxy.example.com:1080"')  # fmt: skip
    if _looks_numeric(host):
        host = _address(host, f"{field}.address")
    else:
        host = _hostname(host, f"{field}.address")
        if host.startswith("*"):
            raise InvalidArgument(f"{field}.address: a proxy has one name, not a wildcard")
    username, password = raw.get("username"), raw.get("password")
    for name, value in (("username", username), ("password", password)):
        if value is not None and (not isinstance(value, str)
                                  or not 0 < len(value.encode()) <= MAX_CREDENTIAL):  # fmt: skip
            raise InvalidArgument(f"{field}.{name} must be text of 1 to {MAX_CREDENTIAL} "
                                  "bytes (RFC 1929)")  # fmt: skip
    if password is not None and username is None:
        raise InvalidArgument(f"{field}.password is only valid with a username")
    tls = raw.get("tls") or {}
    if not isinstance(tls, dict) or not isinstance(tls.get("enabled", False), bool):
        raise InvalidArgument(f'{field}.tls must be {{"enabled": true, "serverName": ..., '
                              '"caCert": ...}')  # fmt: skip
    enabled, server_name, ca_cert = (
        tls.get("enabled", False),
        tls.get("serverName"),
        tls.get("caCert"),
    )
    if not enabled and (server_name is not None or ca_cert is not None):
        raise InvalidArgument(f"{field}.tls: serverName and caCert need TLS enabled")
    if server_name is not None:
        server_name = _hostname(str(server_name), f"{field}.tls.serverName")
    if ca_cert is not None:
        if not isinstance(ca_cert, str) or len(ca_cert.encode()) > MAX_CA_CERT:
            raise InvalidArgument(f"{field}.tls.caCert must be PEM of at most {MAX_CA_CERT} bytes")
        try:
            ssl.create_default_context(cadata=ca_cert)
        except (ssl.SSLError, ValueError):
            raise InvalidArgument(f"{field}.tls.caCert is not a PEM CA certificate") from None
    return Socks(host, int(port), username, password, enabled, server_name, ca_cert)


def _rules(raw: Any, egress: Egress, field: str) -> tuple[tuple[str, Headers], ...]:
    if raw is None:
        return ()
    if not isinstance(raw, dict) or len(raw) > MAX_RULE_HOSTS:
        raise InvalidArgument(f"{field} must map at most {MAX_RULE_HOSTS} hostnames to lists "
                              "of rules")  # fmt: skip
    out: list[tuple[str, Headers]] = []
    for key, rules in raw.items():
        where = f"{field}[{key!r}]"
        host = _hostname(key, field) if isinstance(key, str) and not _looks_numeric(key) else None
        if host is None or host == "*":
            raise InvalidArgument(f"{where}: rules take hostnames like api.example.com or "
                                  "*.example.com")  # fmt: skip
        if not egress.allows_name(host):  # a wildcard host too: "*" is one more label
            raise InvalidArgument(f"{where}: {host} is not allowed by allowOut",
                                  "add it to allowOut: rules open no way themselves")  # fmt: skip
        if not isinstance(rules, list):
            raise InvalidArgument(f"{where} must be a list of rules")
        headers: dict[str, tuple[str, str]] = {}
        for rule in rules:
            transform = rule.get("transform") or {} if isinstance(rule, dict) else None
            given = transform.get("headers") or {} if isinstance(transform, dict) else None
            if not isinstance(given, dict):
                raise InvalidArgument(f'{where}: a rule is {{"transform": {{"headers": '
                                      "{name: value}}}")  # fmt: skip
            for name, value in given.items():
                headers[str(name).lower()] = _header(name, value, where)
        if len(headers) > MAX_HEADERS:
            raise InvalidArgument(f"{where}: more than {MAX_HEADERS} headers")
        out.append((host, tuple(headers.values())))
    return tuple(out)


def _header(name: Any, value: Any, where: str) -> tuple[str, str]:
    if not isinstance(name, str) or not _HEADER_NAME.match(name):
        raise InvalidArgument(f"{where}: {name!r} is not a header name")
    if (not isinstance(value, str) or len(value) > MAX_HEADER_VALUE
            or any(c in value for c in "\r\n\0")):  # fmt: skip
        raise InvalidArgument(f"{where}: the value of header {name} must be text without line "
                              f"breaks, at most {MAX_HEADER_VALUE} characters")  # fmt: skip
    return name, value


def _entries(raw: Any, field: str, *, names: bool) -> tuple[str, ...]:
    if raw is None:
        return ()
    if not isinstance(raw, list) or not all(isinstance(v, str) for v in raw):
        raise InvalidArgument(f"{field} must be a list of strings")
    if len(raw) > MAX_ENTRIES:
        raise InvalidArgument(f"{field} has {len(raw)} entries, more than {MAX_ENTRIES}",
                              "use CIDR blocks or wildcard names to cover several")  # fmt: skip
    out: list[str] = []
    for value in raw:
        entry = _net(value, field) if _looks_numeric(value) else None
        if entry is None:
            if not names:
                raise InvalidArgument(
                    f"{field}: {value!r} is not an IPv4 address or CIDR block",
                    "hostnames can only be allowed: deny everything, then allow them",
                )
            entry = _hostname(value, field)
        if entry not in out:
            out.append(entry)
    return tuple(out)


def _looks_numeric(value: str) -> bool:
    """An address or block (IPv6 ones too, to be refused as such), not a hostname."""
    return ":" in value or (bool(value) and all(c.isdigit() or c in "./" for c in value))


def _net(value: str, field: str) -> str:
    try:
        net = ipaddress.ip_network(value.strip(), strict=False)
    except ValueError:
        raise InvalidArgument(
            f"{field}: {value!r} is not a valid IPv4 address or CIDR block",
            "addresses are like 1.2.3.4, blocks like 1.2.3.0/24",
        ) from None
    if net.version != 4:
        raise InvalidArgument(f"{field}: {value!r} is IPv6, and sandboxes have IPv4 only")
    return str(net)


def _address(value: Any, field: str) -> str:
    try:
        if not isinstance(value, str):
            raise ValueError
        return str(ipaddress.IPv4Address(value))
    except ValueError:
        raise InvalidArgument(f"{field}: {value!r} is not an IPv4 address") from None


def _hostname(value: str, field: str) -> str:
    name = value.strip().lower().rstrip(".")
    labels = name.split(".")
    wild = labels[0] == "*"
    if wild:
        labels = labels[1:]
    if not labels or len(name) > 253 or not all(_LABEL.match(label) for label in labels):
        raise InvalidArgument(
            f"{field}: {value!r} is not an IPv4 address, CIDR block or hostname",
            "hostnames are like api.example.com, or *.example.com for every name below it",
        )
    return name


def _is_net(entry: str) -> bool:
    return entry[:1].isdigit() and "/" in entry


def covering(nets: Iterable[str], address: str) -> bool:
    """Whether `address` lies in one of `nets`."""
    ip = ipaddress.IPv4Address(address)
    return any(ip in ipaddress.ip_network(n, strict=False) for n in nets)


def reachable(address: str, opened: Iterable[str]) -> bool:
    """Whether anything of a sandbox's may go to `address` at all: outside the private,
    link-local and host ranges, or in ones the operator opened (VIVARIUM_EGRESS_ALLOW)."""
    return covering(opened, address) or not covering(BLOCKED_RANGES, address)

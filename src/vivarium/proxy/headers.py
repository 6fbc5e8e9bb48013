"""Header rewriting between the client and the sandbox, in both directions.

Hop-by-hop headers describe one connection and are dropped; everything else (Host, the routing
headers, cookies) passes as sent. Framing headers (Content-Length, Transfer-Encoding) are kept:
h11 on the other side reads them to frame the body it writes, and validated them on the way in.
"""

from __future__ import annotations

from collections.abc import Iterable

Headers = list[tuple[bytes, bytes]]

HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"te", b"trailer", b"upgrade"})


def _tokens(value: bytes) -> set[bytes]:
    return {t.strip().lower() for t in value.split(b",") if t.strip()}


def _drop_hop_by_hop(items: Iterable[tuple[bytes, bytes]]) -> tuple[Headers, set[bytes], bytes]:
    """(kept headers, tokens of Connection, value of Upgrade)."""
    kept: Headers = []
    listed: set[bytes] = set()
    upgrade = b""
    for raw_name, value in items:
        name = raw_name.lower()
        if name == b"connection":
            listed |= _tokens(value)
        elif name == b"upgrade":
            upgrade = value
        elif name not in HOP_BY_HOP and not name.startswith(b"proxy-"):
            kept.append((raw_name, value))
    # Headers named in Connection are hop-by-hop too (RFC 9110 §7.6.1).
    drop = set(listed)
    if any(n.lower() == b"transfer-encoding" for n, _ in kept):
        # h11 frames by Transfer-Encoding when both are sent; a Content-Length passed along
        # would let the next hop frame the same bytes differently (request smuggling).
        drop.add(b"content-length")
    if drop:
        kept = [(n, v) for n, v in kept if n.lower() not in drop]
    return kept, listed, upgrade


def request_headers(
    items: Iterable[tuple[bytes, bytes]], client_ip: str, has_host: bool, host: bytes
) -> tuple[Headers, bool]:
    """Headers to send upstream, and whether the request asks to switch protocols."""
    kept, listed, upgrade = _drop_hop_by_hop(items)
    forwarded = client_ip.encode("ascii")
    for i, (name, value) in enumerate(kept):
        if name.lower() == b"x-forwarded-for":
            kept[i] = (name, value + b", " + forwarded)
            break
    else:
        kept.append((b"X-Forwarded-For", forwarded))
    if not has_host:
        # HTTP/1.0 clients may omit Host; what we send upstream is HTTP/1.1, which requires it.
        kept.append((b"Host", host))
    upgrading = bool(upgrade) and b"upgrade" in listed
    if upgrading:
        kept += [(b"Connection", b"Upgrade"), (b"Upgrade", upgrade)]
    return kept, upgrading


def response_headers(items: Iterable[tuple[bytes, bytes]], switching: bool) -> Headers:
    kept, _, upgrade = _drop_hop_by_hop(items)
    if switching:
        kept += [(b"Connection", b"Upgrade"), (b"Upgrade", upgrade)]
    return kept

"""A SOCKS5 CONNECT (RFC 1928), with username and password (RFC 1929), over a stream the caller
opened: the egress proxy dials the user's proxy itself, to an address it resolved and checked,
over TLS verified against the name the user gave. (python-socks, the library for this, opens
its own connection and verifies TLS against the address it dialled, so neither holds.)
"""

from __future__ import annotations

import asyncio
import ipaddress

_VERSION = 5
_NO_AUTH, _PASSWORD, _NONE_ACCEPTABLE = 0, 2, 0xFF
_CONNECT = 1
_IPV4, _NAME, _IPV6 = 1, 3, 4
_REPLIES = {
    1: "general failure", 2: "not allowed by the proxy's rules", 3: "network unreachable",
    4: "host unreachable", 5: "connection refused", 6: "TTL expired",
    7: "command not supported", 8: "address type not supported",
}  # fmt: skip


class SocksError(Exception):
    """The proxy refused: the message says why, in RFC 1928's words."""


async def connect(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, host: str, port: int,
    username: str | None = None, password: str | None = None,
) -> None:  # fmt: skip
    """Ask the proxy at the other end of the stream to connect to `host`:`port`; returns once
    it has, leaving the stream carrying the tunnelled bytes."""
    method = _PASSWORD if username is not None else _NO_AUTH
    writer.write(bytes([_VERSION, 1, method]))
    version, chosen = await reader.readexactly(2)
    if version != _VERSION:
        raise SocksError("the proxy does not speak SOCKS5")
    if chosen != method:
        wants = chosen == _NONE_ACCEPTABLE and username is None
        raise SocksError("the proxy wants a username and password" if wants
                         else "the proxy refused our way to sign in")  # fmt: skip
    if method == _PASSWORD:
        user, secret = (username or "").encode(), (password or "").encode()
        writer.write(bytes([1, len(user)]) + user + bytes([len(secret)]) + secret)
        _, status = await reader.readexactly(2)
        if status != 0:
            raise SocksError("the proxy refused the username and password")
    try:
        target = bytes([_IPV4]) + ipaddress.IPv4Address(host).packed
    except ValueError:
        name = host.encode("idna")
        target = bytes([_NAME, len(name)]) + name
    writer.write(bytes([_VERSION, _CONNECT, 0]) + target + port.to_bytes(2, "big"))
    version, reply, _, kind = await reader.readexactly(4)
    if version != _VERSION:
        raise SocksError("the proxy does not speak SOCKS5")
    if reply != 0:
        raise SocksError(f"the proxy could not connect: {_REPLIES.get(reply, reply)}")
    # The address the proxy bound, which nothing here needs.
    size = {_IPV4: 4, _IPV6: 16}.get(kind) or (await reader.readexactly(1))[0]
    await reader.readexactly(size + 2)

"""A SOCKS5 proxy of the fake internet (tests/fakenet.py), run inside its namespace: what a user
brings as `egressProxy`. On its address, port 1080 takes anyone, 1081 a username and password,
1082 the same over TLS. It connects on from its own address, so the servers behind it see
where a connection came through.

Usage: python fakenet_socks.py ADDRESS CERT KEY
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import sys

USERNAME, PASSWORD = b"proxy-user", b"proxy-pass"


async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, address: str,
                auth: bool) -> None:  # fmt: skip
    try:
        _, count = await reader.readexactly(2)
        methods = await reader.readexactly(count)
        wanted = 2 if auth else 0
        if wanted not in methods:
            writer.write(b"\x05\xff")
            return
        writer.write(bytes([5, wanted]))
        if auth:
            _, size = await reader.readexactly(2)
            user = await reader.readexactly(size)
            password = await reader.readexactly((await reader.readexactly(1))[0])
            ok = (user, password) == (USERNAME, PASSWORD)
            writer.write(b"\x01\x00" if ok else b"\x01\x01")
            if not ok:
                return
        _, command, _, kind = await reader.readexactly(4)
        if kind == 1:
            host = socket.inet_ntoa(await reader.readexactly(4))
        else:
            host = (await reader.readexactly((await reader.readexactly(1))[0])).decode()
        port = int.from_bytes(await reader.readexactly(2), "big")
        try:
            up_reader, up_writer = await asyncio.open_connection(
                host, port, local_addr=(address, 0)
            )
        except OSError:
            writer.write(b"\x05\x05\x00\x01" + bytes(6))  # connection refused
            return
        writer.write(b"\x05\x00\x00\x01" + socket.inet_aton(address) + bytes(2))
        await asyncio.gather(_pump(reader, up_writer), _pump(up_reader, writer))
    except (OSError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()


async def main() -> None:
    address, cert, key = sys.argv[1:4]
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    servers = [
        await asyncio.start_server(
            lambda r, w, a=auth: serve(r, w, address, a), address, port, ssl=tls
        )  # fmt: skip
        for port, auth, tls in ((1080, False, None), (1081, True, None), (1082, True, context))
    ]
    await asyncio.gather(*(s.serve_forever() for s in servers))


if __name__ == "__main__":
    asyncio.run(main())

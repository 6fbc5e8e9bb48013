"""Raw bytes both ways once a request switched protocols (WebSocket and any other `Upgrade`)."""

from __future__ import annotations

import asyncio

from vivarium.proxy.stream import READ_SIZE, HttpStream


async def splice(
    client: HttpStream, upstream: HttpStream, to_upstream: bytes, to_client: bytes
) -> None:
    """Copy until either side closes or fails, then close both.

    `to_upstream`/`to_client` are bytes that arrived behind the HTTP heads and are already read.
    Half-closes are not propagated: WebSocket ends with its own close frames.
    """
    pumps = [
        asyncio.create_task(_pump(client, upstream, to_upstream)),
        asyncio.create_task(_pump(upstream, client, to_client)),
    ]
    try:
        await asyncio.wait(pumps, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pump in pumps:
            pump.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        # close(), not abort(): what was relayed last (a close frame) still reaches its reader.
        client.close()
        upstream.close()


async def _pump(src: HttpStream, dst: HttpStream, pending: bytes) -> None:
    data = pending
    while True:
        if data:
            await dst.write(data)
        data = await src.reader.read(READ_SIZE)
        if not data:
            return

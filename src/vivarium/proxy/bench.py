"""What the proxy adds to a small request: `python -m vivarium.proxy.bench`.

A trivial keep-alive HTTP server and the proxy run in two child processes (so neither shares an
event loop or the GIL with the client); one httpx keep-alive client times sequential small GETs
straight to the server and through the proxy, interleaved in rounds so drift hits both alike.
"""

from __future__ import annotations

import asyncio
import multiprocessing
import socket
import statistics
import time
from typing import Any

import httpx

from vivarium.proxy.server import SandboxProxy, Upstream

RESPONSE = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 2\r\n\r\nok"


class _Echo(asyncio.Protocol):
    """Answers every request head with a fixed 2-byte body; enough for latency."""

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            _, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
            self.transport.write(RESPONSE)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _serve_upstream(port: int, ready: Any) -> None:
    async def main() -> None:
        loop = asyncio.get_running_loop()
        await loop.create_server(_Echo, "127.0.0.1", port)
        ready.set()
        await asyncio.Event().wait()

    asyncio.run(main())


def _serve_proxy(port: int, ready: Any) -> None:
    async def main() -> None:
        proxy = SandboxProxy(lambda sid: Upstream("127.0.0.1", sid))
        await proxy.start("127.0.0.1", port)
        ready.set()
        await asyncio.Event().wait()

    asyncio.run(main())


def _timings(client: httpx.Client, url: str, headers: dict[str, str], n: int) -> list[float]:
    out = []
    for _ in range(n):
        t0 = time.perf_counter()
        client.get(url, headers=headers).raise_for_status()
        out.append(time.perf_counter() - t0)
    return out


def measure_overhead(requests: int = 400, rounds: int = 5) -> dict[str, float]:
    """p50 latency (ms) of a small GET, direct and through the proxy, and the difference."""
    ctx = multiprocessing.get_context("spawn")
    up_port, proxy_port = _free_port(), _free_port()
    procs = []
    try:
        for target, port in ((_serve_upstream, up_port), (_serve_proxy, proxy_port)):
            ready = ctx.Event()
            proc = ctx.Process(target=target, args=(port, ready), daemon=True)
            proc.start()
            procs.append(proc)
            if not ready.wait(30):
                raise RuntimeError(f"{target.__name__} did not start")
        headers = {"E2b-Sandbox-Id": "bench", "E2b-Sandbox-Port": str(up_port)}
        direct: list[float] = []
        proxied: list[float] = []
        with httpx.Client() as client:
            for url, h in (
                (f"http://127.0.0.1:{up_port}/", {}),
                (f"http://127.0.0.1:{proxy_port}/", headers),
            ):
                _timings(client, url, h, 50)  # warm up connections and code paths
            per_round = max(1, requests // rounds)
            for _ in range(rounds):
                direct += _timings(client, f"http://127.0.0.1:{up_port}/", {}, per_round)
                proxied += _timings(client, f"http://127.0.0.1:{proxy_port}/", headers, per_round)
    finally:
        for proc in procs:
            proc.kill()
            proc.join()
    direct_ms = statistics.median(direct) * 1000
    proxied_ms = statistics.median(proxied) * 1000
    return {
        "direct_p50_ms": round(direct_ms, 3),
        "proxied_p50_ms": round(proxied_ms, 3),
        "overhead_p50_ms": round(proxied_ms - direct_ms, 3),
    }


if __name__ == "__main__":
    print(measure_overhead())

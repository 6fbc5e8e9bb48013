"""The sandbox proxy against real upstream servers on 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import socket
import tracemalloc
from collections.abc import AsyncIterator

import h11
import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from vivarium.errors import NotFound
from vivarium.guest.envd import PORT as ENVD_PORT
from vivarium.proxy import ProxyLimits, Refusal, Upstream

from .support import (
    HANG,
    H11Peer,
    free_port,
    local,
    proxy,
    raw_server,
    read_head,
    routing,
    run,
    uvicorn_app,
)

pytestmark = pytest.mark.timeout(3 * HANG)


def whoami_app(name: str) -> Starlette:
    """Tells what it received: which server, the headers, the body size, the proxy's socket."""

    async def whoami(request: Request) -> Response:
        body = await request.body()
        assert request.client is not None
        return JSONResponse(
            {
                "name": name,
                "headers": {k: v for k, v in request.headers.items()},
                "size": len(body),
                "peer_port": request.client.port,
                "path": request.url.path,
            }
        )

    return Starlette(routes=[Route("/{path:path}", whoami, methods=["GET", "POST", "HEAD"])])


# --- routing ---------------------------------------------------------------------------------


def test_envds_init_is_never_forwarded() -> None:
    """/init sets a sandbox's access token: only the node calls it, at the slot address. Nothing
    listens on the envd port here, so a request that got through would fail otherwise (502)."""

    async def main() -> None:
        async with proxy({"sbx-a": local("a")}) as p, httpx.AsyncClient() as c:
            for target in ("/init", "/%69nit", "/init/", "/init?x=1"):
                r = await c.post(f"http://127.0.0.1:{p.port}{target}", json={"accessToken": "x"},
                                 headers=routing("sbx-a", ENVD_PORT))  # fmt: skip
                assert r.status_code == 403, (target, r.status_code)
                assert r.json()["message"] == "envd's /init is the node's alone"
            health = await c.get(f"http://127.0.0.1:{p.port}/initial",
                                 headers=routing("sbx-a", ENVD_PORT))  # fmt: skip
            assert health.status_code == 502  # forwarded: only /init itself is the node's

    run(main())


def test_routes_by_headers_keeps_host_and_adds_forwarded_for() -> None:
    async def main() -> None:
        async with uvicorn_app(whoami_app("a")) as port, proxy({"sbx-a": local("a")}) as p:
            headers = {
                **routing("sbx-a", port),
                "X-Forwarded-For": "203.0.113.7",
                "Connection": "keep-alive, X-Secret",
                "X-Secret": "1",
                "Keep-Alive": "5",
                "Proxy-Authorization": "Basic eA==",
                "X-Kept": "yes",
            }
            async with httpx.AsyncClient() as c:
                r = await c.post(
                    f"http://127.0.0.1:{p.port}/some/path?q=1", headers=headers, content=b"hello"
                )
            assert r.status_code == 200
            seen = r.json()
            assert seen["name"] == "a" and seen["size"] == 5 and seen["path"] == "/some/path"
            h = seen["headers"]
            assert h["host"] == f"127.0.0.1:{p.port}"  # as the client sent it
            assert h["x-forwarded-for"] == "203.0.113.7, 127.0.0.1"
            assert h["x-kept"] == "yes"
            assert h["e2b-sandbox-id"] == "sbx-a"
            for hop in ("x-secret", "keep-alive", "proxy-authorization", "connection"):
                assert hop not in h, hop

    run(main())


def test_routes_by_host_with_a_domain_and_headers_win() -> None:
    async def main() -> None:
        async with (
            uvicorn_app(whoami_app("a")) as port_a,
            uvicorn_app(whoami_app("b")) as port_b,
            proxy({"ia": local("a"), "ib": local("b")}, domain="sbx.test") as p,
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{p.port}") as c,
        ):
            for host in (f"{port_a}-ia.sbx.test", f"{port_a}-ia.SBX.test:3001"):
                r = await c.get("/", headers={"Host": host})
                assert r.json()["name"] == "a" and r.json()["headers"]["host"] == host
            r = await c.get("/", headers={"Host": f"{port_b}-ib.sbx.test"})
            assert r.json()["name"] == "b"
            r = await c.get("/", headers={"Host": f"{port_b}-ib.sbx.test", **routing("ia", port_a)})
            assert r.json()["name"] == "a"
            r = await c.get("/", headers={"Host": f"{port_a}-gone.sbx.test"})
            assert r.status_code == 502 and "was not found" in r.json()["message"]
            r = await c.get("/", headers={"Host": "ia.sbx.test"})
            assert r.status_code == 400 and r.json()["code"] == 400
            r = await c.get("/", headers={"Host": "example.com"})
            assert r.status_code == 400

    run(main())


def test_two_sandboxes_on_one_client_connection() -> None:
    async def main() -> None:
        async with (
            uvicorn_app(whoami_app("a")) as port_a,
            uvicorn_app(whoami_app("b")) as port_b,
            proxy({"ia": local("a"), "ib": local("b")}) as p,
        ):
            client = await H11Peer.connect(p.port)
            for name, port in [("a", port_a), ("b", port_b), ("a", port_a), ("b", port_b)]:
                sid = f"i{name}"
                head, body = await client.request("POST", "/", routing(sid, port).items(), b"xyz")
                assert head.status_code == 200 and json.loads(body)["name"] == name
            # Errors of the proxy's own keep the connection too.
            head, body = await client.request(
                "GET", "/", [("E2b-Sandbox-Id", "nope"), ("E2b-Sandbox-Port", "1")]
            )
            assert head.status_code == 502 and b"was not found" in body
            head, body = await client.request("GET", "/", routing("ia", port_a).items())
            assert head.status_code == 200
            client.close()

    run(main())


def test_paused_and_transitioning_sandboxes_get_e2bs_409() -> None:
    async def main() -> None:
        table: dict[str, Upstream | Refusal] = {
            "ipaused": Refusal.paused("ipaused"),
            "imoving": Refusal.transitioning("imoving"),
        }
        async with (
            proxy(table, limits=ProxyLimits(transition_wait=0.3)) as p,
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{p.port}") as c,
        ):
            r = await c.post("/process.Process/Start", headers=routing("ipaused", 49983))
            assert r.status_code == 409
            assert r.json() == {
                "sandboxId": "ipaused", "code": 409, "canAutoResume": False,
                "message": "The sandbox ipaused is paused: resume it with "
                           "Sandbox.connect('ipaused') (POST /sandboxes/ipaused/connect)",
            }  # fmt: skip
            r = await c.get("/", headers=routing("imoving", 8080))  # after 0.3 s of waiting
            assert r.status_code == 409 and "still transitioning" in r.json()["message"]

    run(main())


def test_a_request_waits_for_a_transition_and_wakes_auto_resume_sandboxes() -> None:
    """A sandbox being snapshotted is served once it runs again; a paused one is woken first
    when the waker says it resumes on traffic, and not found if it was killed meanwhile."""
    woken: list[str] = []

    async def main() -> None:
        async with uvicorn_app(whoami_app("a")) as port:
            table: dict[str, Upstream | Refusal] = {
                "imoving": Refusal.transitioning("imoving"),
                "isleeps": Refusal.paused("isleeps"),
                "igone": Refusal.paused("igone"),
            }

            async def wake(sandbox_id: str) -> bool:
                woken.append(sandbox_id)
                if sandbox_id == "igone":
                    del table["igone"]
                    raise NotFound("killed meanwhile")
                table[sandbox_id] = local("a")
                return True

            async with (
                proxy(table, wake=wake) as p,
                httpx.AsyncClient(base_url=f"http://127.0.0.1:{p.port}") as c,
            ):
                later = asyncio.get_running_loop().call_later(
                    0.3, table.__setitem__, "imoving", local("a")
                )
                r = await c.get("/", headers=routing("imoving", port))
                assert r.status_code == 200 and r.json()["name"] == "a"
                later.cancel()
                r = await c.get("/", headers=routing("isleeps", port))
                assert r.status_code == 200 and r.json()["name"] == "a"
                r = await c.get("/", headers=routing("igone", port))
                assert r.status_code == 502 and "was not found" in r.json()["message"]
        assert woken == ["isleeps", "igone"]

    run(main())


def test_proxy_errors_are_json() -> None:
    async def main() -> None:
        closed_port = free_port()
        async with (
            proxy({"ia": local("a")}) as p,
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{p.port}") as c,
        ):
            r = await c.get("/health")
            assert (r.status_code, r.json()) == (200, {"status": "ok"})
            r = await c.get("/", headers=routing("unknown", 49983))
            assert r.status_code == 502
            assert r.json() == {"code": 502, "message": "The sandbox unknown was not found"}
            r = await c.get("/", headers=routing("ia", closed_port))
            assert r.status_code == 502 and r.json()["code"] == 502
            message = r.json()["message"]  # the words the official client looks for
            assert f"running but port is not open: {closed_port} refused" in message
            r = await c.get("/anything")
            assert r.status_code == 400 and "E2b-Sandbox-Id" in r.json()["message"]
            r = await c.get("/", headers={"E2b-Sandbox-Id": "ia"})
            assert r.status_code == 400 and "E2b-Sandbox-Port" in r.json()["message"]
            for bad in (b"0", b"70000", b"x", b"\xb2", b"9" * 5000):  # \xb2: latin-1 "²"
                r = await c.get("/", headers={b"E2b-Sandbox-Id": b"ia", b"E2b-Sandbox-Port": bad})
                assert r.status_code == 400, bad
            r = await c.get("/", headers=routing("../etc", 1))
            assert r.status_code == 400

            async def body() -> AsyncIterator[bytes]:
                for _ in range(3):
                    yield b"x" * 1000

            # A body the proxy does not forward is read and dropped; the connection lives on.
            r = await c.post("/", headers=routing("unknown", 49983), content=body())
            assert r.status_code == 502
            assert (await c.get("/health")).status_code == 200

    run(main())


def test_malformed_requests_get_400_or_431_and_the_proxy_keeps_serving() -> None:
    async def main() -> None:
        async with uvicorn_app(whoami_app("a")) as port, proxy({"ia": local("a")}) as p:
            for junk, status in [
                (b"NOT HTTP AT ALL\r\n\r\n", b"400"),
                (b"GET / HTTP/1.1\r\nHost: x\r\nX: " + b"a" * 70_000, b"431"),
                (b"GET / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n", b"501"),
            ]:
                reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
                writer.write(junk)
                answer = await reader.read()  # the proxy closes after answering
                assert answer.startswith(b"HTTP/1.1 " + status), answer[:100]
                assert b'"code": ' + status in answer
                writer.close()
            async with httpx.AsyncClient() as c:
                r = await c.get(f"http://127.0.0.1:{p.port}/", headers=routing("ia", port))
                assert r.status_code == 200

    run(main())


def test_idle_client_connection_is_closed() -> None:
    async def main() -> None:
        async with proxy({}, limits=ProxyLimits(idle_timeout=0.2)) as p:
            reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
            assert await asyncio.wait_for(reader.read(), HANG) == b""
            writer.close()

    run(main())


# --- streaming -------------------------------------------------------------------------------


def test_chunked_request_body_reaches_the_sandbox_as_it_is_sent() -> None:
    words = [b"first", b"second", b"third", b"last"]
    received = b""
    progressed = asyncio.Event()

    async def upload(request: Request) -> Response:
        nonlocal received
        async for chunk in request.stream():
            received += chunk
            progressed.set()
        return JSONResponse({"body": received.decode()})

    async def main() -> None:
        app = Starlette(routes=[Route("/", upload, methods=["POST"])])
        async with uvicorn_app(app) as port, proxy({"ia": local("a")}) as p:

            async def body() -> AsyncIterator[bytes]:
                sent = b""
                for word in words:
                    # Each chunk only once the sandbox has all before it: a buffering proxy
                    # deadlocks here.
                    while received != sent:
                        progressed.clear()
                        await asyncio.wait_for(progressed.wait(), HANG)
                    yield word
                    sent += word

            async with httpx.AsyncClient() as c:
                r = await c.post(
                    f"http://127.0.0.1:{p.port}/", headers=routing("ia", port), content=body()
                )
            assert r.status_code == 200
            assert r.json() == {"body": "firstsecondthirdlast"}

    run(main())


def test_streamed_response_arrives_event_by_event() -> None:
    got_first = asyncio.Event()
    finished = asyncio.Event()

    async def events(request: Request) -> Response:
        async def gen() -> AsyncIterator[bytes]:
            yield b"event-1\n"
            await asyncio.wait_for(got_first.wait(), HANG)  # the client must see it first
            yield b"event-2\n"
            finished.set()

        return StreamingResponse(gen(), media_type="application/connect+json")

    async def main() -> None:
        app = Starlette(routes=[Route("/", events)])
        async with uvicorn_app(app) as port, proxy({"ia": local("a")}) as p:
            received = b""
            async with (
                httpx.AsyncClient() as c,
                c.stream("GET", f"http://127.0.0.1:{p.port}/", headers=routing("ia", port)) as r,
            ):
                async for chunk in r.aiter_raw():
                    if not received:
                        assert not finished.is_set()
                        got_first.set()
                    received += chunk
            assert received == b"event-1\nevent-2\n"

    run(main())


def test_full_duplex_response_starts_before_request_body_ends() -> None:
    """Connect bidi streams: the sandbox answers each message while the client still sends."""

    async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = H11Peer(reader, writer, h11.SERVER)
        assert isinstance(await peer.next_event(), h11.Request)
        await peer.send(h11.Response(status_code=200, headers=[("Transfer-Encoding", "chunked")]))
        while type(event := await peer.next_event()) is h11.Data:
            await peer.send(h11.Data(data=b"echo:" + event.data))
        await peer.send(h11.EndOfMessage())

    async def main() -> None:
        async with raw_server(echo) as port, proxy({"ia": local("a")}) as p:
            client = await H11Peer.connect(p.port)
            headers = [
                ("Host", "x"),
                ("Transfer-Encoding", "chunked"),
                *routing("ia", port).items(),
            ]
            await client.send(h11.Request(method="POST", target="/", headers=headers))
            head = await client.next_event()
            assert isinstance(head, h11.Response) and head.status_code == 200
            for word in (b"one", b"two", b"three"):
                await client.send(h11.Data(data=word))
                event = await client.next_event()
                assert event.data == b"echo:" + word
            await client.send(h11.EndOfMessage())
            assert type(await client.next_event()) is h11.EndOfMessage
            # ... and the connection carries the next request.
            head, _ = await client.request("GET", "/health", [])
            assert head.status_code == 200
            client.close()

    run(main())


def test_large_bodies_stream_both_ways_without_buffering() -> None:
    size = 50 * 1024 * 1024
    block = b"\x5a" * (1024 * 1024)

    async def sink(request: Request) -> Response:
        total = 0
        async for chunk in request.stream():
            total += len(chunk)
        return JSONResponse({"size": total})

    async def source(request: Request) -> Response:
        async def gen() -> AsyncIterator[bytes]:
            for _ in range(size // len(block)):
                yield block

        return StreamingResponse(gen(), headers={"Content-Length": str(size)})

    async def main() -> None:
        app = Starlette(routes=[Route("/up", sink, methods=["POST"]), Route("/down", source)])
        async with (
            uvicorn_app(app) as port,
            proxy({"ia": local("a")}) as p,
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{p.port}", timeout=30) as c,
        ):

            async def body() -> AsyncIterator[bytes]:
                for _ in range(size // len(block)):
                    yield block

            tracemalloc.start()
            try:
                r = await c.post("/up", headers=routing("ia", port), content=body())
                assert r.json() == {"size": size}
                received = 0
                async with c.stream("GET", "/down", headers=routing("ia", port)) as r:
                    assert r.headers["content-length"] == str(size)
                    async for chunk in r.aiter_raw():
                        received += len(chunk)
                assert received == size
                peak = tracemalloc.get_traced_memory()[1]
            finally:
                tracemalloc.stop()
            # Client, proxy and server share this process; all together stay far below one body.
            assert peak < 16 * 1024 * 1024, peak

    run(main())


# --- protocol switch -------------------------------------------------------------------------


def test_websocket_upgrade_pipes_bytes_both_ways() -> None:
    saw_close = asyncio.Event()

    async def ws_echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await read_head(reader)).decode()
        lines = {
            k.lower(): v.strip()
            for k, _, v in (line.partition(":") for line in head.split("\r\n")[1:] if line)
        }
        assert lines["upgrade"] == "websocket" and "upgrade" in lines["connection"].lower()
        accept = base64.b64encode(
            hashlib.sha1(
                (lines["sec-websocket-key"] + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode()
            ).digest()
        ).decode()
        writer.write(
            f"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
            f"Connection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
            "hello-from-server".encode()
        )
        while data := await reader.read(65536):
            writer.write(b"echo:" + data)
            await writer.drain()
        saw_close.set()

    async def main() -> None:
        async with raw_server(ws_echo) as port, proxy({"ia": local("a")}) as p:
            reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
            writer.write(
                f"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                f"Sec-WebSocket-Version: 13\r\nE2b-Sandbox-Id: ia\r\n"
                f"E2b-Sandbox-Port: {port}\r\n\r\n".encode()
                + b"early"
            )
            head = await read_head(reader)
            assert head.startswith(b"HTTP/1.1 101 ")
            assert b"s3pPLMBiTxaQ9kYGzzhZRbK+xOo=" in head
            expected = b"hello-from-serverecho:early"
            got = b""
            while len(got) < len(expected):
                got += await reader.read(65536)
            assert got == expected
            writer.write(b"ping")
            assert await reader.read(65536) == b"echo:ping"
            writer.close()
            await asyncio.wait_for(saw_close.wait(), HANG)

    run(main())


def test_upgrade_refused_by_the_sandbox_is_a_plain_response() -> None:
    async def main() -> None:
        async with uvicorn_app(whoami_app("a")) as port, proxy({"ia": local("a")}) as p:
            client = await H11Peer.connect(p.port)
            upgrade = [("Upgrade", "websocket"), ("Connection", "Upgrade")]
            head, body = await client.request("GET", "/", [*upgrade, *routing("ia", port).items()])
            assert head.status_code == 200 and json.loads(body)["name"] == "a"
            head, _ = await client.request("GET", "/", routing("ia", port).items())
            assert head.status_code == 200
            client.close()

    run(main())


# --- failures --------------------------------------------------------------------------------


def test_client_hanging_up_mid_stream_closes_the_upstream_and_leaks_no_task() -> None:
    upstream_closed = asyncio.Event()

    async def quiet_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n6\r\nevent\n\r\n")
        # Nothing more to send for a while (a command that runs long): the proxy has no write
        # to fail, it must notice the client leaving by itself.
        await reader.read()
        upstream_closed.set()

    async def main() -> None:
        async with raw_server(quiet_stream) as port, proxy({"ia": local("a")}) as p:
            await asyncio.sleep(0)
            baseline = len(asyncio.all_tasks())
            reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
            writer.write(
                f"GET / HTTP/1.1\r\nHost: x\r\nE2b-Sandbox-Id: ia\r\n"
                f"E2b-Sandbox-Port: {port}\r\n\r\n".encode()
            )
            assert b"event" in await reader.read(65536)
            writer.transport.abort()
            await asyncio.wait_for(upstream_closed.wait(), HANG)
            while len(asyncio.all_tasks()) > baseline:  # bounded by `run`'s hang timeout
                await asyncio.sleep(0.01)

    run(main())


def test_upstream_dying_mid_response_resets_the_client_connection() -> None:
    # A reset, not a close: only that tells an HTTP/1.1 client that the response was cut off
    # (the e2b client then checks whether the sandbox is gone).
    async def dies(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\npartial")
        await writer.drain()

    async def main() -> None:
        async with (
            raw_server(dies) as port,
            proxy({"ia": local("a")}) as p,
            httpx.AsyncClient() as c,
        ):
            with pytest.raises(httpx.ReadError):
                await c.get(f"http://127.0.0.1:{p.port}/", headers=routing("ia", port))

    run(main())


def test_upstream_closing_before_answering_is_502() -> None:
    async def hangs_up(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)

    async def main() -> None:
        async with (
            raw_server(hangs_up) as port,
            proxy({"ia": local("a")}) as p,
            httpx.AsyncClient() as c,
        ):
            r = await c.get(f"http://127.0.0.1:{p.port}/", headers=routing("ia", port))
            assert r.status_code == 502 and "closed the connection" in r.json()["message"]

    run(main())


def test_forget_cuts_streams_to_a_killed_sandbox() -> None:
    async def silent_stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n")
        await asyncio.sleep(30)  # like a sandbox whose network vanished: no FIN, no reset

    async def main() -> None:
        async with raw_server(silent_stream) as port, proxy({"ia": local("a")}) as p:
            reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
            writer.write(
                f"GET / HTTP/1.1\r\nHost: x\r\nE2b-Sandbox-Id: ia\r\n"
                f"E2b-Sandbox-Port: {port}\r\n\r\n".encode()
            )
            assert b"hi" in await reader.read(65536)
            p.forget("ia")
            with pytest.raises(ConnectionResetError):  # never the last chunk: a reset
                await asyncio.wait_for(reader.read(), HANG)
            writer.close()

    run(main())


# --- upstream connection pool ----------------------------------------------------------------


def test_pool_reuses_connections_only_for_the_same_instance() -> None:
    async def main() -> None:
        table = {"ia": Upstream("127.0.0.1", "ia#1")}
        async with (
            uvicorn_app(whoami_app("a")) as port,
            proxy(table) as p,
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{p.port}") as c,
        ):

            async def upstream_socket() -> int:
                r = await c.get("/", headers=routing("ia", port))
                return int(r.json()["peer_port"])

            first = await upstream_socket()
            assert await upstream_socket() == first  # reused
            table["ia"] = Upstream("127.0.0.1", "ia#2")  # same address, new sandbox instance
            second = await upstream_socket()
            assert second != first
            assert await upstream_socket() == second
            p.forget("ia#2")
            third = await upstream_socket()
            assert third not in (first, second)
            p.forget("ia")  # by sandbox id works too
            assert await upstream_socket() not in (first, second, third)

    run(main())


def test_stale_pooled_connection_is_replaced_transparently() -> None:
    """The sandbox drops a kept-alive connection just as the proxy reuses it."""

    async def one_per_connection(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        peer = H11Peer(reader, writer, h11.SERVER)
        assert isinstance(await peer.next_event(), h11.Request)
        while type(await peer.next_event()) is not h11.EndOfMessage:
            pass
        await peer.send(
            h11.Response(status_code=200, headers=[("Content-Length", "2")]),
            h11.Data(data=b"ok"),
            h11.EndOfMessage(),
        )
        await read_head(reader)  # the next request: hang up without answering
        writer.transport.abort()

    async def main() -> None:
        async with (
            raw_server(one_per_connection) as port,
            proxy({"ia": local("a")}) as p,
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{p.port}") as c,
        ):
            for _ in range(3):
                r = await c.post("/", headers=routing("ia", port), content=b"body")
                assert (r.status_code, r.text) == (200, "ok")

            async def streamed() -> AsyncIterator[bytes]:
                yield b"not replayable"

            r = await c.post("/", headers=routing("ia", port), content=streamed())
            assert r.status_code == 502

    run(main())


# --- HTTP details ----------------------------------------------------------------------------


def test_close_delimited_http10_response_is_rechunked_and_the_client_stays_connected() -> None:
    """Python's `http.server`, a likely server in a sandbox, answers HTTP/1.0 without length."""

    async def http10(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.0 200 OK\r\nContent-Type: text/plain\r\n\r\nuntil the end")
        await writer.drain()
        writer.close()

    async def main() -> None:
        async with raw_server(http10) as port, proxy({"ia": local("a")}) as p:
            client = await H11Peer.connect(p.port)
            for _ in range(2):
                head, body = await client.request("GET", "/", routing("ia", port).items())
                assert (head.status_code, body) == (200, b"until the end")
                assert (b"transfer-encoding", b"chunked") in head.headers
            client.close()

    run(main())


def test_content_length_is_dropped_when_transfer_encoding_frames_the_body() -> None:
    heads: list[bytes] = []

    async def record(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        heads.append(await read_head(reader))
        assert await reader.readuntil(b"0\r\n\r\n") == b"5\r\nhello\r\n0\r\n\r\n"
        writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")
        await writer.drain()

    async def main() -> None:
        async with raw_server(record) as port, proxy({"ia": local("a")}) as p:
            reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
            writer.write(
                f"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n"
                f"Transfer-Encoding: chunked\r\nE2b-Sandbox-Id: ia\r\n"
                f"E2b-Sandbox-Port: {port}\r\n\r\n5\r\nhello\r\n0\r\n\r\n".encode()
            )
            assert (await read_head(reader)).startswith(b"HTTP/1.1 204 ")
            assert b"transfer-encoding: chunked" in heads[0].lower()
            assert b"content-length" not in heads[0].lower()
            writer.close()

    run(main())


def test_expect_100_continue_is_relayed() -> None:
    async def main() -> None:
        async with uvicorn_app(whoami_app("a")) as port, proxy({"ia": local("a")}) as p:
            client = await H11Peer.connect(p.port)
            headers = [
                ("Host", "x"),
                ("Content-Length", "4"),
                ("Expect", "100-continue"),
                *routing("ia", port).items(),
            ]
            await client.send(h11.Request(method="POST", target="/", headers=headers))
            event = await client.next_event()  # before any body was sent
            assert isinstance(event, h11.InformationalResponse) and event.status_code == 100
            await client.send(h11.Data(data=b"body"), h11.EndOfMessage())
            head, body = await client.response()
            assert head.status_code == 200 and json.loads(body)["size"] == 4
            client.close()

    run(main())


def test_head_request_gets_headers_only() -> None:
    async def main() -> None:
        async with uvicorn_app(whoami_app("a")) as port, proxy({"ia": local("a")}) as p:
            client = await H11Peer.connect(p.port)
            head, body = await client.request("HEAD", "/", routing("ia", port).items())
            assert head.status_code == 200 and body == b""
            head, body = await client.request("GET", "/", routing("ia", port).items())
            assert head.status_code == 200 and json.loads(body)["name"] == "a"
            client.close()

    run(main())


def test_response_may_end_before_the_request_body() -> None:
    """The sandbox answers at once and reads the body later; the proxy still forwards it all."""
    bodies: list[bytes] = []

    async def answers_first(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = H11Peer(reader, writer, h11.SERVER)
        while isinstance(await peer.next_event(), h11.Request):
            await peer.send(
                h11.Response(status_code=200, headers=[("Content-Length", "5")]),
                h11.Data(data=b"early"),
                h11.EndOfMessage(),
            )
            body = b""
            while type(event := await peer.next_event()) is h11.Data:
                body += event.data
            bodies.append(body)
            peer.conn.start_next_cycle()

    async def main() -> None:
        async with raw_server(answers_first) as port, proxy({"ia": local("a")}) as p:
            client = await H11Peer.connect(p.port)
            headers = [
                ("Host", "x"),
                ("Transfer-Encoding", "chunked"),
                *routing("ia", port).items(),
            ]
            await client.send(h11.Request(method="POST", target="/", headers=headers))
            await client.send(h11.Data(data=b"part1"))
            head, body = await client.response()
            assert (head.status_code, body) == (200, b"early")
            await client.send(h11.Data(data=b"part2"), h11.EndOfMessage())
            head, body = await client.request("POST", "/", routing("ia", port).items(), b"next")
            assert (head.status_code, body) == (200, b"early")
            assert bodies == [b"part1part2", b"next"]
            client.close()

    run(main())


def test_idle_upstream_connections_expire() -> None:
    closed = asyncio.Event()

    async def keeps_alive(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await writer.drain()
        await reader.read()
        closed.set()

    async def main() -> None:
        limits = ProxyLimits(pool_max_idle_age=0.1)
        async with raw_server(keeps_alive) as port, proxy({"ia": local("a")}, limits=limits) as p:
            async with httpx.AsyncClient() as c:
                r = await c.get(f"http://127.0.0.1:{p.port}/", headers=routing("ia", port))
                assert r.text == "ok"
            await asyncio.wait_for(closed.wait(), HANG)

    run(main())


def test_stop_closes_client_and_sandbox_connections() -> None:
    closed = asyncio.Event()

    async def stream(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nhi\r\n")
        await reader.read()
        closed.set()

    async def main() -> None:
        async with raw_server(stream) as port:
            async with proxy({"ia": local("a")}) as p:
                reader, writer = await asyncio.open_connection("127.0.0.1", p.port)
                writer.write(
                    f"GET / HTTP/1.1\r\nHost: x\r\nE2b-Sandbox-Id: ia\r\n"
                    f"E2b-Sandbox-Port: {port}\r\n\r\n".encode()
                )
                assert b"hi" in await reader.read(65536)
            assert await asyncio.wait_for(reader.read(), HANG) == b""
            await asyncio.wait_for(closed.wait(), HANG)
            writer.close()

    run(main())


def test_connect_timeout_is_502() -> None:
    async def main() -> None:
        # A full accept queue: Linux drops further SYNs, so connecting hangs like a blackhole.
        with socket.socket() as listener:
            listener.bind(("127.0.0.1", 0))
            listener.listen(0)
            port = listener.getsockname()[1]
            _, filler = await asyncio.open_connection("127.0.0.1", port)
            limits = ProxyLimits(connect_timeout=0.3)
            async with proxy({"ia": local("a")}, limits=limits) as p, httpx.AsyncClient() as c:
                r = await c.get(f"http://127.0.0.1:{p.port}/", headers=routing("ia", port))
                assert r.status_code == 502
                assert "did not accept a connection in 0.3 s" in r.json()["message"]
            filler.close()

    run(main())


@pytest.mark.parametrize("delay", [0, 0.05])
def test_bytes_sent_between_exchanges_make_a_connection_unusable(delay: float) -> None:
    """Reusing it would hand the unrequested bytes to the next request as its response."""

    async def chatty(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await read_head(reader)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        if delay:
            await writer.drain()
            await asyncio.sleep(delay)
        writer.write(b"HTTP/1.1 408 Request Timeout\r\nContent-Length: 0\r\n\r\n")
        await reader.read()

    async def main() -> None:
        async with (
            raw_server(chatty) as port,
            proxy({"ia": local("a")}) as p,
            httpx.AsyncClient(base_url=f"http://127.0.0.1:{p.port}") as c,
        ):
            for _ in range(3):
                r = await c.get("/", headers=routing("ia", port))
                assert (r.status_code, r.text) == (200, "ok")
                await asyncio.sleep(delay * 2)

    run(main())

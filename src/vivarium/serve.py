"""`vivarium serve`: the embedded default, api + node in one process; with `--role`, one part
of a cluster (docs/operations.md, *Several hosts*).

One asyncio loop runs the node and both listeners; SIGINT/SIGTERM stop the listeners, then the
node (running sandboxes are left running and adopted by the next start).
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
import socket
import stat
from collections.abc import Awaitable, Callable
from contextlib import AsyncExitStack, nullcontext
from pathlib import Path
from typing import Any

import uvicorn

from vivarium.api.app import create_app as create_api_app
from vivarium.api.control import ControlPlane
from vivarium.api.db.engine import migrate, open_engine, startup_lock
from vivarium.api.events import EventLog
from vivarium.cluster import moves
from vivarium.cluster.directory import Directory
from vivarium.cluster.failover import NodeWatch
from vivarium.cluster.proxy_routes import ClusterRoutes
from vivarium.cluster.router import Router
from vivarium.cluster.router import create_app as create_router_app
from vivarium.cluster.secret import RequireSecret
from vivarium.config import Settings
from vivarium.errors import HostNotReady
from vivarium.node.node import Node
from vivarium.node.server import create_app as create_node_app
from vivarium.proc import raise_priority
from vivarium.proxy import Refusal, SandboxProxy, Upstream
from vivarium.tls import ReloadingContext

log = logging.getLogger("vivarium")
KEEP_ALIVE_S = 75  # idle keep-alive connections of the API and node socket (see _listen)


class _Server(uvicorn.Server):
    # We install one signal handler for all listeners instead of uvicorn's per-server ones.
    def capture_signals(self) -> Any:
        return nullcontext()


def bind_private_socket(path: Path) -> socket.socket:
    """The node's socket, root's alone from the moment it exists: whoever can connect to it can
    create and drive any sandbox, with no key. Bound here (uvicorn would make it 0666)."""
    path.unlink(missing_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(str(path))
        # Until this chmod the state directory's own mode (statedir.py) keeps others out; the
        # umask is not used for that, since it is the whole process's and threads make files.
        os.chmod(path, 0o600)
    except BaseException:
        sock.close()
        raise
    mode = stat.S_IMODE(path.stat().st_mode)
    if mode != 0o600:
        sock.close()
        raise HostNotReady(f"the node socket {path} has mode {mode:04o}, not 0600",
                           "put the state directory on a local file system")  # fmt: skip
    sock.listen(2048)
    return sock


def _announce_key(key: str | None, settings: Settings) -> None:
    if key is not None:
        print(
            "\nFirst start: created team 'default' and its API key (shown once; also saved in"
            f" {settings.admin_key_file}, readable by root only):\n\n    {key}\n\n"
            f"    export E2B_API_KEY={key}\n"
            f"    export E2B_API_URL={settings.scheme}://{settings.api_host}:{settings.api_port}\n"
            f"    export E2B_SANDBOX_URL={settings.scheme}://{settings.proxy_host}:"
            f"{settings.proxy_port}\n",
            flush=True,
        )


async def serve(settings: Settings) -> None:
    raise_priority()  # the API answers promptly even while the host is busy starting sandboxes
    # A certificate that does not load stops the start before anything is made.
    tls = None
    if settings.tls_cert and settings.tls_key:
        tls = ReloadingContext(settings.tls_cert, settings.tls_key)
    if settings.role == "api":
        await _serve_cluster_api(settings, tls)
    elif settings.role == "proxy":
        await _serve_cluster_proxy(settings, tls)
    else:
        await _serve_node(settings, tls)
    log.info("stopped")


async def _serve_cluster_api(settings: Settings, tls: ReloadingContext | None) -> None:
    """An API replica of a cluster: placement and routing over the catalog (cluster/router)."""
    engine = open_engine(settings.db_url)
    try:
        async with startup_lock(engine):
            await migrate(engine)
        directory = Directory(engine)
        router = Router(directory, settings.cluster_secret, settings.cluster_client_tls())
        events = EventLog(engine, settings.webhook_url, settings.webhook_secret)
        events.start()
        watch = NodeWatch(directory, events)
        watch.start()
        try:
            config = uvicorn.Config(create_router_app(router), host=settings.api_host,
                                    port=settings.api_port, log_level="warning",
                                    lifespan="off", timeout_keep_alive=KEEP_ALIVE_S)  # fmt: skip
            where = f"api {settings.scheme}://{settings.api_host}:{settings.api_port}"
            await _until_signalled([_Server(_with_tls(config, tls))], tls, where)
        finally:
            await watch.stop()
            await events.stop()
            await router.close()
    finally:
        await engine.dispose()


async def _serve_cluster_proxy(settings: Settings, tls: ReloadingContext | None) -> None:
    """The sandbox proxy of a cluster: each request on to its sandbox's node's proxy."""
    engine = open_engine(settings.db_url)
    routes = ClusterRoutes(Directory(engine))
    proxy = SandboxProxy(routes, domain=settings.sandbox_domain,
                         upstream_tls=settings.cluster_client_tls())  # fmt: skip
    listening = asyncio.create_task(moves.listen(engine, routes.forget, routes.forget_all))
    try:
        await proxy.start(settings.proxy_host, settings.proxy_port,
                          ssl=tls.context if tls else None)  # fmt: skip
        try:
            await _until_signalled([], tls, f"sandbox proxy {settings.scheme}://"
                                   f"{settings.proxy_host}:{settings.proxy_port}")  # fmt: skip
        finally:
            await proxy.stop()
    finally:
        listening.cancel()
        await asyncio.gather(listening, return_exceptions=True)
        await engine.dispose()


async def _serve_node(settings: Settings, tls: ReloadingContext | None) -> None:
    """The all-in-one server, or a cluster's node agent (the same parts; its API answers only
    requests with the cluster secret)."""
    # Each part is stopped, in reverse order, however far the start got.
    async with AsyncExitStack() as running:
        node = Node(settings)
        await node.start()
        running.push_async_callback(node.stop)
        control = ControlPlane(settings, node)
        first_key = await control.start()
        running.push_async_callback(control.stop)
        _announce_key(first_key, settings)

        async def paused_elsewhere(sandbox_id: str) -> Refusal | None:
            state = await control.catalog_state(sandbox_id)
            if state == "paused":
                return Refusal.paused(sandbox_id)
            if state in ("starting", "pausing"):  # being woken here: wait for it
                return Refusal.transitioning(sandbox_id)
            return None

        def upstream(sandbox_id: str) -> Upstream | Refusal | None | Awaitable[Refusal | None]:
            record = node.sandboxes.get(sandbox_id)
            if record is None:
                if node.snapshots.held(sandbox_id):
                    return Refusal.paused(sandbox_id)
                # A cluster's node: the proxy sends it a lost node's paused sandbox to wake.
                return paused_elsewhere(sandbox_id) if settings.role == "node" else None
            if record.state != "running":  # pausing: no new connections
                return Refusal.transitioning(sandbox_id)
            # Slot addresses are reused: the start time tells this instance from an earlier one.
            return Upstream(
                record.slot_address, f"{sandbox_id}:{record.started_at}", record.traffic_token
            )

        # Everything loaded so far lives as long as the server: keep it out of the collector's
        # full passes, which otherwise grow with it and pause the event loop.
        gc.freeze()

        def signer(made_with: Callable[[str], bool]) -> str | None:
            for record in list(node.sandboxes.values()):
                if record.access_token and made_with(record.access_token):
                    return record.sandbox_id
            return None

        def touch(sandbox_id: str) -> None:
            if (record := node.sandboxes.get(sandbox_id)) is not None:
                node.idle_timers.busy(record.container_id)  # before the request reaches it

        proxy = SandboxProxy(upstream, domain=settings.sandbox_domain, wake=control.wake,
                             signer=signer, touch=touch)  # fmt: skip
        node.on_destroyed.append(proxy.forget)
        await proxy.start(settings.proxy_host, settings.proxy_port,
                          ssl=tls.context if tls else None)  # fmt: skip
        running.push_async_callback(proxy.stop)
        socket_path = settings.node_socket
        running.callback(socket_path.unlink, missing_ok=True)
        node_socket = running.enter_context(bind_private_socket(socket_path))
        await _listen(settings, node, control, node_socket, tls)


async def _listen(
    settings: Settings, node: Node, control: ControlPlane, node_socket: socket.socket,
    tls: ReloadingContext | None,
) -> None:  # fmt: skip
    """Serve the node socket and the API until SIGINT or SIGTERM."""
    api_app: Any = create_api_app(control)
    forwarded_from = None  # uvicorn's default: loopback's X-Forwarded-* only
    if settings.role == "node":
        api_app = RequireSecret(api_app, settings.cluster_secret)
        # Links it answers with (upload URLs) point where the client called the API replica;
        # only requests with the secret, so from a replica, get past RequireSecret anyway.
        forwarded_from = "*"
    # Keep-alive: longer than clients keep an idle connection (httpx: 5 s, uvicorn's own
    # default too), so that the client closes it first. With both at 5 s, a request sent as
    # the server closed the connection failed on a loaded host ("cannot reach the server").
    api_config = uvicorn.Config(
        api_app, host=settings.api_host, port=settings.api_port,
        log_level="warning", lifespan="off", timeout_keep_alive=KEEP_ALIVE_S,
        forwarded_allow_ips=forwarded_from,
    )  # fmt: skip
    servers = [
        _Server(uvicorn.Config(create_node_app(node), fd=node_socket.fileno(),
                               log_level="warning", lifespan="off",
                               timeout_keep_alive=KEEP_ALIVE_S)),
        _Server(_with_tls(api_config, tls)),
    ]  # fmt: skip
    api = f"{settings.scheme}://{settings.api_host}:{settings.api_port}"
    role = f"node {settings.node_id}: " if settings.role == "node" else ""
    await _until_signalled(
        servers, tls,
        f"{role}api {api}, sandbox proxy {settings.scheme}://{settings.proxy_host}:"
        f"{settings.proxy_port}, node socket {settings.node_socket}, dashboard {api}/dashboard/",
    )  # fmt: skip


def _with_tls(config: uvicorn.Config, tls: ReloadingContext | None) -> uvicorn.Config:
    if tls:
        config.load()
        config.ssl = tls.context  # ours, so that a renewed certificate reaches it
    return config


async def _until_signalled(servers: list[_Server], tls: ReloadingContext | None,
                           listening: str) -> None:  # fmt: skip
    """Run `servers` until SIGINT or SIGTERM (with none, just wait for one)."""
    loop = asyncio.get_running_loop()
    stopped = asyncio.Event()
    watch = asyncio.create_task(tls.watch()) if tls else None

    def stop() -> None:
        log.info("stopping")
        stopped.set()
        for server in servers:
            server.should_exit = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop)
    try:
        tasks = [asyncio.create_task(s.serve()) for s in servers]
        while not all(s.started for s in servers):
            if any(t.done() for t in tasks):
                break
            await asyncio.sleep(0.05)
        if all(s.started for s in servers):
            log.info("vivarium ready: %s", listening)
        if tasks:
            await asyncio.gather(*tasks)
        else:
            await stopped.wait()
    finally:
        if watch is not None:
            watch.cancel()

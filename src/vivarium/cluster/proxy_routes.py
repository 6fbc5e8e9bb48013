"""The cluster's sandbox proxy (`vivarium serve --role proxy`): a request for a sandbox goes
on, untouched, to the sandbox proxy of the node the catalog says runs it, which routes it again
by the same headers and checks its tokens, resumes it if it is paused with auto-resume, and
answers in E2B's shapes as the all-in-one proxy does.

Where a sandbox runs is cached briefly: it changes only when a paused sandbox resumes on another
node, and a node that does not answer makes the next request look again."""

from __future__ import annotations

import time
from urllib.parse import urlparse

from vivarium.cluster.directory import Directory
from vivarium.proxy import Upstream

CACHE_TTL_S = 2.0
CACHE_MAX = 100_000


class ClusterRoutes:
    def __init__(self, directory: Directory) -> None:
        self.directory = directory
        self._homes: dict[str, tuple[float, str | None]] = {}  # sandbox -> (when, node id)

    async def __call__(self, sandbox_id: str) -> Upstream | None:
        node_id = await self._home(sandbox_id)
        node = await self.directory.node(node_id) if node_id else None
        if node is None or not node["proxy_address"]:
            return None
        address = urlparse(node["proxy_address"])
        assert address.hostname is not None and address.port is not None
        return Upstream(address.hostname, f"node:{node['id']}", port=address.port)

    def forget(self, sandbox_id: str) -> None:
        self._homes.pop(sandbox_id, None)

    async def _home(self, sandbox_id: str) -> str | None:
        now = time.monotonic()
        cached = self._homes.get(sandbox_id)
        if cached is not None and now - cached[0] < CACHE_TTL_S:
            return cached[1]
        node_id = await self.directory.owner("sandbox", sandbox_id)
        if len(self._homes) >= CACHE_MAX:
            self._homes.clear()
        self._homes[sandbox_id] = (now, node_id)
        return node_id

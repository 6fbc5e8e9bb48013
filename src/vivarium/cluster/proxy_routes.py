"""The cluster's sandbox proxy (`vivarium serve --role proxy`): a request for a sandbox goes
on, untouched, to the sandbox proxy of the node the catalog says runs it, which routes it again
by the same headers and checks its tokens, resumes it if it is paused with auto-resume, and
answers in E2B's shapes as the all-in-one proxy does.

Where a sandbox runs is cached briefly: it changes only when a paused sandbox resumes on another
node, which that node announces (cluster/moves.py): the entry is dropped then."""

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
        # sandbox -> (when looked up, (its node, its state) or None)
        self._homes: dict[str, tuple[float, tuple[str, str] | None]] = {}

    async def __call__(self, sandbox_id: str) -> Upstream | None:
        home = await self._home(sandbox_id)
        if home is None:
            return None
        node_id, state = home
        node = await self.directory.node(node_id)
        if node is not None and await self.directory.status(node_id) == "unhealthy":
            # Its node is lost: a running one has ended with it; a paused one goes to the
            # stand-in node, whose proxy resumes it there if it was made to be (auto-resume).
            node = await self.directory.stand_in(sandbox_id) if state == "paused" else None
        if node is None or not node["proxy_address"]:
            return None
        address = urlparse(node["proxy_address"])
        assert address.hostname is not None and address.port is not None
        return Upstream(address.hostname, f"node:{node['id']}", port=address.port,
                        tls=address.scheme == "https")  # fmt: skip

    def forget(self, sandbox_id: str) -> None:
        """It moved (cluster/moves.py)."""
        self._homes.pop(sandbox_id, None)

    def forget_all(self) -> None:
        self._homes.clear()

    async def _home(self, sandbox_id: str) -> tuple[str, str] | None:
        now = time.monotonic()
        cached = self._homes.get(sandbox_id)
        if cached is not None and now - cached[0] < CACHE_TTL_S:
            return cached[1]
        home = await self.directory.sandbox_home(sandbox_id)
        if len(self._homes) >= CACHE_MAX:
            self._homes.clear()
        self._homes[sandbox_id] = (now, home)
        return home

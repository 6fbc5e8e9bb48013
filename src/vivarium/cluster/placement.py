"""Which node a new sandbox goes to, as E2B's API places them: sample a few ready nodes, score
each by what it runs and what is starting on it, try the best first and the others after it
when one refuses. Scores read the catalog's sandbox rows, so every API replica sees the
others' placements as soon as a node has reserved them; the starts this replica has sent and
the node not yet reserved count too. A node admits a sandbox only within its own limits, so
replicas placing at once never overcommit one: the loser is refused and tries the next."""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

from vivarium.api.store import Row
from vivarium.cluster.directory import Directory, Load

SAMPLE = 3
# A start in flight weighs more than a running sandbox: restores are what a node is slow at.
STARTING_WEIGHT = 0.5


def score(node: Row, load: Load, in_flight: int) -> float:
    """Lower is better: the share of its CPUs and memory allocated, plus starts under way."""
    cpus = max(1, int(node["cpu_count"]))
    memory_mb = max(1, int(node["memory_mb"]))
    starting = load.starting + in_flight
    return load.cpus / cpus + load.memory_mb / memory_mb + STARTING_WEIGHT * starting


class Placement:
    def __init__(self, directory: Directory) -> None:
        self.directory = directory
        self._in_flight: Counter[str] = Counter()

    async def candidates(self, only: set[str] | None = None) -> list[Row]:
        """Ready nodes to try in turn (among `only`, when the request is bound to some): a
        sample of SAMPLE best first, then the rest, best first."""
        ready = [n for n in await self.directory.ready() if only is None or n["id"] in only]
        loads = await self.directory.loads()

        def key(node: Row) -> float:
            return score(node, loads.get(node["id"], Load()), self._in_flight[node["id"]])

        room = [n for n in ready
                if loads.get(n["id"], Load()).sandboxes + self._in_flight[n["id"]]
                < int(n["max_sandboxes"])]  # fmt: skip
        full = [n for n in ready if n not in room]  # perhaps freed since: asked last
        sample = random.sample(room, min(SAMPLE, len(room)))
        rest = [n for n in room if n not in sample]
        return sorted(sample, key=key) + sorted(rest, key=key) + full

    @contextmanager
    def starting(self, node_id: str) -> Iterator[None]:
        """A start sent to `node_id` and not answered yet."""
        self._in_flight[node_id] += 1
        try:
            yield
        finally:
            self._in_flight[node_id] -= 1
            if not self._in_flight[node_id]:
                del self._in_flight[node_id]

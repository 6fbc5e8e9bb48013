"""The warm pool: sandboxes restored ahead of time, per template, so that a create only gives
one its identity (envd's /init: id, token, env vars) instead of waiting for `runsc restore`.

- A warm sandbox is a launched container (launched.py) with a network slot and a disk, but no
  id, team, token or record: no API lists it, the proxy cannot route to it, and a restart
  removes it like any container without a record (reconcile.py). Its egress stays closed
  until a create that wants it opens it, side by side with /init: a connection a template's
  program opened while it waited would otherwise outlive the closing for a create without.
- Before it waits, a warm sandbox trusts the egress CA (an /init of no sandbox): installing it
  rewrites certificate bundles, which made most of a claim's /init.
- A create takes one; a taken sandbox is never given back. Its identity is made by the same
  /init as a cold start's (a new machine id, see guest/envd/identity.py), and the kernel's
  randomness and clock are the host's, read afresh, so nothing of one claim reaches another.
- Users first: refills run one restore at a time, and begin only while no create or resume is
  starting. They take none of the node's `max_starting` permits, so a create never waits behind
  one (it shares the CPUs with at most one refill).
- The pool counts against the node's capacity, never a team's, and stays `max_starting` below
  it; when a create finds the node full, the pool gives up sandboxes first.
- Waiting ones have coarse timers (idle_timers.py); the one a create takes gets precise ones.
- Only the current build is handed out: entries of a rebuilt or deleted template are removed,
  and one whose sandbox process is gone is replaced. One that does not answer its /init in
  time is removed by the create, which then restores one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from vivarium.errors import RuntimeFailure, VivariumError
from vivarium.guest.envd import PORT as ENVD_PORT
from vivarium.network.egress import CLOSED
from vivarium.node.envd_init import INIT_TIMEOUT_S, until_answered
from vivarium.node.launched import Launched
from vivarium.node.records import new_container_id
from vivarium.node.steps import Steps
from vivarium.runtime import cgroups, disk
from vivarium.templates.store import Template

if TYPE_CHECKING:
    from vivarium.node.node import Node

log = logging.getLogger(__name__)

CONTAINER_PREFIX = "warm"
RETRY_S = 30.0  # after a template failed to warm up: not a loop of failing restores
CHECK_S = 5.0  # how often a full pool looks for rebuilt templates


@dataclass
class Warm:
    started: Launched
    template: str
    build_id: str
    pid: int  # runsc's sandbox process: gone (or a zombie) once the sandbox stopped


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2 :].split()[0] not in ("Z", "X")


class WarmPool:
    def __init__(self, node: Node, sizes: dict[str, int]) -> None:
        self.node = node
        self.sizes = {name: n for name, n in sizes.items() if n > 0}
        self._entries: dict[str, list[Warm]] = {name: [] for name in self.sizes}
        self._failed_at: dict[str, float] = {}
        self._filling = 0  # restores of ours under way (counted against capacity too)
        self._filled = asyncio.Event()  # set while no restore of ours is under way
        self._filled.set()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self.refills = 0  # warm sandboxes made since the start
        self.claims = 0  # creates that took one
        self.dead = 0  # found stopped while waiting, and replaced

    def __len__(self) -> int:
        return sum(len(e) for e in self._entries.values()) + self._filling

    @property
    def filling(self) -> bool:
        return self._filling > 0

    async def until_filled(self) -> None:
        """Until the restore under way (if any) has ended, its sandbox in the pool or gone."""
        await self._filled.wait()

    def ready(self) -> dict[str, int]:
        """Warm sandboxes waiting, by template."""
        return {name: len(entries) for name, entries in self._entries.items()}

    def info(self) -> dict[str, object]:
        return {
            "ready": self.ready(),
            "filling": self._filling, "refills": self.refills, "claims": self.claims,
            "dead": self.dead,
            "containers": sorted(w.started.container_id for e in self._entries.values() for w in e),
            "builds": {name: sorted({w.build_id for w in e}) for name, e in self._entries.items()},
        }  # fmt: skip

    def start(self) -> None:
        if self.sizes:
            self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        """Remove every warm sandbox: unlike users' sandboxes, nothing needs them after us."""
        if self._task:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        entries = [w for name in self._entries for w in self._entries[name]]
        for name in self._entries:
            self._entries[name] = []
        await asyncio.gather(*(self.node.discard(w.started) for w in entries),
                             return_exceptions=True)  # fmt: skip

    def take(self, template: Template) -> Launched | None:
        """A warm sandbox of the template's current build, or None (the caller restores)."""
        entries = self._entries.get(template.name)
        found = None
        while entries and found is None:
            warm = entries.pop()
            if warm.build_id != template.build_id:
                self.node.discard_soon(warm.started)
            elif not _alive(warm.pid):
                self._replace(warm)
            else:
                found = warm.started
        if found is not None:
            self.claims += 1
            self.node.idle_timers.busy(found.container_id)
        self._wake.set()
        return found

    def shrink(self, count: int) -> int:
        """Give up to `count` warm sandboxes back to the node (it is full); how many went."""
        gone = 0
        for entries in sorted(self._entries.values(), key=len, reverse=True):
            while entries and gone < count:
                self.node.discard_soon(entries.pop(0).started)  # the oldest first
                gone += 1
        return gone

    def prune(self, running: set[str]) -> None:
        """Remove warm sandboxes whose container stopped (the reaper's liveness round). `runsc
        list` may miss a container, or predate an entry: its process must be gone too."""
        for entries in self._entries.values():
            gone = [w for w in entries if w.started.container_id not in running]
            for warm in [w for w in gone if not _alive(w.pid)]:
                entries.remove(warm)
                self._replace(warm)

    def claim_failed(self) -> None:
        """A taken one did not answer its /init: the create removed it and restores instead."""
        self.dead += 1

    def _replace(self, warm: Warm) -> None:
        log.warning("a warm sandbox of %r stopped while waiting; replacing it", warm.template)
        self.dead += 1
        self.node.discard_soon(warm.started)
        self._wake.set()

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), CHECK_S)
            self._wake.clear()
            try:
                await self._refill()
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("warm pool refill failed")

    async def _refill(self) -> None:
        node = self.node
        while True:
            if node.starting_for_users():
                await asyncio.sleep(0.05)  # users first: look again when they are done
                continue
            template = await self._wanted()
            if template is None:
                return
            try:
                await self._warm_one(template)
            except Exception as exc:
                self._failed_at[template.name] = time.monotonic()
                log.warning("could not warm a sandbox of %r (%s); trying again in %.0f s",
                            template.name, exc, RETRY_S)  # fmt: skip

    async def _wanted(self) -> Template | None:
        """The template most short of its pool size, if the node has room for one more."""
        node = self.node
        if node.occupied() + 1 > node.settings.max_sandboxes - node.settings.max_starting:
            return None
        short: list[tuple[int, Template]] = []
        for name, size in self.sizes.items():
            if time.monotonic() - self._failed_at.get(name, -RETRY_S) < RETRY_S:
                continue
            entries = self._entries[name]
            try:
                template = await asyncio.to_thread(node.templates.get, name)
            except VivariumError:  # not built (yet), or deleted: nothing to keep warm
                while entries:
                    node.discard_soon(entries.pop().started)
                continue
            for warm in [w for w in entries if w.build_id != template.build_id]:
                entries.remove(warm)  # rebuilt: the old build is not handed out
                node.discard_soon(warm.started)
            if len(entries) < size and node.built_here(template):
                short.append((len(entries) - size, template))
        return min(short, key=lambda item: item[0])[1] if short else None

    async def _warm_one(self, template: Template) -> None:
        node = self.node
        steps = Steps(f"warm sandbox of {template.name!r}")
        self._filling += 1
        self._filled.clear()
        try:
            started = await node.launch(
                new_container_id(CONTAINER_PREFIX), template.spec, template.checkpoint,
                node.default_resources(template), steps, egress=CLOSED,
            )  # fmt: skip
            try:
                await asyncio.to_thread(disk.hold_back, started.directory)
                started.held_back = True
                # An /init of no sandbox: envd answers, and trusts the egress CA already (which
                # rewrites certificate bundles: most of a claim's /init otherwise).
                url = f"http://{started.slot.router_ip}:{ENVD_PORT}/init"
                body = {"caBundle": node.egress_ca.cert_pem}
                failure = await until_answered(lambda: node.http.post(url, json=body, timeout=2),
                                               INIT_TIMEOUT_S, 0.02)  # fmt: skip
                if failure is not None:
                    raise RuntimeFailure(f"envd did not answer ({failure})")
                cgroups.settle_cpu(started.container_id)  # waiting: no more than the others
                state = await node.rt().state(started.container_id)
                if state is None or state.status != "running":
                    raise RuntimeFailure("its container stopped")
            except BaseException:
                await node.discard(started)
                raise
        finally:
            self._filling -= 1
            if not self._filling:
                self._filled.set()
        steps.report("done")
        self._entries[template.name].append(Warm(started, template.name, template.build_id,
                                                 state.pid))  # fmt: skip
        node.idle_timers.idle(started.container_id)
        self.refills += 1

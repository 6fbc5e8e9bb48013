"""A pool of ready network slots: created ahead of time, handed out, cleaned and reused.

Layout of slot N (see docs/architecture.md):

    root ns                 router ns {p}-rt-N                  sandbox ns {p}-sb-N (runsc)
    {p}h-N host_ip/30 <-> up0 router_ip/30
                            gw0 169.254.0.22/30  <---------->   eth0 169.254.0.21/30
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import logging

from vivarium.errors import CapacityExhausted, ConfigError
from vivarium.network import firewall
from vivarium.network.addressing import (
    GATEWAY_IF,
    GATEWAY_IP,
    INNER_PREFIX,
    SANDBOX_IF,
    SANDBOX_IP,
    UPLINK_IF,
    Slot,
    SlotRange,
)
from vivarium.network.egress import CLOSED
from vivarium.proc import run

log = logging.getLogger(__name__)


async def _ip_batch(netns: str | None, *commands: str) -> None:
    """Several `ip` commands (in `netns`) from one process: a spawn costs milliseconds on an
    idle host and seconds on one whose CPUs are taken, and a slot needs about twenty."""
    where = ["-n", netns] if netns else []
    await run(["ip", *where, "-batch", "-"], stdin="\n".join(commands).encode() + b"\n")


async def _sysctl(netns: str, *settings: str) -> None:
    await run(["nsenter", f"--net=/var/run/netns/{netns}", "sysctl", "-qw", *settings])


async def create_slot(slot: Slot) -> None:
    """Build both namespaces and the veth pairs; idempotent only via destroy_slot first."""
    sb, rt, host_if = slot.sandbox_ns, slot.router_ns, slot.host_if
    await _ip_batch(
        None,
        f"netns add {rt}",
        f"netns add {sb}",
        f"link add {host_if} type veth peer name {UPLINK_IF} netns {rt}",
        f"addr add {slot.host_ip}/30 dev {host_if}",
        f"link set {host_if} up",
    )
    await _ip_batch(
        rt,
        f"addr add {slot.router_ip}/30 dev {UPLINK_IF}",
        f"link set {UPLINK_IF} up",
        "link set lo up",
        f"link add {GATEWAY_IF} type veth peer name {SANDBOX_IF} netns {sb}",
        f"addr add {GATEWAY_IP}/{INNER_PREFIX} dev {GATEWAY_IF}",
        f"link set {GATEWAY_IF} up",
        f"route add default via {slot.host_ip} dev {UPLINK_IF}",
    )
    await _sysctl(rt, "net.ipv4.ip_forward=1", "net.ipv6.conf.all.disable_ipv6=1")
    await _sysctl(sb, "net.ipv6.conf.all.disable_ipv6=1")
    await reset_sandbox_side(slot)
    await firewall.apply_router_rules(slot, CLOSED)


async def reset_sandbox_side(slot: Slot) -> None:
    """(Re)apply what runsc copies into its netstack at start: eth0's address and default route."""
    await _ip_batch(
        slot.sandbox_ns,
        "link set lo up",
        f"addr replace {SANDBOX_IP}/{INNER_PREFIX} dev {SANDBOX_IF}",
        f"link set {SANDBOX_IF} up",
        f"route replace default via {GATEWAY_IP} dev {SANDBOX_IF}",
    )


async def destroy_slot(prefix: str, index: int) -> None:
    """Remove everything slot `index` may have left, whatever state it is in."""
    await run(["ip", "netns", "del", f"{prefix}-sb-{index}"], check=False)
    await run(["ip", "netns", "del", f"{prefix}-rt-{index}"], check=False)
    await run(["ip", "link", "del", f"{prefix}h-{index}"], check=False)


class SlotPool:
    def __init__(
        self, prefix: str, cidr: str, egress_allow: tuple[str, ...], prewarm: int, limit: int
    ) -> None:
        self.range = SlotRange(prefix, cidr)
        self.firewall = firewall.HostFirewall(prefix, cidr, egress_allow)
        self.prewarm = prewarm
        # The last slot of the range is reserved for template builds.
        self.limit = min(limit, self.range.capacity - 1)
        self._free: list[Slot] = []
        self._used: dict[int, Slot] = {}
        self._creating: set[int] = set()
        self._lock = asyncio.Lock()

    async def check_conflicts(self) -> None:
        """Refuse a range that overlaps routes or addresses we did not create."""
        routes = json.loads((await run(["ip", "-j", "-4", "route", "show", "table", "all"])).stdout)
        for route in routes:
            dst, dev = route.get("dst", ""), route.get("dev", "")
            if dst in ("", "default") or self.range.index_of_host_if(dev) is not None:
                continue
            if route.get("type") in ("local", "broadcast"):
                continue
            if self.range.overlaps(dst):
                raise ConfigError(
                    f"slot range {self.range.network} overlaps the host route {dst} dev {dev}",
                    "set VIVARIUM_SLOT_CIDR to an unused private range",
                )
        addrs = json.loads((await run(["ip", "-j", "-4", "addr", "show"])).stdout)
        for link in addrs:
            if self.range.index_of_host_if(link.get("ifname", "")) is not None:
                continue
            for info in link.get("addr_info", []):
                if ipaddress.IPv4Address(info["local"]) in self.range.network:
                    raise ConfigError(
                        f"slot range {self.range.network} contains {info['local']} "
                        f"on {link.get('ifname')}",
                        "set VIVARIUM_SLOT_CIDR to an unused private range",
                    )

    async def existing_indexes(self) -> set[int]:
        found: set[int] = set()
        res = await run(["ip", "-j", "netns", "list"], check=False)
        for item in json.loads(res.stdout or "[]"):
            idx = self.range.index_of_netns(item.get("name", ""))
            if idx is not None:
                found.add(idx)
        res = await run(["ip", "-j", "link", "show"], check=False)
        for item in json.loads(res.stdout or "[]"):
            idx = self.range.index_of_host_if(item.get("ifname", ""))
            if idx is not None:
                found.add(idx)
        return found

    async def start(self, in_use: set[int]) -> None:
        """Install host rules, keep slots of adopted sandboxes, destroy the rest, prewarm."""
        await self.check_conflicts()
        await self.firewall.install()
        for idx in sorted(await self.existing_indexes()):
            if idx in in_use:
                self._used[idx] = self.range.slot(idx)
            else:
                log.info("removing orphaned network slot %d", idx)
                await destroy_slot(self.range.prefix, idx)
        for idx in in_use - set(self._used):
            log.warning("sandbox slot %d had vanished; it is not re-created", idx)
        await self.fill()

    async def fill(self) -> None:
        while len(self._free) + len(self._creating) < self.prewarm:
            if not await self._grow():
                break

    async def _grow(self) -> bool:
        async with self._lock:
            taken = set(self._used) | {s.index for s in self._free} | self._creating
            if len(taken) >= self.limit:
                return False
            idx = next(i for i in range(self.range.capacity) if i not in taken)
            self._creating.add(idx)
        slot = self.range.slot(idx)
        try:
            await destroy_slot(slot.prefix, idx)
            await create_slot(slot)
        except BaseException:
            await destroy_slot(slot.prefix, idx)
            raise
        finally:
            self._creating.discard(idx)
        self._free.append(slot)
        return True

    async def acquire(self) -> Slot:
        """A free slot, egress off (as every free slot is): the caller opens it if asked."""
        while True:
            async with self._lock:
                if self._free:
                    slot = self._free.pop(0)
                    self._used[slot.index] = slot
                    break
            if not await self._grow():
                raise CapacityExhausted(
                    f"no free network slot (limit {self.limit})",
                    "kill idle sandboxes or raise VIVARIUM_MAX_SANDBOXES",
                )
        return slot

    async def release(self, slot: Slot) -> None:
        """Return a slot whose sandbox is gone: egress off, addresses restored, back in the pool.
        It stays taken until then, so that _grow cannot build the same index meanwhile."""
        try:
            await firewall.apply_router_rules(slot, CLOSED)
            await self.firewall.untunnel(slot)
            await reset_sandbox_side(slot)
        except Exception as exc:  # a broken slot is rebuilt rather than reused
            log.warning("slot %d could not be reset (%s); rebuilding it", slot.index, exc)
            await destroy_slot(slot.prefix, slot.index)
            self._used.pop(slot.index, None)
            return
        self._used.pop(slot.index, None)
        self._free.append(slot)

    async def stop(self) -> None:
        """Remove the unused slots; slots of running sandboxes stay for the next start."""
        while self._free:
            slot = self._free.pop()
            await destroy_slot(slot.prefix, slot.index)

    @property
    def has_room(self) -> bool:
        """Whether acquire() can hand out a slot now, without waiting for a release."""
        taken = len(self._used) + len(self._free) + len(self._creating)
        return bool(self._free) or taken < self.limit

    @property
    def in_use(self) -> int:
        return len(self._used)

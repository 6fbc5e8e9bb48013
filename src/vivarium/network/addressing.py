"""Where slot N lives: its names and addresses. Pure functions, no side effects.

Every sandbox sees itself at 169.254.0.21 behind a gateway at .22, so one checkpoint restores into
any slot; the slot's router namespace maps that to a unique /30 taken from the configured range.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

SANDBOX_IP = "169.254.0.21"
GATEWAY_IP = "169.254.0.22"
INNER_PREFIX = 30
# Interface names inside the slot's own namespaces: identical in every slot.
UPLINK_IF = "up0"  # router ns, towards the host
GATEWAY_IF = "gw0"  # router ns, towards the sandbox
SANDBOX_IF = "eth0"  # sandbox ns

# Never reachable from a sandbox unless listed in VIVARIUM_EGRESS_ALLOW.
BLOCKED_RANGES = (
    "0.0.0.0/8", "10.0.0.0/8", "100.64.0.0/10", "127.0.0.0/8", "169.254.0.0/16",
    "172.16.0.0/12", "192.0.0.0/24", "192.168.0.0/16", "198.18.0.0/15", "224.0.0.0/4",
    "240.0.0.0/4",
)  # fmt: skip


@dataclass(frozen=True)
class Slot:
    prefix: str
    index: int
    host_ip: str  # host side of the uplink veth (in the root namespace)
    router_ip: str  # the slot address: the host reaches sandbox port P at router_ip:P

    @property
    def sandbox_ns(self) -> str:
        return f"{self.prefix}-sb-{self.index}"

    @property
    def router_ns(self) -> str:
        return f"{self.prefix}-rt-{self.index}"

    @property
    def host_if(self) -> str:
        return f"{self.prefix}h-{self.index}"

    @property
    def netns_path(self) -> str:
        return f"/var/run/netns/{self.sandbox_ns}"

    def in_router(self, *argv: str) -> list[str]:
        """`argv` run in the slot's router namespace."""
        return ["nsenter", f"--net=/var/run/netns/{self.router_ns}", *argv]


class SlotRange:
    def __init__(self, prefix: str, cidr: str) -> None:
        self.prefix = prefix
        self.network = ipaddress.IPv4Network(cidr)

    @property
    def capacity(self) -> int:
        return self.network.num_addresses // 4

    def slot(self, index: int) -> Slot:
        if not 0 <= index < self.capacity:
            raise ValueError(f"slot {index} is outside {self.network} ({self.capacity} slots)")
        base = int(self.network.network_address) + 4 * index
        return Slot(
            prefix=self.prefix,
            index=index,
            host_ip=str(ipaddress.IPv4Address(base + 1)),
            router_ip=str(ipaddress.IPv4Address(base + 2)),
        )

    def index_of_netns(self, name: str) -> int | None:
        """The slot index a namespace name belongs to, if it is one of ours."""
        for kind in ("sb", "rt"):
            head = f"{self.prefix}-{kind}-"
            if name.startswith(head) and name[len(head) :].isdigit():
                return int(name[len(head) :])
        return None

    def index_of_host_if(self, name: str) -> int | None:
        head = f"{self.prefix}h-"
        if name.startswith(head) and name[len(head) :].isdigit():
            return int(name[len(head) :])
        return None

    def overlaps(self, cidr: str) -> bool:
        other = ipaddress.ip_network(cidr, strict=False)
        return other.version == 4 and self.network.overlaps(other)

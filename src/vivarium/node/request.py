"""What a create asks of the node, and the request that gives a resumed sandbox its identity."""

from __future__ import annotations

from dataclasses import dataclass

from vivarium.network.egress import Egress
from vivarium.node.records import SandboxRecord
from vivarium.node.volumes import VolumeMount

ON_TIMEOUT = ("kill", "pause")


@dataclass(frozen=True)
class CreateRequest:
    template: str = "base"
    build_id: str | None = None  # the build to start from (None: the current one)
    sandbox_id: str | None = None  # chosen by the control plane; else the node picks one
    access_token: str | None = None  # envd then requires it (X-Access-Token)
    on_timeout: str = "kill"
    timeout_s: int | None = None
    metadata: dict[str, str] | None = None
    env_vars: dict[str, str] | None = None
    egress: Egress = Egress()  # its egress rules (network/egress.py): open by default
    memory_mb: int | None = None
    cpus: float | None = None
    volume_mounts: tuple[VolumeMount, ...] = ()
    pause_memory: bool = True  # an auto-pause (on_timeout "pause") keeps memory, or files only
    traffic_token: str | None = None  # the proxy then demands it on every port but envd's


def resume_request(record: SandboxRecord) -> CreateRequest:
    """The create request that gives a resumed sandbox its old identity back."""
    return CreateRequest(
        template=record.template, sandbox_id=record.sandbox_id, access_token=record.access_token,
        metadata=record.metadata, env_vars=record.env_vars, egress=record.rules,
        on_timeout=record.on_timeout, volume_mounts=mounts_of(record),
        pause_memory=record.pause_memory, traffic_token=record.traffic_token,
    )  # fmt: skip


def mounts_of(record: SandboxRecord) -> tuple[VolumeMount, ...]:
    """The volumes the sandbox mounts: each of its incarnations, and every sandbox started
    from its snapshots, must mount them too (the mounts are in its memory)."""
    return tuple(VolumeMount.from_json(v) for v in record.volumes)

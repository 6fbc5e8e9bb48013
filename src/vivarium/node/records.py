"""The node's own record of each sandbox it runs, one JSON file per runsc container.

A sandbox keeps its id for life, but every incarnation (the create, then each resume) runs in a
container of its own, `<sandbox id>-<6 random hex>`: a resume never waits for the previous
container's `runsc delete`, and two incarnations never share a container id, cgroup or
directory. runsc accepts any unique prefix of a container id, so ids must never be prefixes of
each other: sandbox ids hold no `-`, and the suffixes have one length.

A record lives in `<root>/<container id>/`, is written only once the sandbox runs, and removed
only after its container and slot are gone; on start the node reconciles records with what runsc
actually runs.
"""

from __future__ import annotations

import json
import secrets
import string
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from vivarium.network.egress import Egress
from vivarium.statedir import write_private

ID_ALPHABET = string.ascii_lowercase + string.digits
ID_LENGTH = 20


SANDBOX_PREFIX = "i"  # the letter E2B's sandbox ids start with (teams' snapshots: `s`)


def new_sandbox_id() -> str:
    """E2B's id shape: 20 characters of [a-z0-9], starting with a letter."""
    return SANDBOX_PREFIX + "".join(secrets.choice(ID_ALPHABET) for _ in range(ID_LENGTH - 1))


def valid_sandbox_id(value: str) -> bool:
    return 1 <= len(value) <= 64 and all(c in ID_ALPHABET for c in value)


def new_container_id(sandbox_id: str) -> str:
    """The container id of a new incarnation of the sandbox."""
    return f"{sandbox_id}-{secrets.token_hex(3)}"


@dataclass
class SandboxRecord:
    sandbox_id: str
    template: str
    build_id: str
    slot_index: int
    slot_address: str
    started_at: float
    end_at: float
    memory_mb: int
    cpus: float
    pids: int
    allow_internet: bool
    metadata: dict[str, str] = field(default_factory=dict)
    env_vars: dict[str, str] = field(default_factory=dict)
    state: str = "running"
    on_timeout: str = "kill"
    access_token: str | None = None  # envd's X-Access-Token (records are root-only files)
    # The runsc container of this incarnation (also its cgroup and directory name). Records
    # written before incarnations had their own containers lack it: theirs is the sandbox id.
    container_id: str = ""
    disk_mb: int = 10240  # the size of its writable layer (runtime/disk.py)
    volumes: list[dict[str, str]] = field(default_factory=list)  # VolumeMount.to_json()s
    pause_memory: bool = True  # what an auto-pause keeps: memory and files, or files only
    traffic_token: str | None = None  # its ports (but envd's) need it (e2b-traffic-access-token)
    # Its egress rules (Egress.to_json()); records from before rules had `allow_internet` only.
    egress: dict[str, Any] | None = None

    @property
    def rules(self) -> Egress:
        return Egress.from_json(self.egress, self.allow_internet)

    def __post_init__(self) -> None:
        if not self.container_id:
            self.container_id = self.sandbox_id

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SandboxRecord:
        return cls(**data)


class RecordStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(mode=0o700, parents=True, exist_ok=True)

    def container_dir(self, container_id: str) -> Path:
        """Bundle, console log and record of one incarnation."""
        return self.root / container_id

    def save(self, record: SandboxRecord) -> None:
        directory = self.container_dir(record.container_id)
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        # It holds envd's access token and the env vars. Not fsync'ed (that took up to ~100 ms
        # of a create on a disk busy with restores): it describes a running container, which a
        # power loss ends anyway (the restart after one finds it gone, readable record or not).
        write_private(directory / "record.json", json.dumps(record.to_json()), durable=False)

    def drop(self, container_id: str) -> None:
        """The incarnation is no longer one to adopt at a start (stopped, or stopped by its
        checkpoint); its directory goes with its container."""
        (self.container_dir(container_id) / "record.json").unlink(missing_ok=True)

    def load_all(self) -> tuple[list[SandboxRecord], list[Path]]:
        """Readable records, and directories holding none (left by a crash mid-create)."""
        records: list[SandboxRecord] = []
        strays: list[Path] = []
        for directory in sorted(self.root.iterdir()):
            path = directory / "record.json"
            try:
                records.append(SandboxRecord.from_json(json.loads(path.read_text())))
            except (OSError, ValueError, TypeError):
                strays.append(directory)
        return records, strays

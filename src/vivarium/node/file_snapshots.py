"""Filesystem-only snapshots (E2B's `mode="filesystem"`, `pause(keep_memory=False)`,
`connect(on_resume="reboot")`): a sandbox's files without its memory. runsc keeps the writable
layer in a format of its own, so the files are read from inside: `guest/files_snapshot.py`
writes what changed since the template was made, as a tar, to the node. Starting from one
restores the template's checkpoint (fresh processes), with the snapshot bound read-only into
the volume hub (node/volumes.py), and lays the files back over it before the sandbox is handed
out.

The snapshot is an ordinary one to the snapshot store (`checkpoint/files.tar`, checksummed,
deduplicated, uploaded like any image); its manifest says `"mode": "filesystem"`.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from vivarium.errors import CannotSave, RuntimeFailure
from vivarium.guest.envd import VOLUME_HUB
from vivarium.node.records import SandboxRecord
from vivarium.templates.recipe import GUEST_PREFIX

if TYPE_CHECKING:
    from vivarium.node.node import Node

MODE = "filesystem"
TAR = "files.tar"
IN_HUB = ".files"  # volume names start with a letter or digit: no clash
SCRIPT = f"{GUEST_PREFIX}/guest/files_snapshot.py"
PYTHON = "/usr/bin/python3"
TIMEOUT_S = 900.0  # a capture or an apply of many gigabytes


def template_time(node: Node, record: SandboxRecord) -> float:
    """When the sandbox's template build was made: what changed later is the sandbox's."""
    manifest = node.templates.build(record.template, record.build_id).manifest
    return datetime.fromisoformat(str(manifest["created_at"])).timestamp()


async def capture(node: Node, record: SandboxRecord, image: Path) -> None:
    """Write the running sandbox's changed files into `image/files.tar`; it keeps running.
    CannotSave if that fails (nothing is changed)."""
    image.mkdir(parents=True, exist_ok=True)
    since = template_time(node, record)
    result = await node.rt().exec(
        record.container_id, [PYTHON, "-I", SCRIPT, "capture", repr(since)],
        timeout=TIMEOUT_S, stdout_to=image / TAR,
    )  # fmt: skip
    if not result.ok:
        raise CannotSave(
            f"the files of sandbox {record.sandbox_id} could not be saved: "
            f"{result.stderr.strip()[-500:]}",
            "it keeps running, unchanged",
        )


async def apply(node: Node, container_id: str) -> None:
    """Lay the snapshot bound into the container's hub over its files."""
    archive = f"{VOLUME_HUB}/{IN_HUB}/{TAR}"
    result = await node.rt().exec(container_id, [PYTHON, "-I", SCRIPT, "apply", archive],
                                  timeout=TIMEOUT_S)  # fmt: skip
    if not result.ok:
        raise RuntimeFailure(f"restoring the snapshot's files failed: "
                             f"{result.stderr.strip()[-500:]}")  # fmt: skip

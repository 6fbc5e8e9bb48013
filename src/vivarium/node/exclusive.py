"""One node per state directory and per slot prefix. A second node on either would take the
first one's sandboxes for leftovers at its start: it resets their network slots, clears the
ready disks and deletes containers it has no record of, so it must refuse to start instead."""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

from vivarium.errors import HostNotReady

# Slot prefixes name host-wide resources (interfaces, namespaces, firewall chains), so their
# lock lives in a host-wide directory rather than in a state directory.
SLOT_LOCK_DIR = Path("/run/vivarium")


def hold(state_dir: Path, slot_prefix: str) -> list[int]:
    """Take both locks for as long as the process lives (or until `release`)."""
    held: list[int] = []
    try:
        held.append(_lock(state_dir / "node.lock", f"state directory {state_dir}",
                          "VIVARIUM_STATE_DIR"))  # fmt: skip
        SLOT_LOCK_DIR.mkdir(mode=0o700, exist_ok=True)
        held.append(_lock(SLOT_LOCK_DIR / f"slots-{slot_prefix}.lock",
                          f"slot prefix {slot_prefix!r}", "VIVARIUM_SLOT_PREFIX"))  # fmt: skip
    except BaseException:
        release(held)
        raise
    return held


def release(held: list[int]) -> None:
    for fd in held:
        os.close(fd)
    held.clear()


def _lock(path: Path, what: str, setting: str) -> int:
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "unknown"
        os.close(fd)
        raise HostNotReady(
            f"another vivarium node (pid {holder}) is running with {what}",
            f"stop it first, or give this one its own {setting} (and ports)",
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd

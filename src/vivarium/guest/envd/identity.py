"""The sandbox's own machine identity. Every sandbox restored from one template checkpoint starts
as the same machine; the first /init with a sandbox id makes it a machine of its own: a fresh
random /etc/machine-id (read by dbus, systemd tools and libraries that tell machines apart). A
resume's /init names the same sandbox, so a paused machine keeps its identity.

Only envd inside a sandbox does this (`--identity`): envd run on a host for tests must leave that
host's files alone.
"""

from __future__ import annotations

import os
import secrets

MACHINE_ID = "/etc/machine-id"


def new_machine_id(path: str = MACHINE_ID) -> str:
    """Write a new random machine id (32 lowercase hex digits, as machine-id(5) has it)."""
    machine_id = secrets.token_hex(16)
    tmp = f"{path}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o444)
    try:
        os.write(fd, f"{machine_id}\n".encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return machine_id

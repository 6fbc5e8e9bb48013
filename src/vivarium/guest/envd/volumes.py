"""Volume mounts inside the sandbox: `VOLUME_HUB/<name>` bind-mounted at the path the create
asked for. The node puts each volume into the hub before the sandbox is restored (the hub is the
one mount every template has for them), then runs this as root with CAP_SYS_ADMIN, which no
process of the sandbox has otherwise (`runsc exec --cap`):

    python3 -I -c "<MOUNT_COMMAND>" '[{"name": ..., "path": ...}]'

It runs only in a sandbox just restored from its template's checkpoint, before anything of the
user's is in it (after a resume the mounts are part of the saved state already).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import json
import os
import sys

from . import VOLUME_HUB

MS_BIND = 4096
# What the node runs (the guest's library directory is not on an isolated Python's path).
MOUNT_COMMAND = (
    "import sys; sys.path.insert(0, '/opt/vivarium/lib'); "
    "from envd.volumes import main; main(sys.argv[1:])"
)


class VolumeMountError(Exception):
    pass


def _bind(source: str, target: str) -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    if libc.mount(source.encode(), target.encode(), None, MS_BIND, None) != 0:
        err = ctypes.get_errno()
        raise VolumeMountError(f"mounting volume at {target}: {os.strerror(err)}")


def mount_volumes(mounts: list[dict[str, str]]) -> None:
    for mount in mounts:
        name, path = mount["name"], mount["path"]
        if not name or "/" in name or name in (".", ".."):
            raise VolumeMountError(f"invalid volume name {name!r}")
        if not path.startswith("/") or path == "/":
            raise VolumeMountError(f"invalid volume mount path {path!r}")
        source = os.path.join(VOLUME_HUB, name)
        if not os.path.isdir(source):
            raise VolumeMountError(f"volume {name!r} is not in this sandbox's hub")
        if os.path.islink(path) or (os.path.exists(path) and not os.path.isdir(path)):
            raise VolumeMountError(f"{path} exists and is not a directory")
        os.makedirs(path, exist_ok=True)
        _bind(source, path)


def main(argv: list[str]) -> None:
    try:
        mount_volumes(json.loads(argv[0]))
    except (VolumeMountError, OSError, ValueError, KeyError) as exc:
        print(exc, file=sys.stderr)
        sys.exit(1)

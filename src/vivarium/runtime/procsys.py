"""The old-runsc network-namespace work-around.

runsc releases before late 2023 decide "this is the root network namespace" by the existence of
/proc/sys/net/core/rmem_default, which current kernels create in every namespace, and then refuse
`--network=sandbox`. We give runsc a private mount namespace whose /proc/sys is a copy that lacks
that one file. The copy must hold the rest (runsc reads e.g. vm/mmap_min_addr and panics without).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

HIDDEN = "net/core/rmem_default"


def make_copy(dest: Path, source: Path = Path("/proc/sys")) -> Path:
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    for dirpath, _dirnames, filenames in os.walk(source):
        rel = Path(dirpath).relative_to(source)
        (tmp / rel).mkdir(parents=True, exist_ok=True)
        for name in filenames:
            if str(rel / name) == HIDDEN:
                continue
            try:
                data = (Path(dirpath) / name).read_bytes()
            except OSError:
                continue  # write-only or permission-guarded entries
            (tmp / rel / name).write_bytes(data)
    shutil.rmtree(dest, ignore_errors=True)
    tmp.rename(dest)
    return dest


def wrap(argv: list[str], procsys_copy: Path) -> list[str]:
    """Run argv in a private mount namespace whose /proc/sys is `procsys_copy`.

    The mount stays private to that namespace, so nothing leaks onto the host when runsc exits.
    """
    script = f'mount --make-rprivate / && mount --bind {procsys_copy} /proc/sys && exec "$@"'
    return ["unshare", "-m", "sh", "-c", script, "sh", *argv]

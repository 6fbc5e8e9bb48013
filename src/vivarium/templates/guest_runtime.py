"""Our guest for templates built from OCI images, self-contained: it runs in any image (musl, no
Python, an old glibc), and leaves the image's own Python alone.

Staged on the host once per guest code and base build, then copied into the image by the
build's first boot (custom.py). `/opt/vivarium` holds our guest code and its vendored packages,
`vivarium-spawn` (static), and `runtime/`: the `base` template's CPython 3.11 with its standard
library, every shared library it and its extension modules load, and glibc's loader. The
interpreter's ELF interpreter and RPATH point into `runtime/lib`, so nothing of the image's is
loaded and nothing of ours leaks into the image's processes (no LD_LIBRARY_PATH).
"""

from __future__ import annotations

import hashlib
import re
import shutil
import tempfile
import threading
from pathlib import Path

from vivarium.proc import run_sync
from vivarium.templates.builder import Stopwatch, install_guest
from vivarium.templates.recipe import GUEST_DIR, GUEST_PACKAGES, GUEST_PREFIX, Recipe
from vivarium.templates.store import Template

RUNTIME = f"{GUEST_PREFIX}/runtime"
PYTHON = f"{RUNTIME}/bin/python3.11"
LOADER = "ld-linux-x86-64.so.2"
_LIBRARY = re.compile(r"(/[^\s:]+\.so[^\s:]*) \(")
# Not needed by envd, its init or the sudo broker: the interpreter's own tests and GUI.
_SKIP = shutil.ignore_patterns("test", "tests", "idlelib", "tkinter", "turtledemo", "ensurepip")
_staging = threading.Lock()


def _key(base: Template, setuid_blocked: bool) -> str:
    h = hashlib.sha256(f"{base.name}/{base.build_id}/{setuid_blocked}".encode())
    h.update("\n".join(GUEST_PACKAGES).encode())
    for path in sorted(p for p in GUEST_DIR.rglob("*") if p.is_file() and "__pycache__" not in
                       p.parts):  # fmt: skip
        h.update(path.name.encode() + path.read_bytes())
    h.update(Path(__file__).read_bytes())
    return h.hexdigest()[:16]


def stage(base: Template, cache: Path, setuid_blocked: bool) -> Path:
    """A directory holding `opt/vivarium` (and `usr/local/bin/sudo` where setuid is blocked),
    ready to be copied into an image. Earlier stagings stay: a build may be copying one."""
    staged = cache / f"guest-{_key(base, setuid_blocked)}"
    with _staging:  # builds run in parallel: one stages, the others then find it
        if (staged / ".done").exists():
            return staged
        cache.mkdir(parents=True, exist_ok=True)
        partial = Path(tempfile.mkdtemp(prefix=".guest-", dir=cache))
        try:
            install_guest(Recipe(name="image"), partial, Stopwatch(lambda _: None))
            _runtime(base.rootfs, partial / RUNTIME.lstrip("/"))
            if setuid_blocked:  # the broker instead of a setuid sudo (builder.customize)
                wrapper = partial / "usr/local/bin/sudo"
                wrapper.parent.mkdir(parents=True)
                wrapper.write_text(
                    f'#!/bin/sh\nexec {PYTHON} -I {GUEST_PREFIX}/guest/sudo.py "$@"\n'
                )
                wrapper.chmod(0o755)
            partial.chmod(0o755)
            (partial / ".done").touch()
            shutil.rmtree(staged, ignore_errors=True)
            partial.rename(staged)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
    return staged


def _runtime(rootfs: Path, dest: Path) -> None:
    """CPython 3.11 of the Debian rootfs, with its libraries and loader, under `dest`."""
    (dest / "bin").mkdir(parents=True)
    (dest / "lib").mkdir()
    shutil.copy2(rootfs / "usr/bin/python3.11", dest / "bin/python3.11")
    shutil.copytree(rootfs / "usr/lib/python3.11", dest / "lib/python3.11", symlinks=True,
                    ignore=_SKIP)  # fmt: skip
    modules = sorted(p.relative_to(rootfs) for p in
                     (rootfs / "usr/lib/python3.11/lib-dynload").glob("*.so"))  # fmt: skip
    listed = run_sync(["chroot", str(rootfs), "ldd", "/usr/bin/python3.11",
                       *(f"/{m}" for m in modules)]).stdout  # fmt: skip
    for library in sorted(set(_LIBRARY.findall(listed))):
        shutil.copy2(rootfs / library.lstrip("/"), dest / "lib" / Path(library).name)
    run_sync(["patchelf", "--set-interpreter", f"{RUNTIME}/lib/{LOADER}", "--force-rpath",
              "--set-rpath", f"{RUNTIME}/lib", str(dest / "bin/python3.11")])  # fmt: skip
    if not (dest / "lib" / LOADER).exists():
        raise FileNotFoundError(f"{LOADER} was not among python3.11's libraries")

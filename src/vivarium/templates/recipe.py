"""Template recipes: what goes into a template's root filesystem, and a hash that says when a
built template is stale (recipe, guest code, runsc version and probes all count)."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path

from vivarium.runtime.probe import Probe

GUEST_DIR = Path(__file__).resolve().parent.parent / "guest"
BUILDER_SOURCE = Path(__file__).resolve().parent / "builder.py"
# Inside the template: our code lives apart from the user's Python environment.
GUEST_PREFIX = "/opt/vivarium"
INIT = f"{GUEST_PREFIX}/bin/vivarium-init"  # PID 1 (guest/init.c)
SERVICES_FILE = "services"  # under GUEST_PREFIX: a line per service, read by init
# Template checkpoints are saved uncompressed (memory in a pages file of its own): every create
# restores one, and `runsc restore` of `base` took 268 ms p50 so against 470 ms compressed
# (2026-12-03), for 28 MiB on disk instead of 7 (code-interpreter-v1: 85 instead of 23).
TEMPLATE_COMPRESSION = False
HOSTNAME = "e2b.local"

BASE_PACKAGES = (
    "python3", "python3-pip", "python3-venv", "curl", "git", "procps", "iproute2",
    "ca-certificates", "sudo", "less", "nano", "vim-tiny", "wget", "unzip", "xz-utils", "locales",
    "python-is-python3",
)  # fmt: skip

# envd's dependencies, vendored into GUEST_PREFIX/lib (pure Python, fetched on the host at build
# time: a template build never needs network access from inside a sandbox). Pinned with their
# dependencies so every build of a recipe gets the same code.
GUEST_PACKAGES = (
    "starlette==1.10.0", "uvicorn==0.54.0", "h11==0.16.0", "click==8.5.1", "anyio==4.16.0",
    "idna==3.20", "typing_extensions==4.16.0", "python-multipart==0.0.20",
)  # fmt: skip

USER_SETUP = (
    "id -u user >/dev/null 2>&1 || useradd --create-home --uid 1000 --shell /bin/bash user",
    "usermod -aG sudo user",
    "echo 'user ALL=(ALL:ALL) NOPASSWD: ALL' > /etc/sudoers.d/user",
    "chmod 0440 /etc/sudoers.d/user",
    "printf 'nameserver 8.8.8.8\\nnameserver 1.1.1.1\\n' > /etc/resolv.conf",
    # E2B's sandboxes are all called e2b.local: code written against them may expect it.
    f"echo {HOSTNAME} > /etc/hostname",
    f"printf '127.0.0.1 localhost\\n::1 localhost\\n127.0.1.1 {HOSTNAME}\\n' > /etc/hosts",
    "sed -i 's/^# *C.UTF-8/C.UTF-8/' /etc/locale.gen 2>/dev/null || true",
    # LANG=C.UTF-8 from the archive: one mmap at every program start instead of ~50 syscalls
    # over 12 locale files (~3 ms per `bash -l` under ptrace).
    "localedef --add-to-archive /usr/lib/locale/C.utf8",
    # Every command runs in `bash -l`; spare it a fork + exec of `id` (bash knows $EUID).
    """sed -i 's/"$(id -u)"/"${EUID:-$(id -u)}"/g' /etc/profile""",
    # `vim` is Debian's small vim (1.7 MB; the full one brings 36 MB of runtime files), behaving
    # as vim rather than as vi: `sudo apt-get install vim` gets the rest.
    "update-alternatives --install /usr/bin/vim vim /usr/bin/vim.tiny 10",
    "printf 'set nocompatible\\nset backspace=indent,eol,start\\n' > /etc/vim/vimrc.tiny",
    "apt-get clean && rm -rf /var/lib/apt/lists/* /var/cache/apt/*.bin",
)


@dataclass(frozen=True)
class Service:
    """A long-running guest program that PID 1 starts (and restarts) beside envd. The template is
    checkpointed only once `GET /health` answers on its port."""

    name: str
    module: str  # a package under GUEST_PREFIX/lib, run as `python3 -I -m`-alike
    user: str = "root"
    port: int = 0


@dataclass(frozen=True)
class NpmBinary:
    """A program shipped as an npm package's file (Deno's), fetched on the host with `npm pack`
    and copied into the template."""

    package: str  # name@version
    path: str  # in the package
    dest: str  # in the template


@dataclass(frozen=True)
class Recipe:
    name: str
    suite: str = "bookworm"
    mirror: str = "http://deb.debian.org/debian"
    packages: tuple[str, ...] = BASE_PACKAGES
    steps: tuple[str, ...] = USER_SETUP
    guest_packages: tuple[str, ...] = GUEST_PACKAGES
    init: tuple[str, ...] = (INIT, "/usr/bin/python3")  # PID 1, and the Python it runs envd with
    env: tuple[str, ...] = ("LANG=C.UTF-8", "HOME=/root")
    # Pinned wheels (with all their dependencies) for the template's system Python: fetched on
    # the host, installed inside with `pip --no-index`; the sandbox never needs the network.
    wheels: tuple[str, ...] = ()
    services: tuple[Service, ...] = ()
    npm_binaries: tuple[NpmBinary, ...] = ()
    disk_mb: int = 0  # the writable layer's size; 0: the node's default (VIVARIUM_DEFAULT_DISK_MB)
    extra: dict[str, str] = field(default_factory=dict)

    def recipe_hash(self, probe: Probe) -> str:
        h = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode())
        for path in sorted(
            [
                *GUEST_DIR.rglob("*.py"),
                *GUEST_DIR.rglob("*.c"),
                *GUEST_DIR.rglob("*.json"),
                *GUEST_DIR.rglob("*.java"),
            ]
        ):
            h.update(path.name.encode())
            h.update(path.read_bytes())
        h.update(BUILDER_SOURCE.read_bytes())  # how a template is built is part of what it is
        h.update(f"{probe.runsc_version}|{probe.platform}".encode())
        h.update(f"{probe.setuid_blocked}".encode())
        return h.hexdigest()[:16]

    def debootstrap_key(self) -> str:
        raw = f"{self.suite}|{self.mirror}|{','.join(sorted(self.packages))}"
        return hashlib.sha256(raw.encode()).hexdigest()[:12]


# The code interpreter (E2B's `code-interpreter-v1`): Jupyter kernels with the data stack, behind
# the guest's interpreter server on port 49999. Versions resolved together for CPython 3.11.
# Not debugpy (which ipykernel would import at start): the client has no debugger, and its
# memory would be in every sandbox's checkpoint, slowing each restore.
INTERPRETER_WHEELS = (
    "ipykernel==7.4.0", "jupyter_client==8.10.0", "jupyter_core==5.9.1", "ipython==9.18.1",
    "ipython_pygments_lexers==1.1.1", "pyzmq==27.3.0", "tornado==6.6.1", "traitlets==5.16.1",
    "comm==0.2.3", "matplotlib_inline==0.2.2", "nest_asyncio2==1.7.4",
    "packaging==26.3", "platformdirs==4.14.7", "psutil==7.2.2", "python_dateutil==4.0.0",
    "jedi==0.20.1", "parso==0.8.7", "prompt_toolkit==3.0.53", "wcwidth==0.9.4",
    "pygments==2.21.0", "stack_data==0.6.3", "executing==2.3.0", "asttokens==3.0.2",
    "pure_eval==0.2.4", "pexpect==4.9.0", "ptyprocess==0.7.0", "typing_extensions==4.16.0",
    "bash_kernel==0.10.0", "filetype==1.2.0",
    "numpy==2.4.6", "pandas==3.1.1", "tzdata==2026.6", "matplotlib==3.11.2",
    "contourpy==1.3.3", "cycler==0.12.1", "fonttools==4.68.0", "kiwisolver==1.5.1",
    "pillow==13.0.0", "pyparsing==3.3.3",
)  # fmt: skip

RECIPES: dict[str, Recipe] = {
    "base": Recipe(name="base"),
    "code-interpreter-v1": Recipe(
        name="code-interpreter-v1",
        # R with its Jupyter kernel; JavaScript and TypeScript in Deno's; Java's JShell. Kernels
        # other than Python's start on a context's first cell: they are not in the checkpoint.
        packages=(*BASE_PACKAGES, "r-base-core", "r-cran-irkernel", "openjdk-17-jdk-headless"),
        npm_binaries=(NpmBinary("@deno/linux-x64-glibc@2.9.6", "deno", "/usr/local/bin/deno"),),
        # The kernels run as `user`; E2B's can work in /root (its template gives it to `user`).
        steps=(*USER_SETUP, "chown -R user:user /root"),
        wheels=INTERPRETER_WHEELS,
        services=(Service("interpreter", "interpreter", user="user", port=49999),),
    ),
}

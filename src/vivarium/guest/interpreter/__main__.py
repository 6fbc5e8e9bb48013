"""Run the code interpreter: `python3 -m interpreter` inside a sandbox, as the sandbox's user.

The default Python kernel is started and warmed up before the port opens: the template is
checkpointed once the port answers, so every sandbox restored from it has a kernel ready. The
default JavaScript context is listed but starts on its first cell."""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import gc
import os
import pwd
from typing import TYPE_CHECKING

from . import PORT
from .app import create_app
from .contexts import Contexts

if TYPE_CHECKING:  # see app.py: envd is a top-level package in the template
    from vivarium.guest.envd.serving import QuietServer, config
else:
    from envd.serving import QuietServer, config

TRIM = "import gc, ctypes\ngc.collect()\nctypes.CDLL('libc.so.6').malloc_trim(0)\ndel gc, ctypes"


def _trim() -> None:
    """Hand freed heap back to the system (malloc keeps it otherwise)."""
    ctypes.CDLL("libc.so.6").malloc_trim(0)


def _user_env() -> dict[str, str]:
    user = pwd.getpwuid(os.getuid())
    return {
        "HOME": user.pw_dir,
        "USER": user.pw_name,
        "LOGNAME": user.pw_name,
        "SHELL": user.pw_shell or "/bin/bash",
        "PATH": "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "LANG": "C.UTF-8",
        "TERM": "xterm-256color",
        "MPLBACKEND": "module://matplotlib_inline.backend_inline",
        "PYDEVD_DISABLE_FILE_VALIDATION": "1",
    }


async def serve(host: str, port: int) -> None:
    env = _user_env()
    contexts = Contexts(env, env["HOME"])
    ctx = await contexts.default("python")
    async for _ in ctx.run("1 + 1", {}, {}):  # pay the first cell's costs before the checkpoint
        pass
    # A user's first cell is the first: In[1], with no Out of ours.
    await ctx.housekeeping(
        "__vivarium_ip = get_ipython(); __vivarium_ip.displayhook.flush()\n"
        "__vivarium_ip.history_manager.reset(new_session=True)\n"
        "__vivarium_ip.execution_count = 1; del __vivarium_ip"
    )
    contexts.declare("javascript")  # E2B lists one; its kernel starts on its first cell
    # Every page still in use is in the template's checkpoint and read back by every restore.
    await ctx.housekeeping(TRIM)
    gc.collect()
    _trim()
    await QuietServer(config(create_app(contexts), host, port)).serve()


def main() -> None:
    parser = argparse.ArgumentParser(prog="interpreter")
    parser.add_argument("--host", default="0.0.0.0")
    parser.add_argument("--port", type=int, default=PORT)
    args = parser.parse_args()
    asyncio.run(serve(args.host, args.port))


if __name__ == "__main__":
    main()

"""The languages cells run in, and what each needs from us: its kernel, and the code that sets
environment variables (for the sandbox, or for one cell and back) and reseeds its random
numbers, in that language. Our own names only (`__vivarium…`): a user's names are neither needed
nor touched."""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass


@dataclass(frozen=True)
class Language:
    name: str
    kernel: str  # the kernel spec's directory under kernels/
    transport: str = "ipc"  # Deno's and IRkernel's ZeroMQ take TCP addresses only
    quotes: str = "'"  # what a string result's text is quoted with (E2B's text drops them)
    late_s: float = 0.0  # how long outputs may still come after the kernel said it is idle

    def export(self, env: dict[str, str]) -> str:
        raise NotImplementedError

    def set(self, env: dict[str, str]) -> str:
        """Export `env` for one cell, keeping what it replaces for `restore`."""
        raise NotImplementedError

    def restore(self, env: dict[str, str]) -> str:
        raise NotImplementedError

    # A kernel started before the template's checkpoint holds the same pseudo-random state in
    # every sandbox restored from it (and a forked sandbox, its parent's): the first cell in a
    # new sandbox (its id changed) reseeds what a program draws from without seeding it.
    reseed: str = ""


class Python(Language):
    def export(self, env: dict[str, str]) -> str:
        return (f"import os as __vivarium_os\n__vivarium_os.environ.update({env!r})\n"
                "del __vivarium_os\n")  # fmt: skip

    def set(self, env: dict[str, str]) -> str:
        keep = f"{{k: __vivarium_os.environ.get(k) for k in {list(env)!r}}}"
        return f"import os as __vivarium_os\n__vivarium_saved = {keep}\n" + self.export(env)

    def restore(self, env: dict[str, str]) -> str:
        return (
            "import os as __vivarium_os\n"
            "for __vivarium_k, __vivarium_v in __vivarium_saved.items():\n"
            "    if __vivarium_v is None:\n"
            "        __vivarium_os.environ.pop(__vivarium_k, None)\n"
            "    else:\n"
            "        __vivarium_os.environ[__vivarium_k] = __vivarium_v\n"
            "del __vivarium_os, __vivarium_saved\n"
            "globals().pop('__vivarium_k', None); globals().pop('__vivarium_v', None)\n"
        )


class Bash(Language):
    def export(self, env: dict[str, str]) -> str:
        return "\n".join(f"export {key}={shlex.quote(value)}" for key, value in env.items())

    def set(self, env: dict[str, str]) -> str:
        saved = [f"__vivarium_saved_{i}=${{{key}-__vivarium_unset__}}" for i, key in enumerate(env)]
        return "\n".join([*saved, self.export(env)])

    def restore(self, env: dict[str, str]) -> str:
        lines = []
        for i, key in enumerate(env):
            saved = f"__vivarium_saved_{i}"
            lines.append(f'if [ "${saved}" = __vivarium_unset__ ]; then unset {key}; '
                         f'else export {key}="${saved}"; fi; unset {saved}')  # fmt: skip
        return "\n".join(lines)


class Deno(Language):
    """JavaScript and TypeScript, in Deno's own Jupyter kernel (all permissions, as a script
    run with `deno run -A`). Its `Math.random` cannot be reseeded: a forked sandbox's JS kernel
    goes on with its parent's sequence (`crypto.getRandomValues` is fresh in each)."""

    def export(self, env: dict[str, str]) -> str:
        return "".join(f"Deno.env.set({json.dumps(k)}, {json.dumps(v)});" for k, v in env.items())

    def set(self, env: dict[str, str]) -> str:
        keep = ", ".join(f"[{json.dumps(k)}, Deno.env.get({json.dumps(k)})]" for k in env)
        return f"globalThis.__vivarium_saved = [{keep}];" + self.export(env)

    def restore(self, env: dict[str, str]) -> str:
        return ("for (const [k, v] of globalThis.__vivarium_saved) "
                "{ if (v === undefined) Deno.env.delete(k); else Deno.env.set(k, v); }"
                "delete globalThis.__vivarium_saved;")  # fmt: skip


def _r(value: str) -> str:
    """An R string literal (JSON's escapes are R's)."""
    return json.dumps(value)


class R(Language):
    def export(self, env: dict[str, str]) -> str:
        pairs = ", ".join(f"{_r(k)} = {_r(v)}" for k, v in env.items())
        return f"invisible(do.call(Sys.setenv, list({pairs})))"

    def set(self, env: dict[str, str]) -> str:
        names = ", ".join(_r(k) for k in env)
        return (
            f".__vivarium_saved <- Sys.getenv(c({names}), unset = NA, names = TRUE)\n"
            + self.export(env)
        )

    def restore(self, env: dict[str, str]) -> str:
        return (
            "for (.__vivarium_k in names(.__vivarium_saved)) {\n"
            "  if (is.na(.__vivarium_saved[[.__vivarium_k]])) Sys.unsetenv(.__vivarium_k)\n"
            "  else do.call(Sys.setenv, setNames(list(.__vivarium_saved[[.__vivarium_k]]),"
            " .__vivarium_k))\n"
            "}\n"
            "rm(.__vivarium_saved, .__vivarium_k)"
        )


class Java(Language):
    """E2B's Java cells read their variables as system properties (`System.getProperty`): a
    JVM's environment cannot change."""

    def export(self, env: dict[str, str]) -> str:
        return "".join(f"System.setProperty({_java(k)}, {_java(v)});" for k, v in env.items())

    def set(self, env: dict[str, str]) -> str:
        keep = "".join(f"__vivarium_saved.put({_java(k)}, System.getProperty({_java(k)}));"
                       for k in env)  # fmt: skip
        return ("java.util.Map<String, String> __vivarium_saved = new java.util.HashMap<>();"
                + keep + self.export(env))  # fmt: skip

    def restore(self, env: dict[str, str]) -> str:
        return ("__vivarium_saved.forEach((k, v) -> { if (v == null) System.clearProperty(k);"
                " else System.setProperty(k, v); }); __vivarium_saved = null;")  # fmt: skip


def _java(value: str) -> str:
    """A Java string literal. JSON's escapes are Java's; the \\u00XX it writes for control
    characters turn into them before the literal is read, which Java allows for all but CR and
    LF, and JSON writes those as \\r and \\n."""
    return json.dumps(value, ensure_ascii=False)


LANGUAGES: dict[str, Language] = {
    "python": Python("python", "python3",
                     reseed=("import random as __vivarium_r, sys as __vivarium_s, "
                             "tempfile as __vivarium_t\n"
                             "__vivarium_r.seed()\n"
                             "if 'numpy' in __vivarium_s.modules:\n"
                             "    __vivarium_s.modules['numpy'].random.seed()\n"
                             "__vivarium_t._name_sequence = None\n"
                             "del __vivarium_r, __vivarium_s, __vivarium_t\n")),
    "bash": Bash("bash", "bash", reseed="RANDOM=$SRANDOM"),
    "javascript": Deno("javascript", "deno", "tcp", "'\"`", late_s=0.025),
    "typescript": Deno("typescript", "deno", "tcp", "'\"`", late_s=0.025),
    "deno": Deno("deno", "deno", "tcp", "'\"`", late_s=0.025),
    "java": Java("java", "java", "ipc", '"'),
    "r": R("r", "ir", "tcp", "'",
           reseed='set.seed(readBin("/dev/urandom", "integer", 1L))'),
}  # fmt: skip
ALIASES = {"python3": "python", "py": "python", "sh": "bash", "shell": "bash",
           "js": "javascript", "ts": "typescript"}  # fmt: skip

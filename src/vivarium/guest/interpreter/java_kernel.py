"""A Jupyter kernel for Java: ipykernel's kernel machinery around JShell, which runs in a JVM of
its own (java/JShellRunner.java, started from its source) and speaks framed messages on its
stdin and stdout. Started by launch_kernel.py, like the Python and bash kernels."""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from typing import Any

from ipykernel.kernelbase import Kernel

RUNNER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "java", "JShellRunner.java")
# A quick start matters more than peak speed for cells; half the sandbox's memory at most.
JAVA = ["java", "-XX:+UseSerialGC", "-XX:TieredStopAtLevel=1", "-XX:MaxRAMPercentage=50",
        "-Xshare:auto", "--add-modules", "jdk.jshell", RUNNER]  # fmt: skip


class JavaKernel(Kernel):  # type: ignore[misc]  # ipykernel: in the template only
    implementation = "vivarium-java"
    implementation_version = "1"
    language = "java"
    language_info = {"name": "java", "mimetype": "text/x-java", "file_extension": ".java"}
    banner = "Java (JShell)"

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # The kernel ignores SIGINT between cells (ipykernel), and a JVM that starts with it
        # ignored never handles it: JShellRunner stops the running cell on it.
        ignored = signal.signal(signal.SIGINT, signal.SIG_DFL)
        try:
            self.jvm = subprocess.Popen(JAVA, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        finally:
            signal.signal(signal.SIGINT, ignored)
        for _ in self._frames():  # until it is ready
            pass

    def _frames(self) -> Iterator[tuple[str, bytes]]:
        """The JVM's frames up to `done` (or `ready`); a JVM that is gone ends the kernel: the
        interpreter then reports the cell's kernel as dead and starts another."""
        assert self.jvm.stdout is not None
        while True:
            header = self.jvm.stdout.readline()
            if not header:
                os._exit(self.jvm.wait() or 1)
            kind, size = header.decode().split()
            payload = self.jvm.stdout.read(int(size))
            if kind in ("done", "ready"):
                return
            yield kind, payload

    def do_execute(self, code: str, silent: bool, store_history: bool = True,
                   user_expressions: Any = None, allow_stdin: bool = False,
                   **kwargs: Any) -> dict[str, Any]:  # fmt: skip
        assert self.jvm.stdin is not None
        # An interrupt (the client gave up on the cell) stops the cell in the JVM; this side
        # reads on to the cell's end wherever the signal lands, so no frame is left behind.
        previous = signal.signal(signal.SIGINT, lambda *_: self.jvm.send_signal(signal.SIGINT))
        try:
            return self._execute(code, silent)
        finally:
            signal.signal(signal.SIGINT, previous)

    def _execute(self, code: str, silent: bool) -> dict[str, Any]:
        assert self.jvm.stdin is not None
        data = code.encode()
        self.jvm.stdin.write(f"{len(data)}\n".encode() + data)
        self.jvm.stdin.flush()
        failed: dict[str, Any] | None = None
        for kind, payload in self._frames():
            text = payload.decode(errors="replace")
            if kind in ("stdout", "stderr") and not silent:
                self.send_response(self.iopub_socket, "stream", {"name": kind, "text": text})
            elif kind == "value" and not silent:
                self.send_response(self.iopub_socket, "execute_result",
                                   {"execution_count": self.execution_count,
                                    "data": {"text/plain": text}, "metadata": {}})  # fmt: skip
            elif kind == "error":
                name, value, trace = (text.split("\0") + ["", ""])[:3]
                failed = {"ename": name, "evalue": value, "traceback": trace.splitlines()}
                if not silent:
                    self.send_response(self.iopub_socket, "error", failed)
        if failed is not None:
            return {"status": "error", "execution_count": self.execution_count, **failed}
        return {"status": "ok", "execution_count": self.execution_count, "payload": [],
                "user_expressions": {}}  # fmt: skip

    def do_shutdown(self, restart: bool) -> dict[str, Any]:
        self.jvm.kill()
        return {"status": "ok", "restart": restart}

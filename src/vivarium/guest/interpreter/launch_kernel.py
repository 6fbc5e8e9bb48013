"""Start a Jupyter kernel (`python`, `bash` or `java`) that this gVisor release can checkpoint.

ipykernel binds a TCP port on 127.0.0.1 for output piped from forked subprocesses and lets
libzmq's epoll watch it; this runsc refuses to save a TCP socket an epoll instance watches, and
the failed save takes the whole sandbox down. The same pipe over a Unix socket saves fine.
"""

import importlib.util
import os
import sys
from collections.abc import Callable
from types import ModuleType
from typing import Any

HERE = sys.path.pop(0)  # this script's directory: the user's kernel must not import our modules

import zmq  # noqa: E402
from ipykernel import iostream  # noqa: E402
from ipykernel.kernelapp import IPKernelApp  # noqa: E402
from zmq.eventloop.zmqstream import ZMQStream  # noqa: E402

# Given by the interpreter; kept out of the environment the user's code sees.
IPC_DIR = os.environ.pop("VIVARIUM_IPC_DIR", "/tmp")


def _setup_pipe_in(self: iostream.IOPubThread) -> None:
    self._pipe_uuid = os.urandom(16)
    pipe_in = self.socket.context.socket(zmq.PULL)
    pipe_in.linger = 0
    self._pipe_address = f"ipc://{IPC_DIR}/pipe-{os.getpid()}"
    pipe_in.bind(self._pipe_address)
    self._pipe_in = ZMQStream(pipe_in, self.io_loop)
    self._pipe_in.on_recv(self._handle_pipe_msg)


def _setup_pipe_out(self: iostream.IOPubThread) -> tuple[zmq.Context, zmq.Socket]:
    ctx = zmq.Context()  # a forked child needs its own context
    pipe_out = ctx.socket(zmq.PUSH)
    pipe_out.linger = 3000
    pipe_out.connect(self._pipe_address)
    return ctx, pipe_out


def main() -> None:
    language = sys.argv.pop(1)
    iostream.IOPubThread._setup_pipe_in = _setup_pipe_in
    iostream.IOPubThread._setup_pipe_out = _setup_pipe_out
    if language == "bash":
        from bash_kernel.kernel import BashKernel

        IPKernelApp.launch_instance(kernel_class=BashKernel)
        return
    if language == "java":
        IPKernelApp.launch_instance(kernel_class=_load("java_kernel.py").JavaKernel)
        return
    app = IPKernelApp.instance()
    app.initialize()
    _load("display.py").install(app.shell)  # charts and DataFrame data
    _cap_output(app.shell)
    app.start()


# What one cell may print (as the interpreter lets through); the rest is dropped here, before
# it is copied into messages: a cell printing hundreds of MiB would otherwise take the
# kernel's memory several times over.
MAX_PRINTED = 16 << 20


def _cap_output(shell: Any) -> None:
    printed = 0
    stderr_write = sys.stderr.write

    def capped(write: Callable[[str], Any]) -> Callable[[str], int]:
        def write_capped(text: str) -> int:
            nonlocal printed
            left = MAX_PRINTED - printed
            printed += len(text)
            if left > 0:
                write(text[:left])
                if len(text) > left:
                    stderr_write(f"\n[output past {MAX_PRINTED >> 20} MiB dropped]\n")
            return len(text)

        return write_capped

    def new_cell() -> None:
        nonlocal printed
        printed = 0

    sys.stdout.write = capped(sys.stdout.write)  # type: ignore[method-assign]
    sys.stderr.write = capped(sys.stderr.write)  # type: ignore[method-assign]
    shell.events.register("pre_execute", new_cell)


def _load(name: str) -> ModuleType:
    """One of our modules, by its path: our directory is not on the kernel's import path."""
    path = os.path.join(HERE, name)
    spec = importlib.util.spec_from_file_location(f"_vivarium_{name[:-3]}", path)
    if spec is None or spec.loader is None:
        raise ImportError(path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    main()

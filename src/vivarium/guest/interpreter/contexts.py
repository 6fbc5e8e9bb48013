"""Execution contexts: one Jupyter kernel each, with its language, working directory and a lock
so that one cell runs at a time."""

from __future__ import annotations

import asyncio
import os
import queue
import re
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager

from . import outputs
from .languages import ALIASES, LANGUAGES

KERNEL_SPECS = str(Path(__file__).resolve().parent / "kernels")
IPC_DIR = os.environ.get("VIVARIUM_RUN_DIR", "/run/vivarium/interpreter")
ENV_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*\Z")
POLL_S = 0.5
# Characters of output one cell may stream (the rest is dropped): above the Python kernel's own
# cap (launch_kernel.py), which drops what is past it before it becomes a message.
MAX_PRINTED = 17 << 20
START_TIMEOUT_S = 60


class UnknownLanguage(ValueError):
    pass


def normalize(language: str | None) -> str:
    name = (language or "python").strip().lower()
    name = ALIASES.get(name, name)
    if name not in LANGUAGES:
        raise UnknownLanguage(
            f"language {language!r} is not available in this sandbox (available: "
            f"{', '.join(LANGUAGES)})"
        )
    return name


def check_env(env: dict[str, Any] | None) -> dict[str, str]:
    env = env or {}
    bad = [k for k in env if not isinstance(k, str) or not ENV_NAME.match(k)]
    if bad:
        raise ValueError(f"invalid environment variable name(s): {', '.join(map(str, bad))}")
    return {k: str(v) for k, v in env.items()}


class Context:
    def __init__(self, language: str, cwd: str, env: dict[str, str]) -> None:
        self.id = str(uuid.uuid4())
        self.language = language
        self.lang = LANGUAGES[language]
        self.cwd = cwd
        self.lock = asyncio.Lock()
        self.global_env: dict[str, str] = {}  # the sandbox's variables, as last applied
        self._base_env = env
        where = {"ip": f"{IPC_DIR}/{self.id}"} if self.lang.transport == "ipc" else {}
        self.manager = AsyncKernelManager(
            kernel_name=self.lang.kernel,
            kernel_spec_manager=KernelSpecManager(kernel_dirs=[KERNEL_SPECS]),
            transport=self.lang.transport,
            connection_file=f"{IPC_DIR}/{self.id}.json",
            **where,
        )
        self.client: Any = None

    def describe(self) -> dict[str, str]:
        return {"id": self.id, "language": self.language, "cwd": self.cwd}

    async def start(self) -> None:
        try:
            os.makedirs(self.cwd, exist_ok=True)
        except OSError as exc:
            raise ValueError(f"cannot use {self.cwd!r} as the working directory: "
                             f"{exc.strerror}") from None  # fmt: skip
        env = {**self._base_env, "VIVARIUM_IPC_DIR": IPC_DIR}
        await self.manager.start_kernel(cwd=self.cwd, env=env)
        await self._connect()

    async def _connect(self) -> None:
        if self.client is not None:
            self.client.stop_channels()
        self.client = self.manager.client()
        # No heartbeat: its pings wake both processes every second in every idle sandbox, and
        # is_alive (the kernel's process) already tells a dead kernel.
        self.client.start_channels(hb=False)
        await self.client.wait_for_ready(timeout=START_TIMEOUT_S)
        self.global_env = {}

    async def restart(self) -> None:
        if self.client is None:  # never started: nothing to restart
            return
        await self.manager.restart_kernel(now=True)
        await self._connect()

    async def shutdown(self) -> None:
        if self.client is None:  # never started
            return
        self.client.stop_channels()
        await self.manager.shutdown_kernel(now=True)
        Path(f"{IPC_DIR}/{self.id}.json").unlink(missing_ok=True)

    async def housekeeping(self, code: str) -> None:
        """Run housekeeping code (environment variables) without output or history."""
        if not code:
            return
        msg_id = self.client.execute(code, silent=True, store_history=False)
        while True:
            reply = await self.client.get_shell_msg(timeout=START_TIMEOUT_S)
            if reply["parent_header"].get("msg_id") == msg_id:
                return

    async def _sync_global_env(self, env: dict[str, str]) -> None:
        """The sandbox's environment variables (set at create) apply to every cell."""
        changed = {k: v for k, v in env.items() if self.global_env.get(k) != v}
        if not changed:
            return
        code = self.lang.export(changed)
        if "E2B_SANDBOX_ID" in changed and self.lang.reseed:  # a new sandbox, not its last
            code = f"{code}\n{self.lang.reseed}"
        await self.housekeeping(code)
        self.global_env.update(changed)

    async def run(self, code: str, env: dict[str, str],
                  global_env: dict[str, str]) -> AsyncIterator[bytes]:  # fmt: skip
        """Run one cell (after the previous one) and yield its stream lines.

        If the consumer goes away mid-cell (the client's timeout), the kernel is interrupted and
        drained in the background; the next cell waits until it is idle again."""
        await self.lock.acquire()
        handed_over = False
        try:
            if self.client is None:  # a default context, started on its first cell
                await self.start()
            elif not await self.manager.is_alive():  # it exited between cells (killed, OOM)
                await self.restart()
                yield outputs.line(outputs.stream(
                    "stderr", f"[the {self.language} kernel had exited; it was restarted and "
                    "its variables and imports are gone]\n"))  # fmt: skip
            await self._sync_global_env(global_env)
            if env:
                await self.housekeeping(self.lang.set(env))
            msg_id = self.client.execute(code, store_history=True, allow_stdin=False)
            finished = False
            try:
                async for item in self._outputs(msg_id):
                    yield item
                finished = True
            finally:
                if not finished:
                    handed_over = True
                    self._abandon(msg_id, env)
            if env:
                await self.housekeeping(self.lang.restore(env))
            yield outputs.line({"type": "end_of_execution"})
        finally:
            if not handed_over:
                self.lock.release()

    async def _outputs(self, msg_id: str) -> AsyncIterator[bytes]:
        printed = 0  # bytes of stdout and stderr this cell has sent
        while True:
            try:
                msg = await self.client.get_iopub_msg(timeout=POLL_S)
            except queue.Empty:
                if not await self.manager.is_alive():
                    yield outputs.line(await self._died())
                    return
                continue
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind = msg["msg_type"]
            if kind == "status" and msg["content"].get("execution_state") == "idle":
                await self._drain_reply(msg_id)
                async for late in self._late_outputs(msg_id):
                    yield late
                return
            if kind == "execute_input":
                count = msg["content"].get("execution_count")
                yield outputs.line({"type": "number_of_executions", "execution_count": count})
                continue
            converted = outputs.convert(msg, self.lang.quotes)
            if converted is None:
                continue
            if converted["type"] in ("stdout", "stderr"):
                # What a cell prints is kept within MAX_PRINTED: past it, the rest is dropped
                # (once said), so neither this server nor the client holds it all.
                text, left = converted["text"], MAX_PRINTED - printed
                printed += len(text)
                if left <= 0:
                    continue
                if len(text) > left:
                    yield outputs.line({**converted, "text": text[:left]})
                    note = f"\n[output past {MAX_PRINTED >> 20} MiB dropped]\n"
                    yield outputs.line(outputs.stream("stderr", note))
                    continue
            yield outputs.line(converted)

    async def _late_outputs(self, msg_id: str) -> AsyncIterator[bytes]:
        """What a kernel publishes after saying it is idle (Deno's sometimes sends a cell's
        result a fraction of a millisecond after): read for `late_s` more."""
        deadline = time.monotonic() + self.lang.late_s
        while (left := deadline - time.monotonic()) > 0:  # a kernel printing on is cut off
            try:
                msg = await self.client.get_iopub_msg(timeout=left)
            except queue.Empty:
                return
            if msg["parent_header"].get("msg_id") == msg_id:
                converted = outputs.convert(msg, self.lang.quotes)
                if converted is not None:
                    yield outputs.line(converted)

    async def _drain_reply(self, msg_id: str) -> None:
        while True:
            try:
                reply = await self.client.get_shell_msg(timeout=POLL_S * 4)
            except queue.Empty:
                return
            if reply["parent_header"].get("msg_id") == msg_id:
                return

    async def _died(self) -> dict[str, Any]:
        process = getattr(self.manager.provisioner, "process", None)
        code = getattr(process, "returncode", None)
        await self.restart()
        return outputs.error(
            "KernelDied",
            f"the {self.language} kernel exited (code {code}) while running this cell; it was "
            "restarted, so its variables and imports are gone",
            "",
        )

    def _abandon(self, msg_id: str, env: dict[str, str]) -> None:
        """Interrupt the cell nobody waits for, let it finish, then free the context."""

        async def interrupt_and_drain() -> None:
            try:
                await self.manager.interrupt_kernel()
                async for _ in self._outputs(msg_id):
                    pass
                if env:
                    await self.housekeeping(self.lang.restore(env))
            except Exception as exc:  # the kernel is in an unknown state: start afresh
                print(f"interpreter: draining an interrupted cell failed: {exc!r}", flush=True)
                await self.restart()
            finally:
                self.lock.release()

        asyncio.get_running_loop().create_task(interrupt_and_drain())


class Contexts:
    """Every context of this sandbox, and the default one per language."""

    def __init__(self, env: dict[str, str], home: str) -> None:
        self.env = env
        self.home = home
        self.by_id: dict[str, Context] = {}
        self.defaults: dict[str, Context] = {}
        self._starting = asyncio.Lock()

    async def create(self, language: str, cwd: str | None) -> Context:
        ctx = Context(language, cwd or self.home, self.env)
        await ctx.start()
        self.by_id[ctx.id] = ctx
        return ctx

    def declare(self, language: str) -> Context:
        """A default context that is listed at once, as E2B's are, and whose kernel starts on
        its first cell: the template's checkpoint does not hold it."""
        ctx = Context(language, self.home, self.env)
        self.by_id[ctx.id] = ctx
        self.defaults[language] = ctx
        return ctx

    async def default(self, language: str) -> Context:
        async with self._starting:
            ctx = self.defaults.get(language)
            if ctx is None:
                ctx = await self.create(language, None)
                self.defaults[language] = ctx
            return ctx

    def get(self, context_id: str) -> Context | None:
        return self.by_id.get(context_id)

    async def remove(self, context_id: str) -> bool:
        ctx = self.by_id.pop(context_id, None)
        if ctx is None:
            return False
        for language, default in list(self.defaults.items()):
            if default is ctx:
                del self.defaults[language]
        await ctx.shutdown()
        return True

    def describe(self) -> list[dict[str, str]]:
        return [ctx.describe() for ctx in self.by_id.values()]

"""Running host commands (runsc, ip, iptables): the one place that spawns them.

Child stdin is /dev/null and output goes to pipes we drain fully, never to our own stdio:
detached runsc containers inherit the caller's descriptors and would otherwise hold them.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import subprocess
import threading
from collections.abc import AsyncGenerator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from vivarium.errors import RuntimeFailure


@dataclass(frozen=True)
class Result:
    args: tuple[str, ...]
    returncode: int
    stdout: str
    stderr: str

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def _failure(result: Result) -> RuntimeFailure:
    detail = (result.stderr or result.stdout).strip().splitlines()
    tail = " | ".join(detail[-3:]) if detail else "no output"
    return RuntimeFailure(f"`{' '.join(result.args[:3])} ...` exited {result.returncode}: {tail}")


# Commands run from these threads, not from the event loop: spawning from a large process and
# supervising children cost milliseconds of loop time each, and the control plane must answer
# within tens of milliseconds while dozens of sandboxes start (see `raise_priority`).
_pool: ThreadPoolExecutor | None = None
_raised = 0  # how far raise_priority lifted this process above where it started
MAX_PARALLEL = 64


def _executor() -> ThreadPoolExecutor:
    global _pool
    if _pool is None:
        _pool = ThreadPoolExecutor(MAX_PARALLEL, thread_name_prefix="vivarium-cmd")
    return _pool


def raise_priority(steps: int = 10) -> None:
    """Give the server priority over sandboxes: the API and proxy answer promptly while the
    CPUs are busy restoring. Commands we run (runsc, and through it the sandboxes) go back to
    the normal priority (see `_argv`). Needs root; a no-op otherwise."""
    global _raised
    try:
        os.setpriority(os.PRIO_PROCESS, 0, os.getpriority(os.PRIO_PROCESS, 0) - steps)
    except OSError:
        return
    _raised = steps


def _argv(args: Sequence[str]) -> list[str]:
    # Children inherit our nice value. Lowering it in threads that spawn would not do: a
    # low-priority thread holding the GIL stalls the event loop (priority inversion).
    return ["nice", "-n", str(_raised), *args] if _raised else list(args)


def _run_blocking(
    args: Sequence[str], stdin: bytes | None, log: Path | None, timeout: float,
    started: list[subprocess.Popen[bytes]], stdout_to: Path | None = None,
) -> tuple[int, bytes, bytes]:  # fmt: skip
    log_file = log.open("ab") if log is not None else None
    offset = log_file.tell() if log_file else 0
    out_file = stdout_to.open("wb") if stdout_to is not None else None
    try:
        proc = subprocess.Popen(
            _argv(args),
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=out_file or log_file or subprocess.PIPE,
            stderr=log_file or subprocess.PIPE,
            start_new_session=True,
        )
    finally:
        for opened in (log_file, out_file):
            if opened:
                opened.close()
    started.append(proc)
    try:
        out, err = proc.communicate(stdin, timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise TimeoutError(f"{args[0]} did not finish within {timeout:g}s") from None
    if log is not None:
        with log.open("rb") as logged:
            logged.seek(offset)
            err = logged.read(64 * 1024)
    return proc.returncode, out or b"", err or b""


async def run(
    args: Sequence[str],
    *,
    check: bool = True,
    timeout: float = 60.0,
    stdin: bytes | None = None,
    log: Path | None = None,
    stdout_to: Path | None = None,
) -> Result:
    """Run a command to completion.

    With `log`, output is appended to that file instead of pipes: for commands that leave a
    process behind holding their stdio (detached containers), which a pipe would wait for.
    With `stdout_to`, standard output goes to that file (for output too large to hold).
    """
    started: list[subprocess.Popen[bytes]] = []
    job = asyncio.get_running_loop().run_in_executor(
        _executor(), _run_blocking, args, stdin, log, timeout, started, stdout_to
    )
    try:
        code, out, err = await asyncio.shield(job)
    except asyncio.CancelledError:
        for proc in started:  # the caller gave up: so does the command
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
        with contextlib.suppress(Exception):
            await job
        raise
    result = Result(tuple(args), code, out.decode(errors="replace"),
                    err.decode(errors="replace"))  # fmt: skip
    if check and not result.ok:
        raise _failure(result)
    return result


def run_sync(
    args: Sequence[str],
    *,
    check: bool = True,
    timeout: float = 600.0,
    stdin: bytes | None = None,
    cwd: Path | None = None,
) -> Result:
    completed = subprocess.run(
        _argv(args),
        input=stdin,
        cwd=cwd,
        stdin=None if stdin is not None else subprocess.DEVNULL,
        capture_output=True,
        timeout=timeout,
        start_new_session=True,
    )
    result = Result(
        tuple(args),
        completed.returncode,
        completed.stdout.decode(errors="replace"),
        completed.stderr.decode(errors="replace"),
    )
    if check and not result.ok:
        raise _failure(result)
    return result


MAX_LINE = 64 << 10


async def run_lines(args: Sequence[str], *, tail: int = 20) -> AsyncGenerator[str, None]:
    """Run a long command, yielding its output (stdout and stderr merged) line by line as it
    comes, for progress reports; raises RuntimeFailure with the last `tail` lines if it fails.
    Closing the iterator early kills the command."""
    loop = asyncio.get_running_loop()
    # Bounded, and lines cut at MAX_LINE: a command that prints without end (or without a
    # newline) is held back by its pipe, never by our memory.
    lines: asyncio.Queue[str | None] = asyncio.Queue(maxsize=256)

    def spawn() -> subprocess.Popen[bytes]:  # off the loop, as run() spawns
        return subprocess.Popen(_argv(args), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip

    proc = await loop.run_in_executor(_executor(), spawn)

    stop = threading.Event()  # no one reads any more

    def deliver(item: str | None) -> bool:
        future = asyncio.run_coroutine_threadsafe(lines.put(item), loop)
        while True:
            try:
                future.result(timeout=0.5)
                return True
            except concurrent.futures.TimeoutError:
                if stop.is_set():
                    future.cancel()
                    return False

    def pump() -> None:  # a thread: the loop never blocks on the pipe
        assert proc.stdout is not None
        try:
            while raw := proc.stdout.readline(MAX_LINE):
                if not deliver(raw.decode(errors="replace").rstrip()):
                    return
            deliver(None)
        except (RuntimeError, concurrent.futures.CancelledError):
            return  # the loop is gone
        finally:
            proc.stdout.close()  # the pump alone reads it: closed here, never under a read

    threading.Thread(target=pump, daemon=True, name="vivarium-lines").start()
    last: list[str] = []
    try:
        while (line := await lines.get()) is not None:
            last = (last + [line])[-tail:]
            yield line
        code = await loop.run_in_executor(_executor(), proc.wait)
    finally:
        stop.set()
        if proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await loop.run_in_executor(_executor(), proc.wait)
    if code != 0:
        raise _failure(Result(tuple(args), code, "", "\n".join(last)))

"""Running host commands (runsc, ip, iptables): the one place that spawns them.

Child stdin is /dev/null and output goes to pipes we drain fully, never to our own stdio:
detached runsc containers inherit the caller's descriptors and would otherwise hold them.
"""

from __future__ import annotations

import asyncio
import subprocess
from collections.abc import Sequence
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


async def run(
    args: Sequence[str],
    *,
    check: bool = True,
    timeout: float = 60.0,
    stdin: bytes | None = None,
    log: Path | None = None,
) -> Result:
    """Run a command to completion.

    With `log`, output is appended to that file instead of pipes: for commands that leave a
    process behind holding their stdio (detached containers), which a pipe would wait for.
    """
    log_file = log.open("ab") if log is not None else None
    offset = log_file.tell() if log_file else 0
    try:
        proc = await asyncio.create_subprocess_exec(
            *args,
            stdin=subprocess.PIPE if stdin is not None else subprocess.DEVNULL,
            stdout=log_file or subprocess.PIPE,
            stderr=log_file or subprocess.PIPE,
            start_new_session=True,
        )
    finally:
        if log_file:
            log_file.close()
    try:
        out, err = await asyncio.wait_for(proc.communicate(stdin), timeout)
    except (TimeoutError, asyncio.CancelledError):
        proc.kill()
        await proc.wait()
        raise
    if log is not None:
        with log.open("rb") as f:
            f.seek(offset)
            err = f.read(64 * 1024)
    result = Result(
        tuple(args),
        proc.returncode or 0,
        (out or b"").decode(errors="replace"),
        (err or b"").decode(errors="replace"),
    )
    if check and not result.ok:
        raise _failure(result)
    return result


def run_sync(
    args: Sequence[str], *, check: bool = True, timeout: float = 600.0, stdin: bytes | None = None
) -> Result:
    completed = subprocess.run(
        list(args),
        input=stdin,
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

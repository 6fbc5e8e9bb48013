"""`vivarium.proc`: the one place that runs host commands."""

from __future__ import annotations

import asyncio
import os

import pytest

from vivarium.errors import RuntimeFailure
from vivarium.proc import run, run_lines


def test_run_lines_streams_merged_output_and_raises_with_its_tail() -> None:
    async def collect(script: str) -> list[str]:
        return [line async for line in run_lines(["sh", "-c", script], tail=2)]

    assert asyncio.run(collect("echo one; echo two >&2; echo three")) == ["one", "two", "three"]
    with pytest.raises(RuntimeFailure, match=r"exited 3: b \| c$") as caught:
        asyncio.run(collect("echo a; echo b; echo c >&2; exit 3"))
    assert "a" not in str(caught.value).split(":", 1)[1]


def test_run_lines_left_early_kills_the_command() -> None:
    async def first_line() -> str:
        lines = run_lines(["sh", "-c", "echo $$; exec sleep 300"])
        line = await anext(lines)
        await lines.aclose()
        return line

    pid = int(asyncio.run(first_line()))
    with pytest.raises(ProcessLookupError):  # killed and reaped
        os.kill(pid, 0)


def test_run_reports_a_failure_with_its_output() -> None:
    with pytest.raises(RuntimeFailure, match="exited 2: nope"):
        asyncio.run(run(["sh", "-c", "echo nope >&2; exit 2"]))
    assert asyncio.run(run(["sh", "-c", "exit 2"], check=False)).returncode == 2

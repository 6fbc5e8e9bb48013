"""The runsc driver: the only code that invokes gVisor.

Commands that start a sandbox (run, restore) go through the /proc/sys work-around when the probe
asked for it, and name the sandbox's disk: the directory of its writable layer's filestore
(runtime/disk.py). `checkpoint --leave-running` is not used: it restores in the foreground and stays
the container's parent, so fork is done as checkpoint + N restores instead.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from vivarium.errors import RuntimeFailure
from vivarium.proc import Result, run
from vivarium.runtime import procsys
from vivarium.runtime.probe import Probe, detect

# A restore takes about a second; on a host whose CPUs are taken by dozens of sandboxes, it
# was seen to take 50 s. Past this it is taken for hung.
START_TIMEOUT_S = 120.0

log = logging.getLogger(__name__)


class CheckpointFailed(RuntimeFailure):
    """runsc could not save the container; whether it still runs is for the caller to ask."""


@dataclass(frozen=True)
class ContainerState:
    id: str
    status: str  # created | running | paused | stopped
    pid: int
    bundle: str


class Runsc:
    def __init__(self, binary: str, root: Path, probe: Probe, procsys_copy: Path) -> None:
        self.binary = binary
        self.root = root
        self.probe = probe
        self.procsys_copy = procsys_copy
        root.mkdir(mode=0o700, parents=True, exist_ok=True)

    def _argv(self, *args: str) -> list[str]:
        return [
            self.binary,
            "--root", str(self.root),
            f"--platform={self.probe.platform}",
            "--network=sandbox",
            *args,
        ]  # fmt: skip

    def _starting(self, disk: Path | None, *args: str) -> list[str]:
        # --net-disconnect-ok: a connection that crosses the sandbox's interface, open at a
        # checkpoint, is cut there (its peer sees a reset, as if a laptop lid closed) instead
        # of failing the save. Loopback connections inside are saved and keep working.
        # Without a disk, writes go straight to the root directory (a template build's steps).
        overlay = f"root:dir={disk}" if disk is not None else "none"
        argv = self._argv("--overlay2", overlay, "--net-disconnect-ok", *args)
        return procsys.wrap(argv, self.procsys_copy) if self.probe.netns_workaround else argv

    async def start(self, cid: str, bundle: Path, disk: Path | None, console_log: Path) -> None:
        """Boot a container; its stdout/stderr (and runsc's errors) go to `console_log`.
        Without `disk`, what it writes lands in its root directory on the host."""
        argv = self._starting(disk, "run", "--detach", "--bundle", str(bundle), cid)
        await run(argv, timeout=START_TIMEOUT_S, log=console_log)

    async def restore(
        self, cid: str, bundle: Path, image: Path, disk: Path, console_log: Path
    ) -> None:
        argv = self._starting(disk, "restore", "--detach", "--image-path", str(image),
                              "--bundle", str(bundle), cid)  # fmt: skip
        await run(argv, timeout=START_TIMEOUT_S, log=console_log)

    async def checkpoint(self, cid: str, image: Path, *, compress: bool = True) -> None:
        """Save memory and the overlay to `image`; the container is left stopped. Without
        `compress` the image is written as it is (for the chunk store, which compresses the
        chunks it does not already hold)."""
        image.mkdir(parents=True, exist_ok=True)
        flags = [] if compress else ["--compression=none"]
        res = await run(self._argv("checkpoint", *flags, "--image-path", str(image), cid),
                        check=False, timeout=600)  # fmt: skip
        if not res.ok:
            log.warning("runsc checkpoint %s failed:\n%s", cid, res.stderr[-20000:])
            raise CheckpointFailed(f"runsc checkpoint {cid} failed: {checkpoint_error(res.stderr)}")

    async def exec(
        self,
        cid: str,
        argv: list[str],
        *,
        user: str = "0:0",
        env: list[str] | None = None,
        cwd: str = "/",
        timeout: float = 60.0,
        caps: tuple[str, ...] = (),
        stdout_to: Path | None = None,
    ) -> Result:
        """Run `argv` in the container; `caps`, if any, are all the capabilities it gets;
        `stdout_to` takes its standard output (a file on the host)."""
        return await run(self.exec_argv(cid, argv, user=user, env=env, cwd=cwd, caps=caps),
                         check=False, timeout=timeout, stdout_to=stdout_to)  # fmt: skip

    def exec_argv(
        self, cid: str, argv: list[str], *, user: str = "0:0", env: list[str] | None = None,
        cwd: str = "/", caps: tuple[str, ...] = (), detach: bool = False,
    ) -> list[str]:  # fmt: skip
        """The `runsc exec` command line, for callers that read its output as it comes."""
        args = ["exec", "--user", user, "--cwd", cwd, *(f"--cap={c}" for c in caps)]
        if detach:
            args.append("--detach")
        for item in env or []:
            args += ["--env", item]
        return self._argv(*args, cid, *argv)

    async def pause(self, cid: str) -> None:
        """Freeze every process of the container (gVisor's freezer; the network stack runs on).
        A checkpoint of a paused container works and restores it running."""
        await run(self._argv("pause", cid))

    async def resume(self, cid: str) -> bool:
        """Unfreeze a paused container; False when it is gone (a checkpoint ends the sandbox
        but leaves its state saying `paused`)."""
        return (await run(self._argv("resume", cid), check=False)).ok

    async def kill(self, cid: str, signal: str = "KILL") -> None:
        await run(self._argv("kill", "--all", cid, signal), check=False)

    async def signal_init(self, cid: str, signal: str) -> None:
        """Send `signal` to the container's PID 1 only."""
        await run(self._argv("kill", cid, signal), check=False)

    async def delete(self, cid: str) -> None:
        res = await run(self._argv("delete", "--force", cid), check=False)
        if res.ok or "does not exist" in res.stderr + res.stdout:
            return
        raise RuntimeFailure(f"runsc delete {cid} failed: {res.stderr.strip()[-300:]}")

    async def state(self, cid: str) -> ContainerState | None:
        res = await run(self._argv("state", cid), check=False)
        if not res.ok:
            return None
        return _parse_state(json.loads(res.stdout))

    async def list(self) -> list[ContainerState]:
        """Every container under our root; raises when runsc cannot say (never guesses [])."""
        res = await run(self._argv("list", "--format=json"))
        if not res.stdout.strip():
            return []
        data = json.loads(res.stdout) or []
        return [_parse_state(item) for item in data]


def checkpoint_error(stderr: str) -> str:
    """The cause in runsc's checkpoint error: its first line, without the dump of the object it
    could not save ("encoding error at object tcp.endpoint{... pages ...}: endpoint still has
    waiters upon save"); a Go stack follows it."""
    first = (stderr.strip() or "no output").splitlines()[0]
    head, brace, _ = first.partition("{")
    if brace and "}: " in first:
        first = head + ": " + first[first.rindex("}: ") + 3 :]
    return first.rstrip(":")[:500]


def _parse_state(item: dict[str, Any]) -> ContainerState:
    return ContainerState(
        id=str(item.get("id", "")),
        status=str(item.get("status", "unknown")),
        pid=int(item.get("pid", -1) or -1),
        bundle=str(item.get("bundle", "")),
    )


def open_runtime(binary: str, state_dir: Path, root: Path, platform: str = "") -> Runsc:
    """Probe the host (cached) and return a driver whose containers live under `root`."""
    probe = detect(binary, state_dir, platform)
    copy = state_dir / "procsys"
    if probe.netns_workaround:
        procsys.make_copy(copy)  # refreshed every start: sysctl values may change across boots
    return Runsc(binary, root, probe, copy)

"""Filesystem-only persistence through the official client: `pause(mode="filesystem")`,
`connect(on_resume="reboot")` and `create_snapshot(mode="filesystem")` keep a sandbox's files
(written, changed, deleted, linked, owned) and start its processes anew on its template."""

from __future__ import annotations

import time
import uuid

import pytest
from e2b import Sandbox, SandboxState, Volume

from tests.compat.conftest import Compat

pytestmark = pytest.mark.timeout(600)

SETUP = (
    "set -e; mkdir -p /home/user/proj/deep; echo kept > /home/user/proj/deep/a.txt; "
    "ln -s /home/user/proj/deep/a.txt /home/user/link; "
    "sudo sh -c 'printf \"#!/bin/sh\\necho hi\\n\" > /usr/local/bin/hello'; "
    "sudo chmod 750 /usr/local/bin/hello; "
    "sudo rm /etc/debian_version; sudo chmod 600 /etc/hostname"
)


def _files_are_back(sandbox: Sandbox) -> None:
    assert sandbox.files.read("/home/user/proj/deep/a.txt") == "kept\n"
    assert sandbox.commands.run("readlink /home/user/link").stdout == "/home/user/proj/deep/a.txt\n"
    assert sandbox.commands.run("sudo hello").stdout == "hi\n"
    owner = sandbox.commands.run("stat -c '%U %a' /usr/local/bin/hello /etc/hostname").stdout
    assert owner.split("\n")[:2] == ["root 750", "root 600"], owner
    assert not sandbox.files.exists("/etc/debian_version")  # deleted, not brought back


def _sleeping(sandbox: Sandbox) -> bool:
    return "sleep 4242" in sandbox.commands.run("ps -eo args").stdout


def test_a_filesystem_pause_keeps_the_files_and_starts_processes_anew(compat: Compat) -> None:
    volume = Volume.create(f"fs-{uuid.uuid4().hex[:8]}")
    sandbox = Sandbox.create(timeout=120, volume_mounts={"/mnt/data": volume})
    try:
        sandbox.commands.run(SETUP)
        sandbox.files.write("/mnt/data/in-volume.txt", "volume")
        sandbox.commands.run("sleep 4242", background=True)
        assert sandbox.pause(mode="filesystem")
        assert Sandbox.get_info(sandbox.sandbox_id).state == SandboxState.PAUSED
        sandbox = Sandbox.connect(sandbox.sandbox_id, timeout=120)
        _files_are_back(sandbox)
        assert not _sleeping(sandbox)  # a new start of the template: no old process
        assert sandbox.files.read("/mnt/data/in-volume.txt") == "volume"  # mounted again
        # A second round keeps what the first laid back and what came since.
        sandbox.files.write("/home/user/second.txt", "2")
        sandbox.commands.run("rm /home/user/link")
        assert sandbox.pause(keep_memory=False)
        sandbox = Sandbox.connect(sandbox.sandbox_id, timeout=120)
        _files_are_back_but_link(sandbox)
        assert sandbox.files.read("/home/user/second.txt") == "2"
    finally:
        sandbox.kill()
        Volume.destroy(volume.volume_id)


def _files_are_back_but_link(sandbox: Sandbox) -> None:
    assert sandbox.files.read("/home/user/proj/deep/a.txt") == "kept\n"
    assert not sandbox.files.exists("/home/user/link")
    assert not sandbox.files.exists("/etc/debian_version")


def test_a_full_pause_resumed_with_reboot_keeps_only_the_files(compat: Compat) -> None:
    sandbox = Sandbox.create(timeout=120)
    try:
        sandbox.commands.run(SETUP)
        sandbox.commands.run("sleep 4242", background=True)
        assert sandbox.pause()  # memory and files
        sandbox = Sandbox.connect(sandbox.sandbox_id, timeout=120, on_resume="reboot")
        _files_are_back(sandbox)
        assert not _sleeping(sandbox)
    finally:
        sandbox.kill()


def test_a_filesystem_snapshot_starts_sandboxes_with_the_files(compat: Compat) -> None:
    source = Sandbox.create(timeout=120)
    try:
        source.commands.run(SETUP)
        source.commands.run("sleep 4242", background=True)
        snapshot = source.create_snapshot(mode="filesystem")
        assert _sleeping(source)  # it was not stopped
        child = Sandbox.create(snapshot.snapshot_id, timeout=60)
        try:
            _files_are_back(child)
            assert not _sleeping(child)
        finally:
            child.kill()
        Sandbox.delete_snapshot(snapshot.snapshot_id)
    finally:
        source.kill()


def test_an_auto_pause_can_keep_the_files_only(compat: Compat) -> None:
    lifecycle = {"on_timeout": {"action": "pause", "mode": "filesystem"}}
    sandbox = Sandbox.create(timeout=5, lifecycle=lifecycle)  # type: ignore[arg-type]
    try:
        sandbox.commands.run(SETUP)
        sandbox.commands.run("sleep 4242", background=True)
        deadline = time.monotonic() + 60
        while Sandbox.get_info(sandbox.sandbox_id).state != SandboxState.PAUSED:
            assert time.monotonic() < deadline, "it did not pause at its timeout"
            time.sleep(0.5)
        sandbox = Sandbox.connect(sandbox.sandbox_id, timeout=120)
        _files_are_back(sandbox)
        assert not _sleeping(sandbox)
    finally:
        sandbox.kill()
    # Traffic could not wake it as it was: refused (the client refuses it too, before asking).
    body = {"templateID": "base", "autoPause": True, "autoPauseMemory": False,
            "autoResume": {"enabled": True}}  # fmt: skip
    with compat.admin() as http:
        answer = http.post("/v2/sandboxes", json=body)
    assert answer.status_code == 400 and "autoResume" in answer.json()["message"]

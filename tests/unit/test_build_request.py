"""Team template builds' parts that need no sandbox: the SDK's request checked before anything
runs (templates/build_request.py), the build log, the rootfs image mounted again at start."""

from __future__ import annotations

import asyncio
import fcntl
import json
import subprocess
from pathlib import Path

import pytest

from vivarium.errors import InvalidArgument
from vivarium.runtime import disk
from vivarium.templates.build_log import MAX_ENTRIES, BuildLog
from vivarium.templates.build_request import builtin_for_image, parse
from vivarium.templates.custom import BUILD_LOCK, make_rootfs, mount_rootfs_images
from vivarium.templates.oci import Registry
from vivarium.templates.store import TemplateStore

HASH = "a" * 64


def test_images_we_provide_without_pulling() -> None:
    assert builtin_for_image("e2bdev/base") == "base"
    assert builtin_for_image("e2bdev/base:latest") == "base"
    assert builtin_for_image("debian:bookworm") == "base"
    assert builtin_for_image("docker.io/library/debian:stable") == "base"
    assert builtin_for_image("e2bdev/code-interpreter:latest") == "code-interpreter-v1"
    assert builtin_for_image("debian:trixie") is None
    assert builtin_for_image("python:3.12") is None
    assert builtin_for_image("ubuntu:24.04") is None


def test_a_request_as_the_client_sends_it() -> None:
    request = parse({
        "fromImage": "e2bdev/base", "force": False,
        "steps": [
            {"type": "COPY", "args": ["app/", "/home/user/app", "", "0755"], "filesHash": HASH,
             "force": False},
            {"type": "RUN", "args": ["pip install pandas", "root"], "force": False},
            {"type": "ENV", "args": ["A", "1", "B", "$A"], "force": False},
            {"type": "WORKDIR", "args": ["/app"], "force": False},
            {"type": "USER", "args": ["user"], "force": False},
        ],
        "startCmd": "npm start", "readyCmd": "ss -tuln | grep :3000",
    })  # fmt: skip
    assert [s.type for s in request.steps] == ["COPY", "RUN", "ENV", "WORKDIR", "USER"]
    assert request.files == {HASH}
    assert request.steps[0].text == "COPY app/ /home/user/app 0755"
    assert (request.start_cmd, request.ready_cmd) == ("npm start", "ss -tuln | grep :3000")


@pytest.mark.parametrize(
    ("body", "words"),
    [
        ({}, "exactly one"),
        ({"fromImage": "alpine", "fromImageRegistry": {"type": "registry"}}, "username"),
        ({"fromImage": "alpine", "fromImageRegistry": {"type": "aws"}}, "only type"),
        ({"fromTemplate": "base", "steps": "RUN ls"}, "list"),
        ({"fromTemplate": "base", "steps": [{"type": "ADD", "args": ["x"]}]}, "type"),
        ({"fromTemplate": "base", "steps": [{"type": "RUN", "args": []}]}, "RUN takes"),
        ({"fromTemplate": "base", "steps": [{"type": "RUN", "args": ["a\0b"]}]}, "NUL"),
        ({"fromTemplate": "base", "steps": [{"type": "ENV", "args": ["A", "1", "B"]}]}, "pairs"),
        ({"fromTemplate": "base", "steps": [{"type": "COPY", "args": ["a", "/b"],
                                             "filesHash": "zz"}]}, "filesHash"),
        ({"fromTemplate": "base", "steps": [{"type": "COPY", "args": ["a", "/b", "", "rwx"],
                                             "filesHash": HASH}]}, "octal"),
        ({"fromTemplate": "base", "startCmd": 5}, "startCmd"),
    ],
)  # fmt: skip
def test_bad_requests_say_what_is_wrong(body: dict[str, object], words: str) -> None:
    with pytest.raises(InvalidArgument, match=words):
        parse(body)


def test_a_full_log_keeps_its_offsets_and_its_errors() -> None:
    log = BuildLog()
    for i in range(MAX_ENTRIES + 5):
        log.add(f"line {i}")
    log.fail("why it failed", "3")
    assert len(log.entries) == MAX_ENTRIES + 1 and log.dropped == 5
    assert log.entries[MAX_ENTRIES - 1].message == f"line {MAX_ENTRIES - 1}"
    assert (log.status, log.reason, log.failed_step) == ("error", "why it failed", "3")


def test_team_template_rootfs_images_are_mounted_again_at_start(tmp_path: Path) -> None:
    """A host restart unmounts them; the node mounts them before any sandbox restores."""
    build_dir = tmp_path / "t1" / "builds" / "b1"
    build_dir.mkdir(parents=True)
    make_rootfs(build_dir, 64 << 20)
    (build_dir / "manifest.json").write_text("{}")
    unfinished = tmp_path / "t1" / "builds" / "b2"  # a build a restart cut short
    unfinished.mkdir()
    make_rootfs(unfinished, 64 << 20)
    running = tmp_path / "t2" / "builds" / "b3"  # another server's build, under way
    running.mkdir(parents=True)
    make_rootfs(running, 64 << 20)
    held = (running / BUILD_LOCK).open("a")
    fcntl.flock(held, fcntl.LOCK_EX)
    try:
        (build_dir / "rootfs" / "hello").write_text("kept")
        subprocess.run(["umount", str(build_dir / "rootfs")], check=True)
        assert not (build_dir / "rootfs" / "hello").exists()
        assert mount_rootfs_images(TemplateStore(tmp_path)) == 1
        assert (build_dir / "rootfs" / "hello").read_text() == "kept"
        assert not unfinished.exists()
        assert (running / "rootfs").is_mount()
        assert mount_rootfs_images(TemplateStore(tmp_path)) == 0
    finally:
        held.close()
        for directory in (build_dir, unfinished, running):
            disk.discard(directory)
    assert not build_dir.exists()


def test_a_build_is_keyed_by_everything_its_result_depends_on() -> None:
    def request(**changes: object) -> dict[str, object]:
        body: dict[str, object] = {
            "fromTemplate": "base", "startCmd": "serve", "readyCmd": "true",
            "steps": [{"type": "RUN", "args": ["apt-get update"]},
                      {"type": "COPY", "args": ["a", "/a"], "filesHash": HASH},
                      {"type": "ENV", "args": ["A", "1"]}],
        }  # fmt: skip
        return {**body, **changes}

    key = parse(request()).key("base/1", "runsc")
    assert parse(request()).key("base/1", "runsc") == key
    assert parse(request(force=False)).key("base/1", "runsc") == key
    assert parse(request()).key("base/2", "runsc") != key  # a rebuilt base
    assert parse(request()).key("base/1", "runsc-2") != key
    assert parse(request(startCmd="serve --debug")).key("base/1", "runsc") != key
    middle = request()
    middle["steps"][1]["filesHash"] = "b" * 64  # type: ignore[index]
    assert parse(middle).key("base/1", "runsc") != key  # the copied files changed
    assert not parse(request()).force
    assert parse(request(force=True)).force
    forced_step = request()
    forced_step["steps"][0]["force"] = True  # type: ignore[index]
    assert not parse(forced_step).force and parse(forced_step).steps[0].force


def test_image_names_go_to_the_mirror_unless_they_name_a_registry() -> None:
    mirror = Registry(mirror="127.0.0.1:3132", insecure=("127.0.0.1:3132",))
    assert mirror.reference("python:3.12") == "docker://127.0.0.1:3132/library/python:3.12"
    assert mirror.reference("team/app:1") == "docker://127.0.0.1:3132/team/app:1"
    assert mirror.reference("ghcr.io/team/app:1") == "docker://ghcr.io/team/app:1"
    assert mirror.reference("localhost/app") == "docker://localhost/app"
    assert Registry().reference("python") == "docker://docker.io/library/python"
    reference = mirror.reference("python:3.12")
    assert mirror.flags(reference, "src-") == ["--src-tls-verify=false", "--src-no-creds"]
    assert mirror.flags(reference) == ["--tls-verify=false", "--no-creds"]
    auth = Path("/run/auth.json")
    assert Registry().flags("docker://docker.io/x", "src-", auth) == [f"--src-authfile={auth}"]
    with Registry(credentials="u:p").authfile(reference) as path:
        assert path is not None and path.stat().st_mode & 0o777 == 0o600
        assert json.loads(path.read_text()) == {"auths": {"127.0.0.1:3132": {"auth": "dTpw"}}}
    assert not path.exists()
    # Pulls run on the host: its loopback and private networks only through the operator.
    asyncio.run(mirror.check_host(reference))

    async def nowhere(name: str) -> list[str]:  # offline here: the pull then says so itself
        return []

    asyncio.run(Registry().check_host("docker://docker.io/library/python", nowhere))
    for private in ("docker://127.0.0.1:5000/x", "docker://10.1.2.3/x", "docker://localhost/x",
                    "docker://[::1]:5000/x", "docker://169.254.169.254/x",
                    "docker://127.1/x"):  # fmt: skip
        with pytest.raises(InvalidArgument, match="operator"):
            asyncio.run(Registry().check_host(private))

    async def rebound(name: str) -> list[str]:  # a public-looking name for a private address
        return ["10.0.0.5"]

    with pytest.raises(InvalidArgument, match=r"\(registry.example is 10.0.0.5\)"):
        asyncio.run(Registry().check_host("docker://registry.example/x", rebound))
    for bad in ("Python", "a b", "../x", "-flag", ""):
        with pytest.raises(InvalidArgument):
            mirror.reference(bad)

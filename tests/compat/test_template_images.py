"""Templates `from_image` of OCI images, pulled through the server's registry mirror: the tests
run a registry of their own (Debian's `docker-registry`, on loopback) and push into it an image
they make from our own debootstrap (umoci, skopeo). Nothing is pulled from a public registry."""

from __future__ import annotations

import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from e2b import BuildException, Sandbox, Template
from e2b.template.logger import LogEntry

from tests.compat.conftest import REGISTRY, Compat
from tests.integration.support import TEMPLATE_DIR
from vivarium.templates.recipe import RECIPES

pytestmark = pytest.mark.timeout(900)
IMAGE = "vivarium-tests/debian:12"  # a name without a registry: the mirror's
BARE = "vivarium-tests/busybox:1"


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("registry")
    config = root / "config.yml"
    config.write_text(f"version: 0.1\nstorage:\n  filesystem:\n    rootdirectory: {root}/data\n"
                      f"http:\n  addr: {REGISTRY}\n")  # fmt: skip
    with (root / "registry.log").open("wb") as log:
        proc = subprocess.Popen(["docker-registry", "serve", str(config)], stdout=log,
                                stderr=subprocess.STDOUT)  # fmt: skip
    try:
        deadline = time.monotonic() + 60  # a hang limit, not a timing assertion
        while True:
            try:
                if httpx.get(f"http://{REGISTRY}/v2/").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, (root / "registry.log").read_text()
            time.sleep(0.1)
        yield REGISTRY
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.fixture(scope="module")
def debian_image(registry: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """Our own debootstrap of Debian 12 (what `make` built the templates from: no guest, no
    `user`), as an image with an ENV and a working directory of its own, pushed to the registry."""
    base = RECIPES["base"]  # the base template's, finished (not the partial one of a build)
    pristine = (
        Path(TEMPLATE_DIR).parent / "cache" / f"debootstrap-{base.suite}-{base.debootstrap_key()}"
    )
    _push(tmp_path_factory.mktemp("oci") / "layout", "12", pristine, registry, IMAGE,
          "--config.env", "IMAGE_MARK=from-registry", "--config.env",
          "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")  # fmt: skip
    return IMAGE


def _push(layout: Path, tag: str, source: Path, registry: str, image: str,
          *config: str) -> None:  # fmt: skip
    for argv in (
        ["umoci", "init", "--layout", str(layout)],
        ["umoci", "new", "--image", f"{layout}:{tag}"],
        ["umoci", "insert", "--image", f"{layout}:{tag}", str(source), "/"],
        ["umoci", "config", "--image", f"{layout}:{tag}", *config],
        ["skopeo", "copy", "--dest-tls-verify=false", f"oci:{layout}:{tag}",
         f"docker://{registry}/{image}"],
    ):  # fmt: skip
        subprocess.run(argv, check=True, capture_output=True, timeout=600)


@pytest.fixture(scope="module")
def bare_image(registry: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """No Python, no glibc, no package manager: static busybox and bash (Debian's), and the
    files a Linux userland cannot do without."""
    rootfs = tmp_path_factory.mktemp("bare") / "rootfs"
    (rootfs / "bin").mkdir(parents=True)
    shutil.copy2("/bin/busybox", rootfs / "bin/busybox")
    shutil.copy2("/bin/bash-static", rootfs / "bin/bash")
    applets = subprocess.run(["/bin/busybox", "--list"], check=True, capture_output=True,
                             text=True).stdout.split()  # fmt: skip
    for applet in applets:
        if not (rootfs / "bin" / applet).exists():
            (rootfs / "bin" / applet).symlink_to("busybox")
    (rootfs / "etc").mkdir()
    (rootfs / "etc/passwd").write_text("root:x:0:0:root:/root:/bin/sh\n")
    (rootfs / "etc/group").write_text("root:x:0:\n")
    for directory in ("root", "tmp", "home"):
        (rootfs / directory).mkdir()
    (rootfs / "tmp").chmod(0o1777)
    _push(rootfs.parent / "layout", "1", rootfs, registry, BARE, "--config.env",
          "PATH=/usr/local/bin:/bin", "--config.env", "IMAGE_MARK=bare")  # fmt: skip
    return BARE


def test_a_template_from_an_image_without_python_or_glibc(compat: Compat, bare_image: str) -> None:
    """envd runs on its own Python, loader and libraries; the image's programs are its own."""
    name = f"bare-{uuid.uuid4().hex[:8]}"
    try:
        Template.build(Template().from_image(bare_image).run_cmd("echo made-here > ~/where.txt"),
                       name)  # fmt: skip
        sbx = Sandbox.create(name)
        try:
            shell = sbx.commands.run(
                "cat where.txt; whoami; echo $IMAGE_MARK; ls /usr/bin/python3 2>/dev/null || "
                "echo no-python; readlink /bin/ls"
            )
            assert shell.stdout.splitlines() == ["made-here", "user", "bare", "no-python",
                                                 "busybox"]  # fmt: skip
            sbx.files.write("/home/user/f.txt", "files work")
            assert sbx.files.read("/home/user/f.txt") == "files work"
            assert sbx.commands.run("sudo id -u").stdout == "0\n"
        finally:
            sbx.kill()
    finally:
        with compat.admin() as http:
            http.delete(f"/templates/{name}")


def test_a_template_from_an_image_of_a_registry(compat: Compat, debian_image: str) -> None:
    name = f"from-image-{uuid.uuid4().hex[:8]}"
    template = Template().from_image(debian_image).run_cmd("echo made-here > ~/where.txt")
    logs: list[LogEntry] = []
    try:
        Template.build(template, name, on_build_logs=logs.append)
        messages = [e.message for e in logs]
        assert any(m.startswith(f"pulling {debian_image}") for m in messages), messages
        assert any(m.startswith("Copying blob") for m in messages), messages  # progress
        sbx = Sandbox.create(name)
        try:
            shell = sbx.commands.run("cat where.txt; whoami; echo $IMAGE_MARK; sudo whoami; "
                                     "hostname; cat /etc/debian_version")  # fmt: skip
            lines = shell.stdout.splitlines()
            assert lines[:5] == ["made-here", "user", "from-registry", "root", "e2b.local"]
            assert lines[5].startswith("12.")
            sbx.files.write("/home/user/f.txt", "files work")  # envd's filesystem, in the image
            assert sbx.files.read("/home/user/f.txt") == "files work"
        finally:
            sbx.kill()
        # A second template from the image does not pull it again.
        again: list[LogEntry] = []
        other = f"from-image-{uuid.uuid4().hex[:8]}"
        Template.build(Template().from_image(debian_image).set_envs({"B": "2"}), other,
                       on_build_logs=again.append)  # fmt: skip
        assert any(e.message.startswith("using the cached") for e in again)
        with compat.admin() as http:
            assert http.delete(f"/templates/{other}").status_code == 204
    finally:
        with compat.admin() as http:
            http.delete(f"/templates/{name}")


def test_an_image_the_registry_does_not_have_fails_saying_which(
    compat: Compat, registry: str
) -> None:
    with pytest.raises(BuildException, match=f"vivarium-tests/nothing:1.*{registry}"):
        Template.build(Template().from_image("vivarium-tests/nothing:1"), "no-such-image")
    with compat.admin() as http:
        http.delete("/templates/no-such-image")


def test_a_registry_on_this_host_or_a_private_network_is_refused(compat: Compat) -> None:
    """Pulls run on the host: a team may not point one at the host's loopback or the
    operator's private network (only the operator's mirror and insecure list are allowed)."""
    for image in ("127.0.0.2:9/team/app:1", "10.1.2.3:5000/team/app:1", "localhost:80/app"):
        with pytest.raises(BuildException, match="registry .* (this host|not a public address)"):
            Template.build(Template().from_image(image), "private-registry")
    with compat.admin() as http:
        http.delete("/templates/private-registry")

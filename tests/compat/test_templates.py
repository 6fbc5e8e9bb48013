"""Custom templates through the official client's Template builder (`Template.build`): files
copied in, commands run as the template's users, environment and working directory kept, and a
start command whose program is already running in every sandbox (it is in the checkpoint)."""

from __future__ import annotations

import os
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from e2b import BuildException, Sandbox, SandboxQuery, Template, wait_for_port
from e2b.template.logger import LogEntry
from e2b.template.utils import calculate_files_hash

from tests.compat.conftest import Compat
from tests.integration.support import VIVARIUM
from vivarium.runtime.bundle import cgroup_path
from vivarium.runtime.cgroups import CGROUP_ROOT
from vivarium.runtime.memory_guard import headroom

pytestmark = pytest.mark.timeout(900)


def _name(what: str) -> str:
    return f"{what}-{uuid.uuid4().hex[:8]}"


@pytest.fixture
def context(tmp_path: Path) -> Path:
    """A build context as a user's project would hold it."""
    (tmp_path / "app" / "sub").mkdir(parents=True)
    (tmp_path / "app" / "index.html").write_text("lesson seven\n")
    (tmp_path / "app" / "sub" / "deep.txt").write_text("deep file\n")
    (tmp_path / "notes.txt").write_text("teacher's notes\n")
    return tmp_path


@pytest.fixture
def built(compat: Compat, context: Path) -> Iterator[tuple[str, list[LogEntry]]]:
    name = _name("lesson")
    template = (
        Template(file_context_path=str(context))
        .from_debian_image()
        .copy("app/", "/home/user/app")
        .copy("notes.txt", "/opt/notes/", user="root", mode=0o600)
        .run_cmd("echo built-by-$(whoami) > /home/user/who.txt")
        .run_cmd("mkdir -p /srv && echo made-by-$(whoami) > /srv/root.txt", user="root")
        .set_envs({"MODE": "lesson", "GREETING": "hello-$MODE"})
        .set_workdir("/home/user/app")
        # The start command leaves a random mark: the same mark in every sandbox shows the
        # program was started once, at build time, and is restored running.
        .set_start_cmd(
            "echo $RANDOM$RANDOM > /tmp/started && exec python3 -m http.server 8000",
            wait_for_port(8000),
        )
    )
    logs: list[LogEntry] = []
    try:
        Template.build(template, name, on_build_logs=logs.append, cpu_count=2, memory_mb=768)
        yield name, logs
    finally:
        with compat.admin() as http:
            http.delete(f"/templates/{name}")


def test_a_template_built_with_the_sdk_starts_with_its_files_settings_and_server(
    compat: Compat, built: tuple[str, list[LogEntry]]
) -> None:
    name, logs = built
    messages = [entry.message for entry in logs]
    assert "[1/6] COPY app/ /home/user/app" in messages, messages  # each step, as it runs
    assert any(m.startswith("waiting until ready") for m in messages), messages
    with compat.admin() as http:
        template_id = http.get(f"/templates/aliases/{name}").json()["templateID"]
    first, second = Sandbox.create(name), Sandbox.create(name)
    try:
        shell = first.commands.run(
            "pwd; whoami; echo $MODE $GREETING; cat index.html sub/deep.txt /home/user/who.txt "
            "/srv/root.txt; stat -c '%U %a' /opt/notes/notes.txt; sudo cat /opt/notes/notes.txt"
        )
        assert shell.stdout.splitlines() == [
            "/home/user/app", "user", "lesson hello-lesson", "lesson seven", "deep file",
            "built-by-user", "made-by-root", "root 600", "teacher's notes",
        ]  # fmt: skip
        # The server is up at once in both, started once (at build time), and serves the files.
        page = first.commands.run("curl -s localhost:8000/index.html")
        assert page.stdout == "lesson seven\n"
        marks = {s.files.read("/tmp/started").strip() for s in (first, second)}
        assert len(marks) == 1 and marks.pop().isdigit()
        assert second.commands.run("curl -s localhost:8000/sub/deep.txt").stdout == "deep file\n"
        info = first.get_info()
        assert info.template_id == template_id
        # The build's sizes are its sandboxes': the node gave them, and holds the sandbox to
        # its 768 MiB (the hard limit sits the guard's headroom above; memory_guard.py).
        assert (info.cpu_count, info.memory_mb) == (2, 768)
        # Named as the team knows it, and found by that name.
        assert info.name == name
        listed = Sandbox.list(query=SandboxQuery(template=name)).next_items()
        assert {s.sandbox_id for s in listed} == {first.sandbox_id, second.sandbox_id}
        from_base = Sandbox.list(query=SandboxQuery(template="base")).next_items()
        assert first.sandbox_id not in {s.sandbox_id for s in from_base}
        with compat.server.client() as node:
            record = node.get(first.sandbox_id)
        assert (record["cpus"], record["memory_mb"]) == (2.0, 768)
        rel = cgroup_path(record["container_id"]).lstrip("/")
        v1 = CGROUP_ROOT / "memory" / rel / "memory.limit_in_bytes"
        hard = v1 if v1.exists() else CGROUP_ROOT / rel / "memory.max"
        assert int(hard.read_text()) == (768 << 20) + headroom(768 << 20)
    finally:
        first.kill()
        second.kill()


def test_a_template_from_a_template_tags_exists_and_delete(
    compat: Compat, built: tuple[str, list[LogEntry]], context: Path
) -> None:
    name, _ = built
    derived = _name("derived")
    logs: list[LogEntry] = []
    template = (
        Template(file_context_path=str(context))
        .from_template(name)
        .copy("notes.txt", "/home/user/notes.txt")
        .run_cmd("cat /home/user/who.txt /home/user/notes.txt > /home/user/both.txt")
    )
    try:
        Template.build(template, derived, on_build_logs=logs.append)
        # Its COPY was uploaded once and is now kept: the next build skips the upload.
        assert "Uploaded 'notes.txt'" in [e.message for e in logs]
        files_hash = calculate_files_hash("notes.txt", "/home/user/notes.txt", str(context), [],
                                          False, None)  # fmt: skip
        with compat.admin() as http:
            tid = http.get(f"/templates/aliases/{derived}").json()["templateID"]
            assert http.get(f"/templates/{tid}/files/{files_hash}").json() == {"present": True}
        sbx = Sandbox.create(derived)
        try:
            assert sbx.files.read("/home/user/both.txt") == "built-by-user\nteacher's notes\n"
        finally:
            sbx.kill()
        assert Template.exists(derived)
        # The same steps again: the kept build is the result, nothing is built.
        again: list[LogEntry] = []
        Template.build(template, derived, on_build_logs=again.append)
        assert any("nothing to build" in e.message for e in again), [e.message for e in again]
        assert not any(e.message.startswith("[1/") for e in again)
        Template.assign_tags(f"{derived}:default", ["stable"])
        assert {t.tag for t in Template.get_tags(derived)} == {"default", "stable"}
        tagged = Sandbox.create(f"{derived}:stable")
        tagged.kill()
        # Another team sees none of it.
        other = compat.new_team(_name("team"))
        assert not Template.exists(derived, api_key=other)
        with httpx.Client(base_url=compat.api_url, headers={"X-API-Key": other}) as http:
            listed = {t["templateID"] for t in http.get("/templates").json()}
            assert "base" in listed and not any(n in listed for n in (name, derived))
        with pytest.raises(Exception, match="not found"):
            Sandbox.create(derived, api_key=other)
    finally:
        with compat.admin() as http:
            assert http.delete(f"/templates/{derived}").status_code == 204
    assert not Template.exists(derived)


def test_a_rebuild_runs_again_from_its_first_changed_step(compat: Compat) -> None:
    """Each step's layer is cached by everything before it: a changed middle step runs again
    with all after it, the steps before it are not run (their random marks stay), and a
    template that starts the same way shares them."""
    name, sibling = _name("layers"), _name("sibling")

    def template(middle: str) -> Template:
        return (
            Template()
            .from_base_image()
            .run_cmd("echo $RANDOM$RANDOM > /home/user/first; rm /home/user/.bashrc")
            .set_envs({"LESSON": "seven"})
            .run_cmd(f"echo {middle} > /home/user/middle")
            .run_cmd("echo $RANDOM$RANDOM > /home/user/last")
        )

    def build(t: Template, alias: str) -> list[str]:
        logs: list[LogEntry] = []
        Template.build(t, alias, on_build_logs=logs.append)
        return [e.message for e in logs]

    def files(alias: str) -> list[str]:
        sbx = Sandbox.create(alias)
        try:
            cmd = "cat first middle last; echo $LESSON; ls -a | grep -c bashrc || true"
            return sbx.commands.run(cmd, cwd="/home/user").stdout.split()
        finally:
            sbx.kill()

    try:
        first = build(template("one"), name)
        assert "[1/4] RUN echo $RANDOM$RANDOM > /home/user/first; rm /home/user/.bashrc" in first
        mark, _, _, lesson, bashrc = before = files(name)
        assert before[1] == "one" and lesson == "seven" and bashrc == "0"  # deleted in a layer
        changed = build(template("two"), name)
        assert any(m.startswith("[1/4] RUN") and m.endswith("(cached)") for m in changed)
        assert "[2/4] ENV LESSON seven (cached)" in changed, changed
        assert "[3/4] RUN echo two > /home/user/middle" in changed, changed
        assert not any(m.startswith("[4/4]") and m.endswith("(cached)") for m in changed)
        after = files(name)
        assert after[:2] == [mark, "two"] and after[2] != before[2] and after[3:] == ["seven", "0"]
        # Another template of the team's that starts the same way: its first steps are cached.
        shared = build(template("three"), sibling)
        assert "[2/4] ENV LESSON seven (cached)" in shared and files(sibling)[0] == mark
        # skip_cache() runs that step and every one after it again.
        forced = build(template("two").skip_cache().run_cmd("true"), sibling)
        assert "[5/5] RUN true" in forced, forced
        assert any(m.startswith("[4/5]") and m.endswith("(cached)") for m in forced)
    finally:
        with compat.admin() as http:
            http.delete(f"/templates/{name}")
            http.delete(f"/templates/{sibling}")


DOCKERFILE = """\
FROM debian:bookworm
COPY greeting.txt /home/user/greeting.txt
RUN echo built-by-$(whoami) > /home/user/built.txt
ENV COLOR=blue
WORKDIR /home/user
"""


def test_the_cli_builds_a_team_template_from_a_dockerfile(compat: Compat, tmp_path: Path) -> None:
    (tmp_path / "Dockerfile").write_text(DOCKERFILE)
    (tmp_path / "greeting.txt").write_text("hi from the cli\n")
    name = _name("cli")
    env = {**os.environ, "VIVARIUM_API_URL": compat.api_url, "VIVARIUM_API_KEY": compat.api_key}
    argv = [VIVARIUM, "template", "build", name, "--dockerfile", str(tmp_path / "Dockerfile"),
            "--start-cmd", "sleep infinity"]  # fmt: skip
    try:
        first = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
        assert first.returncode == 0, first.stdout + first.stderr
        output = first.stdout + first.stderr
        assert "COPY greeting.txt /home/user/greeting.txt" in output, output  # its logs, live
        build_id = first.stdout.strip().splitlines()[-1]
        sbx = Sandbox.create(name)
        try:
            run = sbx.commands.run("cat greeting.txt built.txt; echo $COLOR; pgrep -x sleep")
            lines = run.stdout.split()
            assert lines[:4] == ["hi", "from", "the", "cli"] and lines[4:6] == ["built-by-root",
                                                                                "blue"]  # fmt: skip
        finally:
            sbx.kill()
        again = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=600)
        assert again.returncode == 0 and again.stdout.strip().splitlines()[-1] != build_id
        assert "nothing to build" in again.stdout + again.stderr
        broken = tmp_path / "Broken"
        broken.write_text("FROM debian:bookworm\nRUN exit 7\n")
        failed = subprocess.run([*argv[:4], "-f", str(broken)], env=env, capture_output=True,
                                text=True, timeout=600)  # fmt: skip
        assert failed.returncode == 1 and "the build failed" in failed.stderr, failed.stderr
        assert "exit" in failed.stderr and "Traceback" not in failed.stderr
    finally:
        with compat.admin() as http:
            http.delete(f"/templates/{name}")


def test_a_failing_step_fails_the_build_with_its_output(compat: Compat) -> None:
    name = _name("broken")
    template = (
        Template()
        .from_base_image()
        .run_cmd("echo before; sleep 3")
        .run_cmd("echo the-reason >&2; exit 3")
    )
    logs: list[LogEntry] = []
    refused: list[int] = []

    def delete_while_building(entry: LogEntry) -> None:
        logs.append(entry)
        if entry.message == "before" and not refused:  # the build is under way
            with compat.admin() as http:
                refused.append(http.delete(f"/templates/{name}").status_code)

    with pytest.raises(BuildException, match="step 2 failed") as failure:
        Template.build(template, name, on_build_logs=delete_while_building)
    assert "the-reason" in str(failure.value)
    assert refused == [409]  # not deleted under its build
    assert any(e.message == "before" for e in logs)
    with pytest.raises(Exception, match="no finished build"):
        Sandbox.create(name)
    with compat.admin() as http:
        assert http.delete(f"/templates/{name}").status_code == 204


def test_steps_reach_registries_with_the_hosts_ca_which_the_template_does_not_keep(
    compat: Compat,
) -> None:
    """The compat server's build CA bundle is the fake internet's CA (as a TLS-intercepting
    proxy's would be in a host's store): a step's curl verifies the server with it."""
    name = _name("host-ca")
    template = (
        Template()
        .from_base_image()
        .run_cmd("curl -sS https://pkg.example.test/ > /home/user/fetched.json")
    )
    try:
        Template.build(template, name)
        sbx = Sandbox.create(name)
        try:
            assert '"local"' in sbx.files.read("/home/user/fetched.json")  # the echo's reply
            kept = sbx.commands.run("echo ${PIP_CERT:-none} ${CURL_CA_BUNDLE:-none} "
                                    "${GIT_SSL_CAINFO:-none}; "
                                    "ls /.vivarium-host-ca.crt 2>&1 || true")  # fmt: skip
            assert kept.stdout.splitlines()[0] == "none none none"
            assert "No such file" in kept.stdout
        finally:
            sbx.kill()
    finally:
        with compat.admin() as http:
            http.delete(f"/templates/{name}")


def test_a_team_over_its_build_limit_is_refused_with_429(compat: Compat) -> None:
    names = [_name("limit") for _ in range(3)]
    body = {"fromTemplate": "base", "steps": [{"type": "RUN", "args": ["sleep 4"]}]}
    with compat.admin() as http:
        builds = [http.post("/v3/templates", json={"name": n}).json() for n in names]
        started = [http.post(f"/v2/templates/{b['templateID']}/builds/{b['buildID']}", json=body)
                   for b in builds]  # fmt: skip
        assert [r.status_code for r in started[:2]] == [202, 202]
        assert started[2].status_code == 429, started[2].text
        assert "2 builds under way" in started[2].json()["message"]
        for b in builds[:2]:
            for _ in range(600):
                status = http.get(f"/templates/{b['templateID']}/builds/{b['buildID']}/status")
                if status.json()["status"] in ("ready", "error"):
                    break
                time.sleep(0.2)
            assert status.json()["status"] == "ready", status.text
        for b in builds:
            assert http.delete(f"/templates/{b['templateID']}").status_code == 204


def test_a_step_that_fills_its_disk_fails_with_why(compat: Compat) -> None:
    name = _name("full")
    # The compat server gives a step 300 MiB (VIVARIUM_BUILD_DISK_MB; 10 GiB by default).
    template = Template().from_base_image().run_cmd("head -c 400M /dev/zero > /home/user/big")
    with pytest.raises(BuildException, match="step 1 failed") as failure:
        Template.build(template, name)
    assert "No space left on device" in str(failure.value)
    with compat.admin() as http:
        assert http.delete(f"/templates/{name}").status_code == 204


def test_a_step_that_runs_forever_is_stopped(compat: Compat) -> None:
    name = _name("forever")
    # The compat server stops a step after 15 s (VIVARIUM_BUILD_STEP_TIMEOUT; 1 h by default).
    with pytest.raises(BuildException, match="step 1 ran for more than 15 s"):
        Template.build(Template().from_base_image().run_cmd("sleep 100000"), name)
    with compat.admin() as http:
        assert http.delete(f"/templates/{name}").status_code == 204


def test_a_ready_command_that_never_succeeds_fails_the_build(compat: Compat) -> None:
    name = _name("never-ready")
    template = Template().from_base_image().set_start_cmd("echo warming-up; sleep infinity",
                                                          "test -e /tmp/never")  # fmt: skip
    logs: list[LogEntry] = []
    # The compat server's default: its 15 s step timeout (300 s on a real node).
    with pytest.raises(BuildException, match="did not succeed within 15 s"):
        Template.build(template, name, on_build_logs=logs.append)
    assert "start command: warming-up" in [e.message for e in logs]  # what it said
    # A build body's readyTimeout (ours; the official client sends none) sets it.
    with compat.admin() as http:
        made = http.post("/v3/templates", json={"name": name}).json()
        tid, bid = made["templateID"], made["buildID"]
        body = {"fromTemplate": "base", "startCmd": "sleep infinity", "readyCmd": "false",
                "readyTimeout": 2}  # fmt: skip
        assert http.post(f"/v2/templates/{tid}/builds/{bid}", json=body).status_code == 202
        for _ in range(600):
            status = http.get(f"/templates/{tid}/builds/{bid}/status").json()
            if status["status"] in ("ready", "error"):
                break
            time.sleep(0.2)
        assert status["status"] == "error"
        assert "did not succeed within 2 s" in status["reason"]["message"], status
        assert http.delete(f"/templates/{tid}").status_code == 204


def test_bad_build_requests(compat: Compat) -> None:
    with compat.admin() as http:
        assert http.post("/v3/templates", json={"name": "Not A Name"}).status_code == 400
        assert http.post("/v3/templates", json={"name": "base"}).status_code == 400
        made = http.post("/v3/templates", json={"name": _name("bad")}).json()
        tid, bid = made["templateID"], made["buildID"]
        start = f"/v2/templates/{tid}/builds/{bid}"
        cases = [
            ({"fromImage": "python:3.12", "fromImageRegistry": {"type": "gcp"}}, 400,
             "only type"),
            ({"fromImage": "debian:stable", "fromTemplate": "base"}, 400, "exactly one"),
            ({"fromTemplate": "base", "steps": [{"type": "FROB", "args": []}]}, 400, "type"),
            ({"fromTemplate": "base", "steps": [{"type": "COPY", "args": ["a", "/b"]}]}, 400,
             "filesHash"),
            ({"fromTemplate": "base", "steps": [{"type": "ENV", "args": ["A"]}]}, 400, "pairs"),
            ({"fromTemplate": "base", "readyTimeout": 0}, 400, "readyTimeout"),
            ({"fromTemplate": "no-such-template"}, 404, "not found"),
        ]  # fmt: skip
        for body, status, words in cases:
            response = http.post(start, json=body)
            assert response.status_code == status, (body, response.text)
            assert words in response.json()["message"], response.text
        link = http.get(f"/templates/{tid}/files/{'0' * 64}")
        assert link.status_code == 201 and link.json()["present"] is False
        url = link.json()["url"]
        forged = url.replace("token=", "token=0")
        assert httpx.put(forged, content=b"x").status_code == 401
        extended = url.replace("expires=", "expires=9")  # the expiry is signed too
        assert httpx.put(extended, content=b"x").status_code == 401
        assert http.get(f"/templates/{tid}/files/not-a-hash").status_code == 400
        assert http.get(f"/templates/{tid}/builds/{uuid.uuid4()}/status").status_code == 404
        assert http.get("/templates/nobody-has-this/builds/x/status").status_code == 404
        assert http.delete(f"/templates/{tid}").status_code == 204
        # A link outlives nothing: the deleted template's files would be kept for nobody.
        assert httpx.put(url, content=b"x").status_code == 404

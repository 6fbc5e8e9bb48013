"""Snapshots of running sandboxes and forks, through the official client: a teacher snapshots a
prepared lesson and starts students from it; an agent forks a sandbox to try fixes side by side.
What lives in memory (a counting process) carries on in every sandbox started from a snapshot,
the source keeps running, and the copies diverge."""

from __future__ import annotations

import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from e2b import Sandbox, SandboxException
from e2b.exceptions import RateLimitException
from e2b_code_interpreter import Sandbox as CodeSandbox

from tests.compat.conftest import Compat

pytestmark = pytest.mark.timeout(600)

# Rewrites its file whole, so that a read never meets it half-written.
COUNTER = ("bash -c 'n=0; while true; do n=$((n+1)); echo $n > /tmp/count.new; "
           "mv /tmp/count.new /tmp/count; sleep 0.1; done'")  # fmt: skip


def _count(sandbox: Sandbox) -> int:
    return int(sandbox.files.read("/tmp/count").strip())


def _counting(sandbox: Sandbox) -> int:
    """Start the counter and return once it has counted a little."""
    sandbox.commands.run(COUNTER, background=True, timeout=0)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if (n := _count(sandbox)) >= 5:
                return n
        except Exception:
            pass
        time.sleep(0.1)
    raise AssertionError("the counter did not start")


def _carries_on(sandbox: Sandbox, at_least: int) -> None:
    """The counter kept its value (it did not start again from 1) and still counts."""
    first = _count(sandbox)
    assert first >= at_least, (sandbox.sandbox_id, first, at_least)
    deadline = time.monotonic() + 20
    while _count(sandbox) <= first:
        assert time.monotonic() < deadline, f"{sandbox.sandbox_id}: the counter stopped"
        time.sleep(0.1)


def _status(call: object) -> int:
    try:
        call()  # type: ignore[operator]
    except SandboxException as exc:
        return int(getattr(exc, "status_code", 0))
    raise AssertionError("the call succeeded")


def test_a_snapshot_starts_sandboxes_that_carry_on_its_processes(compat: Compat) -> None:
    source = Sandbox.create(timeout=120)
    name = f"lesson-{uuid.uuid4().hex[:8]}"
    try:
        source.files.write("/home/user/lesson.txt", "prepared")
        before = _counting(source)
        info = source.create_snapshot(name=name)
        assert info.snapshot_id and info.names == [name]
        # The source keeps running: the same sandbox, its counter going on from where it was.
        assert source.is_running()
        _carries_on(source, before)
        listed = [s.snapshot_id for s in Sandbox.list_snapshots(sandbox_id=source.sandbox_id)
                  .next_items()]  # fmt: skip
        assert listed == [info.snapshot_id]
        assert [s.snapshot_id for s in Sandbox.list_snapshots(name=name).next_items()] == listed
    finally:
        source.kill()
    # It outlives its source. Three at once, by id and by name.
    with ThreadPoolExecutor(3) as pool:
        students = list(pool.map(lambda ref: Sandbox.create(ref, timeout=120),
                                 [info.snapshot_id, info.snapshot_id, name]))  # fmt: skip
    try:
        ids = {s.sandbox_id for s in students}
        assert len(ids) == 3 and source.sandbox_id not in ids
        for i, student in enumerate(students):
            _carries_on(student, before)
            assert student.files.read("/home/user/lesson.txt") == "prepared"
            assert student.commands.run("echo $E2B_SANDBOX_ID").stdout.strip() == student.sandbox_id
            student.files.write("/home/user/lesson.txt", f"student {i}")
        # Each diverged on its own.
        assert [s.files.read("/home/user/lesson.txt") for s in students] == [
            "student 0", "student 1", "student 2"
        ]  # fmt: skip
    finally:
        for student in students:
            student.kill()
    assert Sandbox.delete_snapshot(info.snapshot_id) is True
    assert Sandbox.delete_snapshot(info.snapshot_id) is False
    assert _status(lambda: Sandbox.create(name, timeout=30)) == 404
    assert not list((compat.server.state_dir / "snapshots").glob(info.snapshot_id))


def test_a_name_taken_again_gives_its_snapshot_new_contents(compat: Compat) -> None:
    source = Sandbox.create(timeout=120)
    name = f"step-{uuid.uuid4().hex[:8]}"
    try:
        source.files.write("/home/user/step.txt", "one")
        first = source.create_snapshot(name=name)
        source.files.write("/home/user/step.txt", "two")
        second = source.create_snapshot(name=name)
        assert second.snapshot_id == first.snapshot_id
        assert len(Sandbox.list_snapshots(name=name).next_items()) == 1
    finally:
        source.kill()
    student = Sandbox.create(name, timeout=60)
    try:
        assert student.files.read("/home/user/step.txt") == "two"
    finally:
        student.kill()
        Sandbox.delete_snapshot(first.snapshot_id)


def test_what_follows_a_snapshot_waits_for_its_source_to_run_again(compat: Compat) -> None:
    # create_snapshot answers once the snapshot is sealed, perhaps before its source is
    # restored: a pause at once (no request to the sandbox in between) waits for that restore,
    # and takes a sandbox that runs, its counter included.
    source = Sandbox.create(timeout=120)
    try:
        before = _counting(source)
        info = source.create_snapshot()
        assert source.pause()
        back = Sandbox.connect(source.sandbox_id, timeout=120)
        _carries_on(back, before)
        assert Sandbox.delete_snapshot(info.snapshot_id) is True
    finally:
        source.kill()


def test_fork_children_carry_on_the_parent_and_diverge(compat: Compat) -> None:
    parent = Sandbox.create(timeout=120, metadata={"task": "fix-bug"})
    try:
        parent.files.write("/home/user/attempt.txt", "none yet")
        before = _counting(parent)
        children = parent.fork(count=3, timeout=90)
        assert all(isinstance(c, Sandbox) for c in children), children
        forks = [c for c in children if isinstance(c, Sandbox)]
        try:
            assert len({c.sandbox_id for c in forks} | {parent.sandbox_id}) == 4
            _carries_on(parent, before)  # the parent keeps its id and its processes
            for i, child in enumerate(forks):
                _carries_on(child, before)
                assert child.get_info().metadata == {"task": "fix-bug"}
                child.files.write("/home/user/attempt.txt", f"fix {i}")
            assert parent.files.read("/home/user/attempt.txt") == "none yet"
            assert [c.files.read("/home/user/attempt.txt") for c in forks] == [
                "fix 0", "fix 1", "fix 2"
            ]  # fmt: skip
        finally:
            for child in forks:
                child.kill()
    finally:
        parent.kill()
    # A fork's snapshot is gone once its children started.
    assert not list((compat.server.state_dir / "snapshots").glob("fork_*"))


def test_forks_and_snapshots_draw_fresh_random_numbers(compat: Compat) -> None:
    """Kernels live in the snapshot: each sandbox started from one reseeds them."""
    code = "import random\nprint(random.getrandbits(64))"
    parent = CodeSandbox.create(timeout=120)
    started: list[CodeSandbox] = []
    try:
        parent.run_code("import random")
        children = parent.fork(count=2, timeout=90)
        started += [c for c in children if isinstance(c, CodeSandbox)]
        snapshot = parent.create_snapshot()
        started.append(CodeSandbox.create(snapshot.snapshot_id, timeout=90))
        assert len(started) == 3, children
        draws = ["".join(s.run_code(code).logs.stdout).strip() for s in [parent, *started]]
        assert len(set(draws)) == 4, draws
        Sandbox.delete_snapshot(snapshot.snapshot_id)
    finally:
        for sandbox in [parent, *started]:
            sandbox.kill()


def test_bad_snapshot_and_fork_requests_lose_nothing(compat: Compat) -> None:
    source = Sandbox.create(timeout=120)
    other_key = compat.new_team(f"other-{uuid.uuid4().hex[:6]}", max_sandboxes=2)
    other = httpx.Client(base_url=compat.api_url, headers={"X-API-Key": other_key}, timeout=60)
    mine = compat.admin()
    try:
        path = f"/sandboxes/{source.sandbox_id}"
        assert mine.post(path + "/snapshots", json={"memory": "no"}).status_code == 400
        assert mine.post(path + "/snapshots", json={"name": "base"}).status_code == 400
        assert mine.post(path + "/snapshots", json={"name": "Not A Name"}).status_code == 400
        for count in (0, -1, 21, "two"):
            response = mine.post(path + "/fork", json={"count": count})
            assert response.status_code == 400, (count, response.text)
        # Another team neither snapshots, forks nor starts from what is ours.
        assert other.post(path + "/snapshots", json={}).status_code == 404
        assert other.post(path + "/fork", json={"count": 1}).status_code == 404
        snapshot = source.create_snapshot()
        body = {"templateID": snapshot.snapshot_id, "timeout": 30}
        assert other.post("/v2/sandboxes", json=body).status_code == 404
        assert other.delete(f"/templates/{snapshot.snapshot_id}").status_code == 404
        unknown = {"templateID": "sunknownsnapshot"}
        assert mine.post("/v2/sandboxes", json=unknown).status_code == 404
        # Over the team's limit (2) the whole fork is refused, and no child is left behind.
        theirs = Sandbox.create(timeout=60, api_key=other_key)
        with pytest.raises(RateLimitException):
            theirs.fork(count=2)
        assert [s.sandbox_id for s in Sandbox.list(api_key=other_key).next_items()] == [
            theirs.sandbox_id
        ]  # fmt: skip
        theirs.kill()
        # A paused sandbox cannot be snapshotted or forked; a killed one is not found.
        source.pause()
        assert mine.post(path + "/snapshots", json={}).status_code == 409
        assert mine.post(path + "/fork", json={}).status_code == 409
        source.connect()
        assert source.commands.run("echo alive").stdout == "alive\n"
        source.kill()
        assert mine.post(path + "/snapshots", json={}).status_code == 404
        # The snapshot is untouched by all of it.
        student = Sandbox.create(snapshot.snapshot_id, timeout=30)
        assert student.commands.run("echo alive").stdout == "alive\n"
        student.kill()
        Sandbox.delete_snapshot(snapshot.snapshot_id)
    finally:
        source.kill()
        other.close()
        mine.close()


def test_deleting_a_snapshot_while_sandboxes_start_from_it(compat: Compat) -> None:
    source = Sandbox.create(timeout=120)
    try:
        source.files.write("/home/user/kept.txt", "kept")
        snapshot = source.create_snapshot()
    finally:
        source.kill()

    def start() -> Sandbox | int:
        try:
            return Sandbox.create(snapshot.snapshot_id, timeout=60)
        except SandboxException as exc:
            return int(getattr(exc, "status_code", 0))

    with ThreadPoolExecutor(4) as pool:
        starting = [pool.submit(start) for _ in range(4)]
        time.sleep(0.3)  # some are on their way to the node, maybe all
        assert Sandbox.delete_snapshot(snapshot.snapshot_id) is True
        results = [f.result() for f in starting]
    # Each start either began before the delete (and got a whole sandbox) or found no snapshot.
    for result in results:
        if isinstance(result, Sandbox):
            assert result.files.read("/home/user/kept.txt") == "kept"
            result.kill()
        else:
            assert result == 404, results
    assert _status(lambda: Sandbox.create(snapshot.snapshot_id, timeout=30)) == 404
    assert not list((compat.server.state_dir / "snapshots").glob(snapshot.snapshot_id))


def _serving(sandbox: Sandbox, text: str) -> None:
    """A web server on port 8000 inside, answering `text`."""
    sandbox.files.write("/home/user/www/index.html", text)
    sandbox.commands.run(
        "cd /home/user/www && python3 -m http.server 8000", background=True, timeout=0
    )
    probe = "curl -sf http://127.0.0.1:8000/index.html"
    deadline = time.monotonic() + 30
    while sandbox.commands.run(probe + " || true").stdout != text:
        assert time.monotonic() < deadline, "the web server did not start"
        time.sleep(0.2)


def test_traffic_resumes_a_paused_auto_resume_sandbox(compat: Compat) -> None:
    """As E2B's proxy: a request to any port of a paused sandbox made with auto_resume resumes
    it and is then served; one made without gets E2B's 409 and stays paused."""
    woken = Sandbox.create(timeout=120, lifecycle={"on_timeout": "pause", "auto_resume": True})
    plain = Sandbox.create(timeout=120, lifecycle={"on_timeout": "pause"})
    try:
        assert woken.get_info().lifecycle == {"on_timeout": "pause", "auto_resume": True}
        for sandbox in (woken, plain):
            _serving(sandbox, f"hello from {sandbox.sandbox_id}")
            sandbox.pause()

        def get(sandbox: Sandbox) -> httpx.Response:
            headers = {"E2b-Sandbox-Id": sandbox.sandbox_id, "E2b-Sandbox-Port": "8000"}
            return httpx.get(f"{compat.sandbox_url}/index.html", headers=headers, timeout=120)

        response = get(woken)
        assert response.status_code == 200 and response.text == f"hello from {woken.sandbox_id}"
        assert woken.get_info().state.value == "running"
        response = get(plain)
        assert response.status_code == 409 and response.json()["canAutoResume"] is False
        assert plain.get_info().state.value == "paused"
        # envd's port too: the client's next command resumes it.
        woken.pause()
        assert woken.commands.run("echo back").stdout == "back\n"
        # Racing a kill: whichever comes first, a killed sandbox stays killed.
        woken.pause()
        with ThreadPoolExecutor(1) as pool:
            request = pool.submit(get, woken)
            Sandbox.kill(woken.sandbox_id)
            assert request.result().status_code in (200, 404, 502)
        assert woken.sandbox_id not in {s.sandbox_id for s in Sandbox.list().next_items()}
        assert not woken.is_running()
    finally:
        woken.kill()
        plain.kill()

"""The warm pool (node/warm.py), through the official client and the node socket: each claim is
a sandbox of its own, warm ones are nobody's, a restart leaks none, refills never hold up a
user's start, and a full node gives up warm ones before it refuses a user."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from e2b import Sandbox

from tests.integration.support import (
    IDLE_SLACK_NS,
    INET_PORT,
    TEMPLATE_DIR,
    Server,
    containers,
    http_code,
    running_server,
    sdk_options,
    slacks_seen_during,
    timer_slacks,
)
from vivarium.runtime.cgroups import DEFAULT_TIMER_SLACK_NS

pytestmark = pytest.mark.timeout(900)

API_PORT = 3127  # proxy on API_PORT + 1000
PREFIX, CIDR = "vh", "10.249.0.0/24"
POOL = 3


def until(condition: Callable[[], bool], what: str, seconds: float = 240) -> None:
    """Background work (refills, teardowns) is waited for, not timed: a loaded host is slow."""
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not seen within {seconds:g}s: {what}")
        time.sleep(0.2)


def warm(srv: Server) -> dict[str, Any]:
    with srv.client() as client:
        info: dict[str, Any] = client.info()
    return info


def full(srv: Server, size: int = POOL) -> bool:
    """The pool holds `size`, and killed sandboxes are torn down."""
    info = warm(srv)
    return bool(info["warm"]["ready"].get("base") == size and not info["settling"])


@pytest.fixture(scope="module")
def server(inet_host: str) -> Iterator[Server]:
    # One start permit: a refill that took it would make a user's start wait (see below).
    with running_server("warm", PREFIX, CIDR, API_PORT, warm_pool=f"base={POOL}",
                        max_starting="1", egress_allow=f"{inet_host}/32") as srv:  # fmt: skip
        until(lambda: full(srv), f"a pool of {POOL}")
        yield srv


def run(sbx: Sandbox, cmd: str) -> str:
    return str(sbx.commands.run(cmd, timeout=60).stdout).strip()


def test_each_claim_is_a_sandbox_of_its_own(server: Server) -> None:
    opts = sdk_options(server)
    claims = warm(server)["warm"]["claims"]
    boxes = [Sandbox.create(envs={"WHO": f"user{i}"}, timeout=120, **opts) for i in range(POOL)]
    try:
        assert warm(server)["warm"]["claims"] == claims + POOL  # all three were warm ones
        ids = {b.sandbox_id for b in boxes}
        tokens = {b._envd_access_token for b in boxes}
        assert len(ids) == len(tokens) == POOL and None not in tokens
        seen = [run(b, "echo $WHO; cat /etc/machine-id; head -c 16 /dev/urandom | od -An -tx1;"
                       "python3 -c 'import random; print(random.getrandbits(64))'; date +%s")
                for b in boxes]  # fmt: skip
        rows = [s.splitlines() for s in seen]
        assert [r[0] for r in rows] == [f"user{i}" for i in range(POOL)]  # its own env, no other
        for column in (1, 2, 3):  # machine id, kernel randomness, a fresh process's randomness
            assert len({r[column] for r in rows}) == POOL, column
        for r in rows:  # the clock is the host's, not the checkpoint's
            assert abs(int(r[4]) - time.time()) < 120
        # A sandbox's envd takes only its own token: not a sibling's.
        first, second = boxes[0], boxes[1]
        url = f"{opts['sandbox_url']}/envs"
        headers = {"E2b-Sandbox-Id": second.sandbox_id, "E2b-Sandbox-Port": "49983"}
        with httpx.Client(timeout=30) as http:
            theirs = http.get(
                url, headers={**headers, "X-Access-Token": str(first._envd_access_token)}
            )
            own = http.get(
                url, headers={**headers, "X-Access-Token": str(second._envd_access_token)}
            )
        assert theirs.status_code == 401 and own.status_code == 200
        assert own.json()["WHO"] == "user1"
    finally:
        for b in boxes:
            b.kill()


def test_warm_sandboxes_wait_with_coarse_timers_and_a_claim_makes_them_precise(
    server: Server,
) -> None:
    until(lambda: full(server), f"a pool of {POOL}")
    waiting = warm(server)["warm"]["containers"]
    assert all(timer_slacks(c) == {IDLE_SLACK_NS} for c in waiting)  # node/idle_timers.py
    made: list[Sandbox] = []
    # Watched while the create runs: precise for a second after the claim (a loaded host may
    # answer later).
    seen = slacks_seen_during(
        waiting, lambda: made.append(Sandbox.create(timeout=120, **sdk_options(server)))
    )
    try:
        with server.client() as client:
            container_id = client.get(made[0].sandbox_id)["container_id"]
        assert container_id in waiting
        assert {DEFAULT_TIMER_SLACK_NS} in seen[container_id]
    finally:
        made[0].kill()


def test_a_claim_gets_the_egress_it_asks_for(server: Server, inet_host: str) -> None:
    """Warm sandboxes wait with egress open, as most creates want it: a create without internet
    must get it closed."""
    until(lambda: full(server), "the pool refilled")
    claims = warm(server)["warm"]["claims"]
    url = f"http://{inet_host}:{INET_PORT}/"
    with server.client() as client:
        online = client.create(template="base", timeout=120)["sandbox_id"]
        offline = client.create(template="base", timeout=120,
                                allow_internet_access=False)["sandbox_id"]  # fmt: skip
        try:
            assert warm(server)["warm"]["claims"] == claims + 2
            assert http_code(client, online, url) == "200"
            assert http_code(client, offline, url) == "000"
        finally:
            client.kill(online)
            client.kill(offline)


def test_warm_sandboxes_are_in_no_list(server: Server) -> None:
    until(lambda: full(server), "the pool refilled")
    opts = sdk_options(server)
    sbx = Sandbox.create(timeout=120, **opts)
    try:
        listed = [s.sandbox_id for s in Sandbox.list(**opts).next_items()]
        assert listed == [sbx.sandbox_id]
        with httpx.Client(base_url=opts["api_url"], timeout=30,
                          headers={"X-API-Key": opts["api_key"]}) as http:  # fmt: skip
            rows = http.get("/v2/sandboxes", params={"state": "running,paused"}).json()
        assert [r["sandboxID"] for r in rows] == [sbx.sandbox_id]
        with server.client() as client:
            (record,) = client.list_sandboxes()
        assert record["sandbox_id"] == sbx.sandbox_id
        until(lambda: full(server), "the pool refilled")
        # The claimed one keeps its container (warm-…); the others are the pool, listed nowhere.
        unlisted = set(containers(server.state_dir)) - {record["container_id"]}
        assert unlisted == set(warm(server)["warm"]["containers"]) and len(unlisted) == POOL
    finally:
        sbx.kill()


def test_a_dead_warm_sandbox_is_replaced_not_handed_out(server: Server) -> None:
    until(lambda: full(server), "the pool refilled")
    dead = warm(server)["warm"]["dead"]
    pooled = warm(server)["warm"]["containers"]
    assert len(pooled) == POOL
    for cid in pooled:
        server_runsc(server, "kill", "--all", cid, "KILL")
    until(lambda: not set(pooled) & set(containers(server.state_dir, running=True)),
          "the killed sandboxes stopped", 60)  # fmt: skip
    sbx = Sandbox.create(timeout=120, **sdk_options(server))
    try:
        assert run(sbx, "echo alive") == "alive"
        with server.client() as client:  # a live one: restored, or a warm one made since
            assert client.get(sbx.sandbox_id)["container_id"] not in pooled
    finally:
        sbx.kill()
    until(lambda: warm(server)["warm"]["dead"] >= dead + POOL, "the dead ones noticed")
    until(lambda: full(server), "the pool refilled with live ones")


def test_refills_never_make_a_user_start_wait(server: Server) -> None:
    """With one start permit, a refill that took it would make a create wait (counted as
    `starts_waited`). Creates that bypass the pool (other memory) are started while it refills
    (counted as `starts_beside_refill`), until one did."""
    with server.client() as client:
        until(lambda: full(server), "the pool refilled")
        made = []
        for _ in range(2):  # each claim starts a refill; a restore of ours runs beside it
            made.append(client.create(template="base", timeout=120)["sandbox_id"])
        before = warm(server)
        for _ in range(5):
            until(lambda: warm(server)["warm"]["filling"] == 1, "a refill under way", 60)
            made.append(client.create(template="base", timeout=120, memory_mb=512)["sandbox_id"])
            if warm(server)["starts_beside_refill"] > before["starts_beside_refill"]:
                break
        after = warm(server)
        for sandbox_id in made:
            client.kill(sandbox_id)
    assert after["starts_beside_refill"] > before["starts_beside_refill"]
    assert after["starts_waited"] == before["starts_waited"]


def test_a_restart_with_a_full_pool_leaks_nothing(server: Server) -> None:
    until(lambda: full(server), "the pool refilled")
    # A clean stop removes the warm ones; a crash leaves them for the next start to remove.
    server.stop()
    assert [c for c in containers(server.state_dir) if c.startswith("warm-")] == []
    server.start()
    until(lambda: full(server), "the pool refilled")
    left = [c for c in containers(server.state_dir) if c.startswith("warm-")]
    server.stop(signal.SIGKILL)
    server.start()
    until(lambda: full(server), "the pool refilled")
    now = [c for c in containers(server.state_dir) if c.startswith("warm-")]
    assert len(now) == POOL and not set(now) & set(left)  # the old ones are gone, not adopted
    info = warm(server)
    assert info["sandboxes"] == 0 and info["slots_in_use"] == POOL


def test_a_full_node_gives_up_warm_sandboxes_before_refusing(server: Server) -> None:
    """max_sandboxes 5, max_starting 1: the pool fills to 3 of the 4 it may hold, and users
    who need more room get it from the pool."""
    server.stop()
    server.env.update(VIVARIUM_MAX_SANDBOXES="5")
    server.start()
    with server.client() as client:
        until(lambda: full(server), "the pool refilled")
        # Other memory: none of these can be a warm one, so each needs room of its own.
        made = [client.create(template="base", timeout=120, memory_mb=512)["sandbox_id"]
                for _ in range(5)]  # fmt: skip
        assert warm(server)["warm"]["ready"]["base"] == 0
        with pytest.raises(Exception, match="maximum of 5"):
            client.create(template="base", timeout=120, memory_mb=512)
        for sandbox_id in made:
            client.kill(sandbox_id)
    until(lambda: full(server), "the pool refilled once there was room")
    # The module's last use of this server: it stops at the end with this limit.


def server_runsc(srv: Server, *args: str) -> None:
    subprocess.run(["runsc", "--root", str(srv.state_dir / "runsc"), *args], check=True,
                   capture_output=True, timeout=60)  # fmt: skip


def test_a_rebuilt_template_drains_its_pool(tmp_path: Path) -> None:
    """A template directory of its own whose `base` is the shared build; a "rebuild" publishes
    a second build (the same checkpoint under a new build id) and switches `current` to it."""
    shared = (Path(TEMPLATE_DIR) / "base" / "current").resolve()
    builds = tmp_path / "templates" / "base" / "builds"
    builds.mkdir(parents=True)
    (builds / "old").symlink_to(shared)
    (tmp_path / "templates" / "base" / "current").symlink_to("builds/old")
    with running_server("rebuild", "vg", "10.250.0.0/24", 3128, warm_pool="base=2",
                        template_dir=str(tmp_path / "templates")) as srv:  # fmt: skip
        until(lambda: full(srv, 2), "a pool of 2")
        old = set(warm(srv)["warm"]["containers"])
        new = builds / "new"
        new.mkdir()
        (new / "rootfs").symlink_to(shared / "rootfs")  # spec.json names the shared one anyway
        shutil.copytree(shared / "checkpoint", new / "checkpoint")
        shutil.copy(shared / "spec.json", new / "spec.json")
        manifest = json.loads((shared / "manifest.json").read_text())
        (new / "manifest.json").write_text(json.dumps({**manifest, "build_id": "new"}))
        (tmp_path / "templates" / "base" / "next").symlink_to("builds/new")
        (tmp_path / "templates" / "base" / "next").rename(
            tmp_path / "templates" / "base" / "current"
        )
        # A refill that read `current` just before the switch may still add one of the old
        # build: it is never handed out, and goes at the next round.
        until(lambda: full(srv, 2) and warm(srv)["warm"]["builds"] == {"base": ["new"]}
              and not old & set(warm(srv)["warm"]["containers"]),
              "the old build's warm sandboxes replaced")  # fmt: skip
        claims = warm(srv)["warm"]["claims"]
        with srv.client() as client:
            created = client.create(template="base", timeout=120)
            client.kill(created["sandbox_id"])
        assert created["build_id"] == "new" and warm(srv)["warm"]["claims"] == claims + 1

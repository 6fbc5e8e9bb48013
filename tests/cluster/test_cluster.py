"""Several hosts on one machine (support.py): 3 node agents, 2 API replicas and 1 proxy, each in
a network namespace of its own, over a real PostgreSQL, driven by the official client."""

from __future__ import annotations

import contextlib
import http.client as http_client
import secrets
import subprocess
import threading
import time
import urllib.parse
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import boto3
import httpx
import pytest
from e2b import Sandbox, Template, Volume

from tests.cluster.support import (
    API_PORT,
    GATEWAY,
    PROXY_PORT,
    SECRET,
    Host,
    Part,
    admin_key,
    backbone,
    front_part,
    node_certificate,
    node_part,
)
from tests.postgres import Postgres, postgres
from tests.s3server import CREDENTIALS, bucket_server
from vivarium.cluster.directory import NODES_TTL_S
from vivarium.cluster.secret import HEADER

NODES = ("n1", "n2", "n3")
BUCKET = "vivarium-cluster"
S3_ARGS = {"region_name": "us-east-1", "aws_access_key_id": "test",
           "aws_secret_access_key": "test"}  # fmt: skip
S3_PORT = 9311
SWEEP_S = 5  # VIVARIUM_CLUSTER_SWEEP_S of the test cluster's nodes


@dataclass
class Cluster:
    nodes: dict[str, Part]
    apis: list[Part]
    proxy: Part
    key: str
    pg: Postgres
    s3: str  # the S3 server's endpoint

    def new_node(self, host: Host, index: int, **settings: str) -> Part:
        """A node agent configured as the cluster's are (`settings` override)."""
        part = node_part(host, index, self.pg.url, **{**node_settings(self.s3), **settings})
        part.env.update(CREDENTIALS)
        return part

    def sql(self, query: str) -> list[list[str]]:
        """Rows of a query on the catalog, as psql prints them unaligned."""
        out = subprocess.run(["runuser", "-u", "postgres", "--", "psql", "-h", self.pg.sock,
                              "-U", "postgres", "-d", "vivarium", "-At", "-F", "|", "-c", query],
                             check=True, capture_output=True, text=True).stdout  # fmt: skip
        return [line.split("|") for line in out.splitlines() if line]

    def opts(self, api: int = 0) -> dict[str, Any]:
        return {"api_key": self.key, "api_url": self.apis[api].api_url,
                "sandbox_url": self.proxy.proxy_url, "request_timeout": 300}  # fmt: skip

    def http(self, api: int = 0) -> httpx.Client:
        return httpx.Client(base_url=self.apis[api].api_url, timeout=300,
                            headers={"X-API-Key": self.key})  # fmt: skip

    def node_of(self, sandbox_id: str) -> str:
        with self.http() as http:
            return str(http.get(f"/sandboxes/{sandbox_id}").json()["clientID"])

    def logs(self) -> str:
        parts = [*self.nodes.values(), *self.apis, self.proxy]
        return "\n".join(f"--- {p.role} on {p.host.name}\n{p.log_tail(30)}" for p in parts)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with backbone(), postgres() as pg, s3_store() as s3:
        hosts = {name: Host(name, f"10.240.0.{11 + i}") for i, name in enumerate(NODES)}
        fronts = [Host("a1", "10.240.0.21"), Host("a2", "10.240.0.22"), Host("px", "10.240.0.31")]
        for host in [*hosts.values(), *fronts]:
            host.create()
        nodes = {name: node_part(host, i, pg.url, **node_settings(s3))
                 for i, (name, host) in enumerate(hosts.items())}  # fmt: skip
        for node in nodes.values():
            node.env.update(CREDENTIALS)
        # n3 serves its API and proxy over TLS: the fronts reach it as https://, verified.
        n3 = nodes["n3"]
        ca, cert, key = node_certificate(n3.state_dir, hosts["n3"].address)
        at = hosts["n3"].address
        n3.env.update(VIVARIUM_TLS_CERT=str(cert), VIVARIUM_TLS_KEY=str(key),
                      VIVARIUM_NODE_URL=f"https://{at}:{API_PORT}",
                      VIVARIUM_NODE_PROXY_URL=f"https://{at}:{PROXY_PORT}")  # fmt: skip
        trust = {"cluster_ca_file": str(ca)}
        for node in nodes.values():  # nodes reach each other too (a volume's hand-over)
            node.env["VIVARIUM_CLUSTER_CA_FILE"] = str(ca)
        apis = [front_part("api", fronts[0], pg.url, **trust),
                front_part("api", fronts[1], pg.url, **trust)]  # fmt: skip
        proxy = front_part("proxy", fronts[2], pg.url, **trust)
        parts = [*nodes.values(), *apis, proxy]
        try:
            for part in parts:  # the first node makes the first team and its key
                part.start()
            made = Cluster(nodes, apis, proxy, admin_key(nodes["n1"]), pg, s3)
            _wait_ready(made, len(NODES))
            yield made
        finally:
            for part in reversed(parts):
                part.stop()


def node_settings(s3_endpoint: str) -> dict[str, str]:
    return {"team_max_sandboxes": "100", "snapshot_url": f"s3://{BUCKET}/cluster",
            "s3_endpoint_url": s3_endpoint, "cluster_sweep_s": str(SWEEP_S)}  # fmt: skip


@contextlib.contextmanager
def s3_store() -> Iterator[str]:
    """moto's S3 server on the backbone (where every host reaches it), with the bucket."""
    with bucket_server(S3_PORT, BUCKET, host=GATEWAY) as server:
        yield server.endpoint


def _wait_ready(cluster: Cluster, count: int, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    rows: Any = []
    while time.monotonic() < deadline:
        with cluster.http() as http:
            rows = http.get("/nodes").json()
        if sum(r.get("status") == "ready" for r in rows) >= count:
            return
        time.sleep(0.5)
    raise AssertionError(f"{count} nodes were not ready: {rows}\n{cluster.logs()}")


def test_creates_spread_over_the_nodes_through_either_api(cluster: Cluster) -> None:
    with cluster.http() as http:
        addresses = {r["nodeID"]: r["address"] for r in http.get("/nodes").json()}
    assert addresses["n3"].startswith("https://") and addresses["n1"].startswith("http://")
    sandboxes = [Sandbox.create(**cluster.opts(i % 2)) for i in range(6)]
    try:
        homes = Counter(cluster.node_of(s.sandbox_id) for s in sandboxes)
        assert set(homes) == set(NODES), homes
        for sbx in sandboxes:  # through the proxy, to the node that runs it
            sbx.files.write("/home/user/where", sbx.sandbox_id)
            out = sbx.commands.run("cat /home/user/where; echo; echo $E2B_SANDBOX_ID")
            assert out.stdout.split() == [sbx.sandbox_id, sbx.sandbox_id]
            assert sbx.files.read("/home/user/where") == sbx.sandbox_id
    finally:
        for sbx in sandboxes:
            sbx.kill()
    with cluster.http(1) as http:
        for sbx in sandboxes:
            assert http.get(f"/sandboxes/{sbx.sandbox_id}").status_code == 404


def test_a_drained_node_gets_no_new_sandboxes(cluster: Cluster) -> None:
    with cluster.http(1) as http:
        assert http.post("/nodes/n1/drain").json()["status"] == "draining"
        time.sleep(NODES_TTL_S)  # every replica knows within that
        try:
            made = [Sandbox.create(**cluster.opts(i % 2)) for i in range(4)]
            try:
                assert "n1" not in {cluster.node_of(s.sandbox_id) for s in made}
            finally:
                for sbx in made:
                    sbx.kill()
        finally:
            assert http.post("/nodes/n1/undrain").json()["status"] == "ready"


def test_50_concurrent_creates_across_the_cluster_all_start(cluster: Cluster) -> None:
    def one(i: int) -> Sandbox:
        return Sandbox.create(**cluster.opts(i % 2))

    with ThreadPoolExecutor(50) as pool:
        results = list(pool.map(lambda i: _attempt(one, i), range(50)))
    made = [r for r in results if isinstance(r, Sandbox)]
    try:
        failures = [r for r in results if not isinstance(r, Sandbox)]
        assert not failures, f"{len(failures)} failed, first: {failures[0]!r}\n{cluster.logs()}"
        homes = Counter(cluster.node_of(s.sandbox_id) for s in made)
        assert set(homes) == set(NODES), homes
        assert all(s.commands.run("true").exit_code == 0 for s in made[:5])
    finally:
        with ThreadPoolExecutor(10) as pool:
            list(pool.map(lambda s: _attempt(lambda _: s.kill(), 0), made))


def _attempt(call: Any, i: int) -> Any:
    try:
        return call(i)
    except Exception as exc:  # counted by the caller
        return exc


def test_an_api_replica_killed_mid_load_leaves_the_other_serving(cluster: Cluster) -> None:
    victim = cluster.apis[0]
    made: list[Sandbox] = []
    survived: list[Sandbox | Exception] = []
    lock = threading.Lock()

    def creating(api: int, count: int) -> None:
        for _ in range(count):
            try:
                sbx: Sandbox | Exception = Sandbox.create(**cluster.opts(api))
            except Exception as exc:
                sbx = exc
            with lock:
                if isinstance(sbx, Sandbox):
                    made.append(sbx)
                if api == 1:
                    survived.append(sbx)

    threads = [threading.Thread(target=creating, args=(0, 6)),
               threading.Thread(target=creating, args=(1, 6))]  # fmt: skip
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    victim.kill()  # -9, mid-create
    for thread in threads:
        thread.join()
    try:
        failed = [r for r in survived if isinstance(r, Exception)]
        assert len(survived) == 6 and not failed, failed
        # Nothing is left half-made: every sandbox the catalog has runs, or has ended.
        deadline = time.monotonic() + 60
        while cluster.sql("select id from sandboxes where state = 'starting'"):
            assert time.monotonic() < deadline, cluster.sql("select id, state from sandboxes")
            time.sleep(0.5)
        running = [r[0] for r in cluster.sql("select id from sandboxes where state = 'running'")]
        assert {s.sandbox_id for s in made} <= set(running)
        for sandbox_id in running:  # also any the dead replica started and never answered
            Sandbox.kill(sandbox_id, **cluster.opts(1))
    finally:
        victim.start()


COUNTER = """
import os, time
n = 0
while True:
    n += 1
    with open("/tmp/n.new", "w") as f:
        f.write(str(n))
    os.replace("/tmp/n.new", "/tmp/n")  # a reader never sees it half-written
    time.sleep(0.2)
"""


def start_counter(sbx: Sandbox) -> None:
    """A process counting in /tmp/n (memory: it goes with the snapshot) five times a second."""
    sbx.files.write("/home/user/counter.py", COUNTER)
    sbx.commands.run("python3 /home/user/counter.py", background=True, timeout=0)
    deadline = time.monotonic() + 30
    while not sbx.files.exists("/tmp/n"):
        assert time.monotonic() < deadline, "the counter did not start"
        time.sleep(0.1)


@contextlib.contextmanager
def drained(cluster: Cluster, node: str) -> Iterator[None]:
    with cluster.http() as http:
        http.post(f"/nodes/{node}/drain").raise_for_status()
        time.sleep(NODES_TTL_S)  # every replica knows within that
        try:
            yield
        finally:
            http.post(f"/nodes/{node}/undrain").raise_for_status()


def test_sandboxes_from_a_snapshot_start_on_its_node_or_fetch_it_elsewhere(
    cluster: Cluster,
) -> None:
    """Three at once, through either API: on the snapshot's node, where it is; with that node
    drained, on another, which fetches it from the store (and its template build, published by
    the first snapshot of a sandbox on it) and keeps no copy."""
    source = Sandbox.create(**cluster.opts())
    home = cluster.node_of(source.sandbox_id)
    source.files.write("/home/user/lesson", "prepared")
    snapshot = source.create_snapshot()
    made: list[Sandbox] = []
    try:

        def start(i: int) -> Sandbox:
            return Sandbox.create(snapshot.snapshot_id, **cluster.opts(i % 2))

        with ThreadPoolExecutor(3) as pool:
            made = list(pool.map(start, range(3)))
        for sbx in made:
            assert cluster.node_of(sbx.sandbox_id) == home
            assert sbx.files.read("/home/user/lesson") == "prepared"
            assert sbx.commands.run("echo $E2B_SANDBOX_ID").stdout.strip() == sbx.sandbox_id
        with drained(cluster, home):
            with ThreadPoolExecutor(2) as pool:
                made += list(pool.map(start, range(2)))
            elsewhere = {cluster.node_of(sbx.sandbox_id) for sbx in made[3:]}
            assert home not in elsewhere
            for sbx in made[3:]:
                assert sbx.files.read("/home/user/lesson") == "prepared"
            build = cluster.sql(f"SELECT build_key FROM team_snapshots "
                                f"WHERE id = '{snapshot.snapshot_id}'")[0][0]  # fmt: skip
            for node in elsewhere:
                assert not (cluster.nodes[node].state_dir / "snapshots" / build).exists()
    finally:
        for sbx in [source, *made]:
            sbx.kill()
        Sandbox.delete_snapshot(snapshot.snapshot_id, **cluster.opts())


def test_a_team_template_built_on_one_node_starts_on_another(cluster: Cluster) -> None:
    """The node that builds a template publishes it to the store; a node without it fetches it
    on first use (two creates at once: one fetch), and drops its copy once it is deleted."""
    name = f"lesson-{secrets.token_hex(3)}"
    template = (Template().from_template("base").set_envs({"MODE": "lesson"})
                .run_cmd("echo built-once > /home/user/mark"))  # fmt: skip
    Template.build(template, name, **cluster.opts())
    [[template_id, builder]] = cluster.sql(
        f"SELECT id, node_id FROM team_templates WHERE name = '{name}'"
    )
    s3 = boto3.client("s3", endpoint_url=cluster.s3, **S3_ARGS)
    stored = s3.list_objects_v2(Bucket=BUCKET, Prefix=f"cluster/templates/{template_id}/")
    assert [o["Key"].rsplit("/", 1)[-1] for o in stored.get("Contents", [])] == [
        "archive.tar.zst", "manifest.json"]  # fmt: skip
    made: list[Sandbox] = []
    with drained(cluster, builder):
        with ThreadPoolExecutor(2) as pool:
            made = list(pool.map(lambda i: Sandbox.create(name, **cluster.opts(i)), range(2)))
        try:
            fetched = {cluster.node_of(sbx.sandbox_id) for sbx in made}
            assert builder not in fetched
            for sbx in made:
                shell = sbx.commands.run("cat /home/user/mark; echo $MODE")
                assert shell.stdout.split() == ["built-once", "lesson"]
        finally:
            for sbx in made:
                sbx.kill()
    copies = [cluster.nodes[n].state_dir / "templates" / template_id for n in fetched]
    assert all(c.is_dir() for c in copies)
    with cluster.http() as http:
        http.delete(f"/templates/{template_id}").raise_for_status()
    stored = s3.list_objects_v2(Bucket=BUCKET, Prefix=f"cluster/templates/{template_id}/")
    assert not stored.get("Contents")
    deadline = time.monotonic() + SWEEP_S + 30
    while any(c.exists() for c in copies):  # each node's next sweep
        assert time.monotonic() < deadline, f"copies left: {copies}\n{cluster.logs()}"
        time.sleep(1.0)


def test_a_volume_moves_when_its_node_drains(cluster: Cluster) -> None:
    """Handed over by its draining node once no sandbox there runs with it: stored, then
    fetched by the node of the next sandbox that mounts it; its files API follows it."""
    volume = Volume.create(f"course-{secrets.token_hex(3)}", **cluster.opts())
    mounts = {"/mnt/data": volume}
    sbx = Sandbox.create(volume_mounts=mounts, **cluster.opts())
    home = cluster.node_of(sbx.sandbox_id)
    sbx.files.write("/mnt/data/lesson.txt", "written on the first node")
    try:
        with drained(cluster, home), cluster.http(1) as http:
            body = {"templateID": "base", "volumeMounts": [{"name": volume.name,
                                                            "path": "/mnt/data"}]}  # fmt: skip
            refused = http.post("/sandboxes", json=body)
            assert refused.status_code == 409, refused.text
            assert "in use by sandbox" in refused.json()["message"]
            sbx.kill()
            moved = Sandbox.create(volume_mounts=mounts, **cluster.opts(1))
            try:
                node = cluster.node_of(moved.sandbox_id)
                assert node != home
                assert moved.files.read("/mnt/data/lesson.txt") == "written on the first node"
                moved.files.write("/mnt/data/second.txt", "and on the second")
            finally:
                moved.kill()
        assert cluster.sql(f"select node_id from volumes where id = '{volume.volume_id}'") == [
            [node]]  # fmt: skip
        assert not (cluster.nodes[home].state_dir / "volumes" / volume.volume_id).exists()
        files = Volume.connect(volume.volume_id, **cluster.opts())
        on_api = cluster.apis[0].api_url  # the files API: the cluster's, routed to the node
        assert files.read_file("/second.txt", api_url=on_api) == "and on the second"
    finally:
        sbx.kill()
        Volume.destroy(volume.volume_id, **cluster.opts())


def test_a_paused_sandbox_of_a_draining_node_resumes_on_another(cluster: Cluster) -> None:
    sbx = Sandbox.create(**cluster.opts())
    home = cluster.node_of(sbx.sandbox_id)
    start_counter(sbx)
    time.sleep(1.0)
    sbx.beta_pause()
    with drained(cluster, home):
        resumed = Sandbox.connect(sbx.sandbox_id, **cluster.opts(1))
        try:
            moved = cluster.node_of(sbx.sandbox_id)
            assert moved != home
            first = int(resumed.files.read("/tmp/n"))  # at once: the proxy knows it moved
            time.sleep(1.0)
            assert int(resumed.files.read("/tmp/n")) > first
            # The node it left drops its copy of the snapshot (its next sweep).
            deadline = time.monotonic() + SWEEP_S + 30
            held = cluster.nodes[home].state_dir / "snapshots" / sbx.sandbox_id
            while held.exists():
                assert time.monotonic() < deadline, f"{held} is still there"
                time.sleep(1.0)
        finally:
            resumed.kill()


def test_a_lost_nodes_paused_sandbox_resumes_on_another_node_with_its_memory(
    cluster: Cluster,
) -> None:
    sbx = Sandbox.create(**cluster.opts())
    home = cluster.node_of(sbx.sandbox_id)
    # Two more on the same node (the others drained meanwhile): one left running, which ends
    # with the node; one paused with auto-resume, which traffic resumes on another node.
    with cluster.http() as http:
        others = [n for n in NODES if n != home]
        for node in others:
            http.post(f"/nodes/{node}/drain").raise_for_status()
        time.sleep(NODES_TTL_S)
        try:
            running = Sandbox.create(**cluster.opts())
            lifecycle = {"on_timeout": "pause", "auto_resume": True}
            woken = Sandbox.create(**cluster.opts(), lifecycle=lifecycle)
            old = Sandbox.create(**cluster.opts())
            volume = Volume.create(f"lost-{secrets.token_hex(3)}", **cluster.opts())
            writer = Sandbox.create(volume_mounts={"/mnt/data": volume}, **cluster.opts())
        finally:
            for node in others:
                http.post(f"/nodes/{node}/undrain").raise_for_status()
    assert cluster.node_of(running.sandbox_id) == cluster.node_of(woken.sandbox_id) == home
    woken.files.write("/home/user/woken", "by traffic")
    woken.beta_pause()
    old.beta_pause()
    assert cluster.node_of(writer.sandbox_id) == home
    writer.files.write("/mnt/data/kept.txt", "stored by the node's sweep")
    writer.kill()
    s3 = boto3.client("s3", endpoint_url=cluster.s3, **S3_ARGS)
    manifest = f"cluster/volumes/{volume.volume_id}/manifest.json"
    deadline = time.monotonic() + SWEEP_S + 30
    while not s3.list_objects_v2(Bucket=BUCKET, Prefix=manifest).get("Contents"):
        assert time.monotonic() < deadline, f"{manifest} was not stored\n{cluster.logs()}"
        time.sleep(1.0)
    sbx.files.write("/home/user/kept", "files survive")
    start_counter(sbx)
    time.sleep(1.0)
    before = int(sbx.files.read("/tmp/n"))
    sbx.beta_pause()
    cluster.nodes[home].kill()  # -9: its host is gone as far as the cluster knows
    # One paused sandbox's snapshot past VIVARIUM_SNAPSHOT_MAX_AGE: with its node lost, the
    # node standing in for it applies the retention.
    cluster.sql(f"update snapshots set created_at = created_at - 31 * 86400 "
                f"where sandbox_id = '{old.sandbox_id}'")  # fmt: skip
    try:
        deadline = time.monotonic() + 90
        reason = ""
        while time.monotonic() < deadline and "was lost" not in reason:
            rows = cluster.sql(
                f"select end_reason from sandboxes where id = '{running.sandbox_id}'"
            )
            reason = rows[0][0] if rows else ""
            time.sleep(1.0)
        assert "was lost" in reason, (reason, cluster.logs())
        assert cluster.sql(f"select state from sandboxes where id = '{sbx.sandbox_id}'") == [
            ["paused"]
        ]
        resumed = Sandbox.connect(sbx.sandbox_id, **cluster.opts(1))
        assert cluster.node_of(sbx.sandbox_id) not in (home, "")
        assert resumed.files.read("/home/user/kept") == "files survive"
        first = int(resumed.files.read("/tmp/n"))  # /tmp is memory: it came with the snapshot
        assert first >= before
        time.sleep(1.0)
        assert int(resumed.files.read("/tmp/n")) > first  # the same process counts on
        resumed.kill()
        # A request through the proxy resumes the auto-resume one, on another node too.
        envd = {"E2b-Sandbox-Id": woken.sandbox_id, "E2b-Sandbox-Port": "49983"}
        answer = httpx.get(f"{cluster.proxy.proxy_url}/health", headers=envd, timeout=300)
        assert answer.status_code in (200, 204), (answer.status_code, answer.text)
        assert cluster.node_of(woken.sandbox_id) not in (home, "")
        assert woken.files.read("/home/user/woken") == "by traffic"
        woken.kill()
        # The volume: taken over by one node from what the lost node stored.
        reader = Sandbox.create(volume_mounts={"/mnt/data": volume}, **cluster.opts(1))
        assert cluster.node_of(reader.sandbox_id) != home
        assert reader.files.read("/mnt/data/kept.txt") == "stored by the node's sweep"
        reader.kill()
        query = f"select state, end_reason from sandboxes where id = '{old.sandbox_id}'"
        deadline = time.monotonic() + SWEEP_S + 30
        while cluster.sql(query) != [["killed", "snapshot expired"]]:
            assert time.monotonic() < deadline, (cluster.sql(query), cluster.logs())
            time.sleep(1.0)
        under = f"cluster/nodes/{home}/{old.sandbox_id}/"
        while s3.list_objects_v2(Bucket=BUCKET, Prefix=under).get("Contents"):  # in background
            assert time.monotonic() < deadline, f"{under} is still there"
            time.sleep(1.0)
    finally:
        cluster.nodes[home].start()
    # Back, the node gives up what the cluster gave up: the sandbox that ran there is gone,
    # and so is its copy of the volume another node took over.
    with cluster.http() as http:
        gone = http.get(f"/sandboxes/{running.sandbox_id}")
        assert gone.status_code == 404, (gone.text, cluster.logs())
    assert not (cluster.nodes[home].state_dir / "volumes" / volume.volume_id).exists()
    Volume.destroy(volume.volume_id, **cluster.opts())


def test_a_nodes_api_answers_only_the_cluster(cluster: Cluster) -> None:
    node = cluster.nodes["n1"]
    for headers in ({}, {"X-API-Key": cluster.key},
                    {"X-API-Key": cluster.key, HEADER: "0" * 64}):  # fmt: skip
        answer = httpx.get(f"{node.api_url}/sandboxes", headers=headers, timeout=30)
        assert answer.status_code == 401, answer.text
        assert "cluster" in answer.json()["message"]
    with cluster.http() as http:  # the same request through an API replica
        assert http.get("/sandboxes").status_code == 200
        # A create the replica reads itself (to place it): bad bodies get the API's answers.
        for body in (b"[" * 100_000 + b"]" * 100_000, b'{"templateID": "base", "volumeMounts": 5}'):
            answer = http.post("/v2/sandboxes", content=body)
            assert answer.status_code == 400 and answer.json()["code"] == 400, answer.text
        # What nodes ask each other is not the public API's: a replica never forwards it, by
        # any spelling of its path, and a node wants more than the secret the replica adds.
        handover = "/cluster/volumes/v0000000000000000000/handover"
        assert http.post(handover, json={"to": "x"}).status_code == 404
        api = urllib.parse.urlsplit(cluster.apis[0].api_url)
        raw = http_client.HTTPConnection(api.hostname, api.port, timeout=30)
        headers = {"X-API-Key": cluster.key, "Content-Type": "application/json"}
        raw.request("POST", "/sandboxes/.." + handover, body=b'{"to": "x"}', headers=headers)
        assert raw.getresponse().status == 404
        raw.close()
    answer = httpx.post(node.api_url + handover, json={"to": "x"}, headers={HEADER: SECRET})
    assert answer.status_code == 404, answer.text


def test_a_sandbox_reaches_no_part_of_the_cluster(cluster: Cluster) -> None:
    sbx = Sandbox.create(**cluster.opts())
    try:
        parts = [*cluster.nodes.values(), *cluster.apis]
        targets = [p.api_url for p in parts] + [cluster.proxy.proxy_url]
        for url in targets:
            out = sbx.commands.run(f"curl -sS -m 3 -o /dev/null {url}/health 2>&1; echo rc=$?")
            assert "curl: (" in out.stdout and "rc=0" not in out.stdout, (url, out.stdout)
    finally:
        sbx.kill()


@pytest.mark.parametrize("case", ["duplicate id", "other secret"])
def test_a_node_with_a_taken_id_or_another_secret_does_not_join(
    cluster: Cluster, case: str
) -> None:
    host = Host("n4", "10.240.0.14")
    host.create()
    if case == "duplicate id":
        part = cluster.new_node(host, 3, node_id="n2")
        expected = "node id 'n2' is taken by a running node at http://10.240.0.12:3000"
    else:
        part = cluster.new_node(host, 3, cluster_secret="f" * 64)
        expected = "cluster secret differs from node"
    with pytest.raises(RuntimeError, match="exited") as failed:
        part.start()
    assert expected in str(failed.value)
    with cluster.http() as http:
        rows = {r["nodeID"]: r for r in http.get("/nodes").json()}
    assert rows["n2"]["address"] == "http://10.240.0.12:3000" and "n4" not in rows


def test_an_api_replica_with_another_secret_says_so(cluster: Cluster) -> None:
    host = Host("a3", "10.240.0.23")
    host.create()
    api = front_part("api", host, cluster.pg.url, cluster_secret="e" * 64)
    api.start()
    try:
        answer = httpx.get(f"{api.api_url}/sandboxes", headers={"X-API-Key": cluster.key},
                           timeout=30)  # fmt: skip
        assert answer.status_code == 503
        assert "refused this API replica's cluster secret" in answer.json()["message"]
    finally:
        api.stop()

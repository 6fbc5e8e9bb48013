"""`make bench-cluster`: what the cluster's tiers add, each figure beside its floor in the same
run. Two node agents, an API replica and the proxy, each in a network namespace of its own
(tests/cluster/support.py), over a throwaway PostgreSQL and S3 server (moto).

- create: the official client's `Sandbox.create()` through the API replica, alternating with
  the same call straight at the node's own API (the single-host stack, with the cluster
  secret); the other node drained, so that both reach the same node.
- resume: `connect()` of a paused sandbox on the node that paused it (its snapshot local),
  alternating with one placed on the other node because the first is draining (the snapshot
  fetched from the first's part of the S3 store).

Prints a table and writes bench/results/cluster-<platform>.json.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
from e2b import Sandbox

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import REPO, Row, elapsed_ms, log, p50, print_table  # noqa: E402

sys.path.insert(0, str(REPO))
from tests.cluster.support import (  # noqa: E402
    GATEWAY,
    SECRET,
    Host,
    Part,
    admin_key,
    backbone,
    front_part,
    node_part,
)
from tests.postgres import postgres  # noqa: E402
from tests.s3server import CREDENTIALS, MotoServer  # noqa: E402

from vivarium.cluster.directory import NODES_TTL_S  # noqa: E402
from vivarium.cluster.secret import HEADER  # noqa: E402
from vivarium.node.client import NodeClient  # noqa: E402

CREATES = 12
RESUMES = 6
BUCKET = "vivarium-bench"
S3_PORT = 9312
RESULTS = REPO / "bench" / "results"


@contextlib.contextmanager
def cluster() -> Iterator[tuple[dict[str, Part], Part, Part, str]]:
    with backbone(), postgres() as pg:
        moto = MotoServer(S3_PORT, host=GATEWAY)
        moto.start()
        try:
            moto.client().create_bucket(Bucket=BUCKET)
            hosts = [Host("n1", "10.240.0.11"), Host("n2", "10.240.0.12"),
                     Host("a1", "10.240.0.21"), Host("px", "10.240.0.31")]  # fmt: skip
            for host in hosts:
                host.create()
            nodes = {h.name: node_part(h, i, pg.url, snapshot_url=f"s3://{BUCKET}/bench",
                                       s3_endpoint_url=moto.endpoint)
                     for i, h in enumerate(hosts[:2])}  # fmt: skip
            for node in nodes.values():
                node.env.update(CREDENTIALS)
            api, proxy = front_part("api", hosts[2], pg.url), front_part("proxy", hosts[3], pg.url)
            parts = [*nodes.values(), api, proxy]
            try:
                for part in parts:
                    part.start()
                yield nodes, api, proxy, admin_key(nodes["n1"])
            finally:
                for part in reversed(parts):
                    part.stop()
                    shutil.rmtree(part.state_dir, ignore_errors=True)
        finally:
            moto.stop()


class Bench:
    def __init__(self, nodes: dict[str, Part], api: Part, proxy: Part, key: str) -> None:
        self.nodes, self.api, self.proxy, self.key = nodes, api, proxy, key
        self.http = httpx.Client(base_url=api.api_url, headers={"X-API-Key": key}, timeout=300)

    def opts(self, api_url: str | None = None, **extra: Any) -> dict[str, Any]:
        return {"api_key": self.key, "api_url": api_url or self.api.api_url,
                "sandbox_url": self.proxy.proxy_url, "request_timeout": 300, **extra}  # fmt: skip

    def node_of(self, sandbox_id: str) -> str:
        return str(self.http.get(f"/sandboxes/{sandbox_id}").json()["clientID"])

    def set_state(self, node: str, state: str) -> None:
        verb = "drain" if state == "draining" else "undrain"
        self.http.post(f"/nodes/{node}/{verb}").raise_for_status()
        time.sleep(NODES_TTL_S)  # every replica and the node itself know within that

    def settle(self) -> None:
        """Each node has finished tearing down killed sandboxes (as the single-host bench)."""
        for node in self.nodes.values():
            with NodeClient(node.state_dir / "node.sock") as client:
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    info = client.info()
                    if not info["settling"]:
                        break
                    time.sleep(0.05)

    def creates(self) -> tuple[list[float], list[float]]:
        """(through the API replica, straight at n1's API), alternating, n2 drained."""
        direct = self.opts(self.nodes["n1"].api_url, api_headers={HEADER: SECRET})
        through, floor = [], []
        self.set_state("n2", "draining")
        try:
            Sandbox.create(**self.opts()).kill()  # each client's first call sets up its pool
            Sandbox.create(**direct).kill()
            for _ in range(CREATES):
                for opts, times in ((self.opts(), through), (direct, floor)):
                    self.settle()
                    start = time.perf_counter()
                    sbx = Sandbox.create(**opts)
                    times.append(elapsed_ms(start))
                    sbx.kill()
        finally:
            self.set_state("n2", "ready")
        return through, floor

    def resumes(self) -> tuple[list[float], list[float]]:
        """(on another node from S3, on the node that paused it), alternating."""
        sbx = Sandbox.create(**self.opts())
        sbx.files.write("/home/user/state", "x" * (1 << 20))
        elsewhere, local = [], []
        try:
            for _ in range(RESUMES):
                home = self.node_of(sbx.sandbox_id)
                sbx.beta_pause()
                self.settle()
                start = time.perf_counter()
                sbx = Sandbox.connect(sbx.sandbox_id, **self.opts())
                local.append(elapsed_ms(start))
                assert self.node_of(sbx.sandbox_id) == home
                sbx.beta_pause()
                self.set_state(home, "draining")
                try:
                    self.settle()
                    start = time.perf_counter()
                    sbx = Sandbox.connect(sbx.sandbox_id, **self.opts())
                    elsewhere.append(elapsed_ms(start))
                finally:
                    self.set_state(home, "ready")
                moved = self.node_of(sbx.sandbox_id)
                assert moved != home, f"resumed on {moved}, the node that paused it"
                assert len(sbx.files.read("/home/user/state")) == 1 << 20
        finally:
            sbx.kill()
        return elsewhere, local


def main() -> int:
    if os.geteuid() != 0:
        print("the bench runs real sandboxes and needs root", file=sys.stderr)
        return 2
    with cluster() as (nodes, api, proxy, key):
        bench = Bench(nodes, api, proxy, key)
        log(f"cluster: {CREATES} SDK creates through the API replica, alternating with "
            "creates straight at the node")  # fmt: skip
        through, floor = bench.creates()
        log(f"cluster: {RESUMES} resumes on another node from S3, alternating with local ones")
        elsewhere, local = bench.resumes()
    rows = [
        Row(
            "cluster_create_p50_ms",
            "SDK create p50 through the cluster API",
            p50(through),
            "ms",
            p50(floor),
            "SDK create p50 straight at the node (single-host stack)",
            max_ratio=1.15,
            samples=tuple(through),
        ),  # fmt: skip
        Row(
            "cluster_resume_elsewhere_p50_ms",
            "SDK connect() resume p50 on another node (S3)",
            p50(elsewhere),
            "ms",
            p50(local),
            "SDK connect() resume p50 on the node that paused",
            samples=tuple(elsewhere),
        ),  # fmt: skip
    ]
    print_table(rows)
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "cluster-latest.json"
    out.write_text(json.dumps({"results": {r.key: r.to_json() for r in rows},
                               "floor_samples": {"create": floor, "resume_local": local}},
                              indent=2) + "\n")  # fmt: skip
    print(f"results: {out.relative_to(REPO)}")
    return 0 if all(r.met is not False for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

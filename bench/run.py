"""Benchmark: sandbox create and exec latency, memory and scale, each beside a floor.

Floors are measured in the same run, on the same host: a native process spawn, a bare
`runsc restore` of the base template into a ready network slot, and a bare `runsc exec`. The
node's figures are reported as ratios to them, so results can be compared across machines. The
official `e2b` client's figures (create through the API, commands through the proxy) stand
beside the node-level ones, measured alternately with them, and what the API and the proxy add
is checked against a budget in milliseconds. Pause and resume through the client (an idle
sandbox, and one holding 200 MiB of written memory) stand beside a bare `runsc checkpoint` and a
`runsc restore` from that image.

The system under test is a `vivarium serve` of our own (fresh state dir, slot prefix `vb`, its
own slot range, API and proxy ports), so the bench runs beside a developer's server. Everything it
creates is removed at the end, also on failure or Ctrl-C, and the removal is verified.

Run as root with the base template built: `make bench`.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import math
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TypeVar

import httpx
from e2b import ALL_TRAFFIC, Sandbox
from e2b_code_interpreter import Sandbox as CodeInterpreter

from vivarium.config import Settings
from vivarium.network.addressing import Slot, SlotRange
from vivarium.network.firewall import HostFirewall
from vivarium.network.pool import SlotPool, create_slot, destroy_slot, reset_sandbox_side
from vivarium.node.chunks import ChunkStore
from vivarium.node.client import NodeClient, NodeError
from vivarium.node.snapshots import CHUNKS, SnapshotStore, named_chunks
from vivarium.runtime import disk
from vivarium.runtime.bundle import CGROUP_PARENT, Resources, for_sandbox, write_bundle
from vivarium.runtime.cgroups import CGROUP_ROOT, cpu_usage_ns, memory_stats, thread_ids
from vivarium.runtime.probe import DEFAULT_PLATFORM, runsc_version
from vivarium.runtime.runsc import Runsc, open_runtime
from vivarium.templates.store import Template, TemplateStore, dir_size

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # the tests' fake internet (tests/fakenet.py), an instance of its
os.environ["VIVARIUM_FAKENET"] = "bench"  # own, so that the bench can run beside `make test`
from tests import fakenet  # noqa: E402

VIVARIUM = Path(sys.executable).parent / "vivarium"
SETTINGS = Settings.from_env()
TEMPLATE_DIR = SETTINGS.templates_root  # where `make` built the template
TEMPLATE = "base"
# The runsc and platform under test: the server's (VIVARIUM_RUNSC, VIVARIUM_RUNSC_PLATFORM),
# and every raw floor is measured with the same.
RUNSC = SETTINGS.runsc_path
PLATFORM = SETTINGS.runsc_platform or DEFAULT_PLATFORM
RESULTS = REPO / "bench" / "results" / f"latest-{PLATFORM}.json"
SERVER_LOG = RESULTS.with_name(f"latest-{PLATFORM}-serve.log")  # the state dir is removed

# The server under test: names and addresses no other instance on this host uses.
SLOT_PREFIX = "vb"
SLOT_CIDR = "10.233.0.0/18"
PROXY_PORT = 4200
API_PORT = 3200
API_URL = f"http://127.0.0.1:{API_PORT}"
PROXY_URL = f"http://127.0.0.1:{PROXY_PORT}"
SCALE_TOTAL = 200
MAX_SANDBOXES = SCALE_TOTAL + 20  # room for the warm pool's phase beside stragglers
PREWARM = 12
# The raw-restore floor's own slot, outside the server's range.
RAW_PREFIX = "vbr"
RAW_CIDR = "10.234.0.0/24"
RAW_RESOURCES = Resources(memory_mb=1024, cpus=1.0, pids=512, disk_mb=10240)  # the node's defaults

SPAWN_RUNS = 50
RESTORE_RUNS = 20
EXEC_RUNS = 20
SDK_CMD_RUNS = 40
SDK_FILE_RUNS = 10
SDK_FILE_BYTES = 1024 * 1024
SDK_CMD_TARGET_RATIO = 0.35  # commands.run("true") against a raw `runsc exec true`
API_CREATE_MAX_ADDED_MS = 30.0  # SDK create p50 at most this above the node-level create p50
PROXY_MAX_ADDED_MS = 5.0  # commands.run p50 through the proxy at most this above direct
ENVD_PORT = 49983
SEQUENTIAL_CREATES = 20
CONCURRENT_CREATES = 10  # also the sandboxes whose idle memory is measured
HEALTH_IDLE_S = 3  # /health probed this long with nothing running: the floor of the busy probes
IDLE_WAIT_S = 3.0
# Before idle memory is read, ours and the bare container's alike: what the restore set going
# (envd's first requests, the node's /init) settles first.
MEMORY_WAIT_S = 10.0
# Of the concurrent creates, these stay idle until the warm-pool phase (~13 minutes), and their
# memory is read again then: what a sandbox left idle holds for the rest of its life (a sentry
# restored from a compressed image held its decoding's garbage for minutes: architecture.md,
# *Sentry memory after a restore*).
SETTLED_SANDBOXES = 3
IDLE_MAX_MIB = 60.0  # issue 13's target for an idle `base` sandbox
SCALE_BATCH = 10  # creates at once while scaling up
SCALE_CMD_PARALLEL = 4  # commands.run calls at once across the scaled-up sandboxes
SCALE_CMD_MAX_MS = 1000.0  # issue 13: each of the 200 answers within a second
SCALE_CPU_S = 20.0  # host CPU read over this long, all sandboxes idle
SCALE_API_RUNS = 10
IDLE_CPU_S = 10.0  # a bare restored container's idle CPU, read over this long
KILL_PARALLEL = 10
SETTLE_TIMEOUT_S = 60.0
# Longer than the whole run, so no sandbox expires in the middle of a measurement.
SANDBOX_TIMEOUT_S = 1800
START_TIMEOUT_S = 120.0  # the server prewarms its slots before it listens
STOP_TIMEOUT_S = 60.0
CREATE_TARGET_RATIO = 1.1
# Pause and resume (issue 5): SDK pause() and Sandbox.connect() of a paused sandbox.
PAUSE_IDLE_CYCLES = 8
PAUSE_DIRTY_CYCLES = 3
RAW_PAUSE_CYCLES = 5  # raw checkpoint + restore-from-that-image of the bare container
DIRTY_MIB = 200
RESUME_TARGET_RATIO = 1.15  # resume p50 at most this times a raw restore from a checkpoint
PAUSE_TARGET_RATIO = 1.2  # pause p50 at most this times a raw checkpoint
IDLE_SNAPSHOT_MAX_MIB = 20.0
# Random bytes, not touched zero pages: runsc compresses checkpoint memory, so only content
# that does not compress shows what saving 200 MiB costs. Its /proc status says when it is there.
DIRTY_SCRIPT = f"""
import os, random, time
b = random.randbytes({DIRTY_MIB} * 1024 * 1024)
open("/tmp/dirty.tmp", "w").write(open("/proc/self/status").read())
os.replace("/tmp/dirty.tmp", "/tmp/dirty.status")
time.sleep(10**6)
"""

# The code interpreter (issue 6): `Sandbox.create()` of code-interpreter-v1 through to the
# result of run_code("1+1"), alternating with plain base creates; then trivial-cell round trips.
INTERPRETER_TEMPLATE = "code-interpreter-v1"
INTERPRETER_CREATES = 10
INTERPRETER_CELLS = 30
INTERPRETER_TARGET_RATIO = 2.0  # first result at most this times a plain base create
# A first cell per language on a new sandbox: Python's kernel is in the checkpoint, the others
# start on their first cell.
LANGUAGE_RUNS = 3
LANGUAGES = ("python", "javascript", "typescript", "r", "java")

# The egress proxy (issue 16), from inside one sandbox, against the fake internet of
# tests/fakenet.py: the same server at an allowed address (straight out: the floor) and under an
# allowed name on a denied address (through the proxy, passed through), and HTTPS to a host
# whose rule adds a header (the proxy terminates and re-encrypts) beside HTTPS straight out.
EGRESS_SMALL_RUNS = 20
EGRESS_LARGE_RUNS = 15  # the download ratio is noisy on this host: more samples
EGRESS_LARGE_BYTES = 10 * 2**20
EGRESS_DOWNLOAD_TARGET_RATIO = 1.2

# The warm pool (issue 13): the server restarts with a pool of WARM_POOL_SIZE `base` sandboxes.
SNAPSHOT_RUNS = 5  # create_snapshot() of one running sandbox, on a settled node
SNAPSHOT_CREATES = 8  # creates from a snapshot, alternating with creates from the template
SNAPSHOT_TARGET_RATIO = 1.2  # create_snapshot p50 at most this times a raw checkpoint
SNAPSHOT_CREATE_TARGET_RATIO = 1.1  # create from a snapshot against one from the template
FORK_COUNT = 10
FORK_RUNS = 3  # each beside its floor's FORK_COUNT concurrent node creates
FORK_TARGET_RATIO = 1.2  # fork(10) at most this times a raw checkpoint + 10 concurrent creates
# Deduplicated storage (issue 14): STORAGE_SANDBOXES paused sandboxes of one template, each
# with STORAGE_OWN_MIB of random bytes of its own, against one snapshot + their own bytes.
STORAGE_SANDBOXES = 100
STORAGE_OWN_MIB = 1
STORAGE_BATCH = 10
STORAGE_TARGET_RATIO = 1.2
# Team templates (issue 17): a small template built through the SDK, cold (no cached layer),
# again unchanged, again with its last step changed; creates from one with a server running.
TEMPLATE_CREATES = 8  # alternating with creates from `base`
TEMPLATE_REBUILD_MAX_S = 5.0
TEMPLATE_CREATE_TARGET_RATIO = 1.2
WARM_POOL_SIZE = 5
WARM_CREATES = 20  # sequential SDK creates, each with the pool full
WARM_BURST = 20  # SDK creates released together against the full pool
WARM_CREATE_MAX_MS = 60.0
WARM_SAMPLE_S = 0.05  # how often the pool's level is read during the burst

MIB = 1024 * 1024


T0 = time.monotonic()


def log(message: str) -> None:
    print(f"[bench {time.monotonic() - T0:6.1f}s] {message}", file=sys.stderr, flush=True)


# -- statistics and results ------------------------------------------------------------------


def p50(values: list[float]) -> float:
    return statistics.median(values)


def p95(values: list[float]) -> float:
    """Nearest-rank: with 20 samples this is the 19th, an observed value, not interpolated."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(0.95 * len(ordered)) - 1)]


def elapsed_ms(start: float) -> float:
    return (time.perf_counter() - start) * 1000


@dataclass(frozen=True)
class Row:
    key: str
    metric: str
    value: float
    unit: str
    floor: float | None = None
    floor_of: str = ""  # what the floor is, shown beside it
    max_ratio: float | None = None  # target: value / floor at most this
    min_value: float | None = None  # target: value at least this
    max_value: float | None = None  # target: value at most this
    samples: tuple[float, ...] = ()

    @property
    def ratio(self) -> float | None:
        return self.value / self.floor if self.floor else None

    @property
    def met(self) -> bool | None:
        if self.max_ratio is not None:
            return self.ratio is not None and self.ratio <= self.max_ratio
        if self.min_value is not None:
            return self.value >= self.min_value
        if self.max_value is not None:
            return self.value <= self.max_value
        return None

    def target_text(self) -> str:
        if self.max_ratio is not None:
            goal = f"ratio <= {self.max_ratio:g}"
        elif self.min_value is not None:
            goal = f">= {fmt(self.min_value, self.unit)}"
        elif self.max_value is not None:
            goal = f"<= {fmt(self.max_value, self.unit)}"
        else:
            return "-"
        return f"{goal} ({'ok' if self.met else 'MISSED'})"

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "metric": self.metric, "value": round(self.value, 3), "unit": self.unit,
            "floor": None if self.floor is None else round(self.floor, 3),
            "floor_of": self.floor_of or None,
            "ratio": None if self.ratio is None else round(self.ratio, 3),
            "target": None if self.met is None else self.target_text().split(" (")[0],
            "met": self.met,
        }  # fmt: skip
        if self.samples:
            out["samples"] = [round(s, 3) for s in self.samples]
        return out


def fmt(value: float, unit: str) -> str:
    if unit == "count":
        return f"{value:.0f}"
    return f"{value:.2f} {unit}" if unit == "s" else f"{value:.1f} {unit}"


def print_table(rows: list[Row]) -> None:
    table = [("metric", "value", "floor", "ratio", "target")]
    for row in rows:
        floor = "-" if row.floor is None else f"{fmt(row.floor, row.unit)} ({row.floor_of})"
        ratio = "-" if row.ratio is None else f"{row.ratio:.2f}x"
        table.append((row.metric, fmt(row.value, row.unit), floor, ratio, row.target_text()))
    widths = [max(len(line[i]) for line in table) for i in range(5)]
    for n, line in enumerate(table):
        print("  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip())
        if n == 0:
            print("  ".join("-" * w for w in widths))


# -- memory ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Memory:
    cgroup_bytes: int  # memory.usage_in_bytes: charged pages, including page cache
    pss_bytes: int  # what the sandbox's processes map, shared pages split between sharers
    pids: int


def _tgid(tid: int) -> int:
    try:
        for line in Path(f"/proc/{tid}/status").read_text().splitlines():
            if line.startswith("Tgid:"):
                return int(line.split()[1])
    except OSError:
        pass
    return tid


def cgroup_pids(container_id: str) -> set[int]:
    """Processes in the sandbox's cgroup: its threads mapped to their process (a process can
    have threads in the cgroup without its leader)."""
    return {_tgid(tid) for tid in thread_ids(container_id)}


def pss_bytes(pids: set[int]) -> int:
    total = 0
    for pid in pids:
        try:
            text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        except OSError:
            continue  # exited meanwhile
        for line in text.splitlines():
            if line.startswith("Pss:"):
                total += int(line.split()[1]) * 1024
                break
    return total


def sandbox_memory(container_id: str) -> Memory:
    stats = memory_stats(container_id)
    if stats is None:
        raise RuntimeError(f"no memory cgroup found for {container_id}")
    pids = cgroup_pids(container_id)
    return Memory(stats.usage_bytes, pss_bytes(pids), len(pids))


def idle_cpu_ms_per_s(container_ids: list[str], seconds: float) -> float:
    """CPU (ms per second) the containers use over `seconds`, on average per container."""
    before = {c: cpu_usage_ns(c) or 0 for c in container_ids}
    start = time.perf_counter()
    time.sleep(seconds)
    used = sum((cpu_usage_ns(c) or 0) - before[c] for c in container_ids)
    return used / 1e6 / (time.perf_counter() - start) / max(1, len(container_ids))


def host_busy_pct(seconds: float) -> float:
    """How busy the host's CPUs were over `seconds` (all of them together), from /proc/stat."""

    def sample() -> tuple[int, int]:
        values = [int(v) for v in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        return sum(values), values[3] + values[4]  # all, idle + iowait

    total, idle = sample()
    time.sleep(seconds)
    total2, idle2 = sample()
    return 100.0 * (1 - (idle2 - idle) / max(1, total2 - total))


def mem_available() -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("MemAvailable missing from /proc/meminfo")


# -- floors ----------------------------------------------------------------------------------


def measure_spawn() -> list[float]:
    samples = []
    for _ in range(SPAWN_RUNS):
        start = time.perf_counter()
        subprocess.run(["true"], check=True)
        samples.append(elapsed_ms(start))
    return samples


@dataclass
class RawFloor:
    platform: str = ""
    restore_ms: list[float] = field(default_factory=list)
    exec_ms: list[float] = field(default_factory=list)
    delete_ms: list[float] = field(default_factory=list)
    memory: Memory | None = None
    idle_cpu_ms_per_s: float = 0.0  # host CPU the idle container uses, all its threads
    checkpoint_ms: list[float] = field(default_factory=list)  # the bare container, idle
    checkpoint_restore_ms: list[float] = field(default_factory=list)  # from that checkpoint
    checkpoint_bytes: list[int] = field(default_factory=list)


async def _probe_container(runtime: Runsc, cid: str, raw: RawFloor) -> None:
    """Idle memory, then exec round trips, of one bare restored container."""
    await asyncio.sleep(MEMORY_WAIT_S)
    raw.memory = sandbox_memory(cid)
    raw.idle_cpu_ms_per_s = await asyncio.to_thread(idle_cpu_ms_per_s, [cid], IDLE_CPU_S)
    for _ in range(EXEC_RUNS):
        start = time.perf_counter()
        result = await runtime.exec(cid, ["true"])
        raw.exec_ms.append(elapsed_ms(start))
        if not result.ok:
            raise RuntimeError(f"runsc exec true failed: {result.stderr.strip()[-300:]}")


async def _checkpoint_cycles(
    runtime: Runsc, cid: str, bundle: Path, slot: Slot, work: Path, raw: RawFloor
) -> None:
    """A pause and a resume without the node: checkpoint the container (which stops it),
    delete it, restore it from that image. It runs again at the end; the images are left in
    `work / "raw-checkpoints"` for the caller to remove once the container is gone."""
    for n in range(RAW_PAUSE_CYCLES):
        image = work / "raw-checkpoints" / str(n)
        start = time.perf_counter()
        await runtime.checkpoint(cid, image)
        raw.checkpoint_ms.append(elapsed_ms(start))
        raw.checkpoint_bytes.append(dir_size(image))
        await runtime.delete(cid)
        await reset_sandbox_side(slot)
        filestore = _new_disk(work / "raw" / f"{cid}-disk")
        start = time.perf_counter()
        await runtime.restore(cid, bundle, image, filestore,
                              work / "raw" / f"{cid}-resume-{n}.log")  # fmt: skip
        raw.checkpoint_restore_ms.append(elapsed_ms(start))


def _new_disk(directory: Path) -> Path:
    """A fresh writable-layer disk in `directory`, as the node gives every restore."""
    return disk.create(directory, RAW_RESOURCES.disk_mb << 20)


def raw_cid(run: int) -> str:
    # Fixed width: runsc accepts unique id prefixes, so "-1" must not be a prefix of "-10".
    return f"vbraw-{os.getpid()}-{run:03d}"


async def measure_raw(template: Template, work: Path) -> RawFloor:
    """Restores done directly with runsc, into one slot of our own reused for every run."""
    runtime = await asyncio.to_thread(open_runtime, RUNSC, work, work / "runsc-raw", PLATFORM)
    raw = RawFloor(platform=runtime.probe.platform)
    slot = SlotRange(RAW_PREFIX, RAW_CIDR).slot(0)
    spec = template.spec
    hub = work / "raw-hub"  # no volumes: an empty hub, as the node gives such sandboxes
    hub.mkdir(parents=True, exist_ok=True)
    await destroy_slot(slot.prefix, slot.index)  # one left behind by an interrupted run
    live: str | None = None
    try:
        await create_slot(slot)
        for i in range(RESTORE_RUNS):
            cid = raw_cid(i)
            config = for_sandbox(spec, Path(slot.netns_path), RAW_RESOURCES, cid, hub)
            bundle = write_bundle(work / "raw" / cid, config)
            live = cid
            filestore = _new_disk(work / "raw" / f"{cid}-disk")
            start = time.perf_counter()
            await runtime.restore(cid, bundle, template.checkpoint, filestore,
                                  work / "raw" / f"{cid}.log")  # fmt: skip
            raw.restore_ms.append(elapsed_ms(start))
            if i == RESTORE_RUNS - 1:
                await _probe_container(runtime, cid, raw)
                await _checkpoint_cycles(runtime, cid, bundle, slot, work, raw)
            start = time.perf_counter()
            await runtime.delete(cid)
            raw.delete_ms.append(elapsed_ms(start))
            disk.remove(work / "raw" / f"{cid}-disk")
            live = None
            await reset_sandbox_side(slot)  # as the node does when a slot goes back to its pool
    finally:
        try:
            if live is not None:
                await runtime.delete(live)
                disk.remove(work / "raw" / f"{live}-disk")
        finally:
            await destroy_slot(slot.prefix, slot.index)
            shutil.rmtree(work / "raw-checkpoints", ignore_errors=True)
    return raw


# -- the server under test -------------------------------------------------------------------


class Server:
    def __init__(self, state_dir: Path) -> None:
        self.state_dir = state_dir
        self.socket = state_dir / "node.sock"
        self.log_path = state_dir / "serve.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.env = {
            **os.environ,
            "VIVARIUM_STATE_DIR": str(state_dir),
            "VIVARIUM_TEMPLATE_DIR": str(TEMPLATE_DIR),
            "VIVARIUM_SLOT_PREFIX": SLOT_PREFIX,
            "VIVARIUM_SLOT_CIDR": SLOT_CIDR,
            "VIVARIUM_API_PORT": str(API_PORT),
            "VIVARIUM_PROXY_PORT": str(PROXY_PORT),
            "VIVARIUM_MAX_SANDBOXES": str(MAX_SANDBOXES),
            "VIVARIUM_TEAM_MAX_SANDBOXES": str(MAX_SANDBOXES),
            "VIVARIUM_SLOT_PREWARM": str(PREWARM),
            # No warm pool until its own phase: the other creates are restores (pool empty).
            "VIVARIUM_WARM_POOL": "",
        }

    def start(self) -> None:
        with self.log_path.open("ab") as out:
            # A session of its own: a Ctrl-C meant for the bench must not stop the server
            # before the bench has killed its sandboxes through it.
            self.proc = subprocess.Popen(
                [str(VIVARIUM), "serve"], env=self.env, stdin=subprocess.DEVNULL, stdout=out,
                stderr=subprocess.STDOUT, start_new_session=True,
            )  # fmt: skip
        deadline = time.monotonic() + START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}:\n{self.tail()}")
            if self.healthy() and self.api_healthy():
                return
            time.sleep(0.1)
        raise RuntimeError(f"server did not answer within {START_TIMEOUT_S:g}s:\n{self.tail()}")

    def healthy(self) -> bool:
        if not self.socket.exists():
            return False
        transport = httpx.HTTPTransport(uds=str(self.socket))
        try:
            with httpx.Client(transport=transport, base_url="http://node", timeout=2) as http:
                return http.get("/health").status_code == 200
        except httpx.HTTPError:
            return False

    def api_healthy(self) -> bool:
        try:
            return httpx.get(f"{API_URL}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def api_key(self) -> str:
        """The first key, written on the server's first start (its state dir is fresh)."""
        return (self.state_dir / "admin.key").read_text().strip()

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            log("server ignored SIGTERM; killing it")
            self.proc.kill()
            self.proc.wait(10)

    def tail(self, lines: int = 30) -> str:
        if not self.log_path.exists():
            return ""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])


@dataclass(frozen=True)
class Created:
    sandbox_id: str
    start: float  # perf_counter stamps, so concurrent calls share a time base
    end: float
    container_id: str = ""  # its runsc container (node creates only)

    @property
    def ms(self) -> float:
        return (self.end - self.start) * 1000


class Fleet:
    """Creates sandboxes (through the node's socket, or with the official client through the
    API) and remembers those still alive, so cleanup can find them."""

    def __init__(self, socket: Path) -> None:
        self.socket = socket
        self.api_key = ""  # set once the server has written its first key
        self.alive: set[str] = set()
        self.ever: set[str] = set()  # to check afterwards that none left a cgroup behind
        self.kept: dict[str, Created] = {}  # left running by kill_all until the final cleanup
        self._lock = threading.Lock()

    def client(self) -> NodeClient:
        return NodeClient(self.socket)

    def _track(self, sandbox_id: str) -> None:
        with self._lock:
            self.alive.add(sandbox_id)
            self.ever.add(sandbox_id)

    def create(self, client: NodeClient) -> Created:
        start = time.perf_counter()
        data = client.create(template=TEMPLATE, timeout=SANDBOX_TIMEOUT_S)
        end = time.perf_counter()
        self._track(data["sandbox_id"])
        return Created(data["sandbox_id"], start, end, data["container_id"])

    def sdk_create(
        self, client: type[Sandbox] = Sandbox, template: str = TEMPLATE, **options: Any
    ) -> tuple[Sandbox, Created]:
        """`Sandbox.create()` through the API, timed as a user of the client sees it."""
        start = time.perf_counter()
        sbx = client.create(template, timeout=SANDBOX_TIMEOUT_S, api_key=self.api_key,
                            api_url=API_URL, sandbox_url=PROXY_URL, **options)  # fmt: skip
        end = time.perf_counter()
        self._track(sbx.sandbox_id)
        return sbx, Created(sbx.sandbox_id, start, end)

    def sdk_connect(self, sandbox_id: str, sandbox_url: str, timeout: int | None = None) -> Sandbox:
        """A client of an API-created sandbox whose envd traffic all goes to `sandbox_url`
        (the proxy, or the sandbox's own envd), with the access token the API hands out.
        A paused sandbox is resumed (with `timeout`)."""
        return Sandbox.connect(sandbox_id, timeout=timeout, api_key=self.api_key,
                               api_url=API_URL, sandbox_url=sandbox_url)  # fmt: skip

    def api_kill(self, sandbox_id: str) -> None:
        """Kill through the API, which also removes a paused sandbox's snapshot."""
        Sandbox.kill(sandbox_id, api_key=self.api_key, api_url=API_URL)
        with self._lock:
            self.alive.discard(sandbox_id)

    def kill(self, client: NodeClient, sandbox_id: str) -> None:
        client.kill(sandbox_id)
        with self._lock:
            self.alive.discard(sandbox_id)

    def sdk_kill(self, sbx: Sandbox) -> None:
        sbx.kill()
        with self._lock:
            self.alive.discard(sbx.sandbox_id)

    def create_concurrently(self, n: int) -> list[Created | Exception]:
        """n creates released together, each on its own connection."""
        barrier = threading.Barrier(n, timeout=30)

        def one() -> Created:
            with self.client() as client:
                barrier.wait()
                return self.create(client)

        return _run_parallel([one] * n)

    def _kill_quietly(self, sandbox_id: str) -> None:
        with self.client() as client:
            try:
                self.kill(client, sandbox_id)
            except NodeError as exc:
                if exc.http_status != 404:
                    raise
            with self._lock:
                self.alive.discard(sandbox_id)  # after a 404 too: it is gone already

    def settle(self, poll_s: float = 0.2) -> None:
        """Wait until the node has finished tearing down killed sandboxes and making ready
        disks (it does both in the background), so that earlier work does not weigh on the
        next figure: the raw floors are measured with nothing in the background either."""
        deadline = time.monotonic() + SETTLE_TIMEOUT_S
        with self.client() as client:
            while time.monotonic() < deadline:
                info = client.info()
                warm = sum(info["warm"]["ready"].values()) + info["warm"]["filling"]
                if info["slots_in_use"] <= len(self.alive) + warm and not info["settling"]:
                    return
                time.sleep(poll_s)
        log(f"the node still held slots of killed sandboxes after {SETTLE_TIMEOUT_S:g}s")

    def kill_all(self, *, kept_too: bool = False) -> None:
        """Kill what we created, then anything else the server holds (it is ours alone), but
        the `kept` sandboxes unless `kept_too`.

        In parallel: a kill can take seconds (`runsc delete`), and this is cleanup, not a
        measurement.
        """
        with self.client() as client:
            leftover = set(self.alive) | {s["sandbox_id"] for s in client.list_sandboxes()}
        if not kept_too:
            leftover -= set(self.kept)
        calls = [functools.partial(self._kill_quietly, sid) for sid in sorted(leftover)]
        errors = [r for r in _run_parallel(calls, KILL_PARALLEL) if isinstance(r, Exception)]
        if errors:
            raise RuntimeError(f"{len(errors)} kill(s) failed, first: {errors[0]!r}")


T = TypeVar("T")


def _run_parallel(calls: Sequence[Callable[[], T]], workers: int = 0) -> list[T | Exception]:
    """Results (or the exception raised) in call order; `workers` 0 runs all at once."""
    with ThreadPoolExecutor(max_workers=max(1, workers or len(calls))) as pool:
        futures = [pool.submit(call) for call in calls]
        out: list[T | Exception] = []
        for future in futures:
            try:
                out.append(future.result())
            except Exception as exc:
                out.append(exc)
        return out


def _all_created(results: list[Created | Exception]) -> list[Created]:
    errors = [r for r in results if isinstance(r, Exception)]
    if errors:
        raise RuntimeError(f"{len(errors)} create(s) failed, first: {errors[0]!r}")
    return [r for r in results if isinstance(r, Created)]


# -- node measurements -----------------------------------------------------------------------


@dataclass
class NodeFigures:
    sequential_ms: list[float] = field(default_factory=list)
    kill_ms: list[float] = field(default_factory=list)
    concurrent_ms: list[float] = field(default_factory=list)
    concurrent_wall_ms: float = 0.0
    health_idle_ms: list[float] = field(default_factory=list)  # API /health, nothing running
    health_busy_ms: list[float] = field(default_factory=list)  # during the concurrent creates
    exec_ms: list[float] = field(default_factory=list)
    sdk_create_ms: list[float] = field(default_factory=list)  # through the API, alternating
    sdk_cmd_ms: list[float] = field(default_factory=list)  # straight at envd
    sdk_proxy_cmd_ms: list[float] = field(default_factory=list)  # through the proxy
    sdk_floor_ms: list[float] = field(default_factory=list)  # runsc exec, same sandbox & time
    sdk_file_ms: list[float] = field(default_factory=list)
    idle: list[Memory] = field(default_factory=list)
    settled: list[Memory] = field(default_factory=list)  # SETTLED_SANDBOXES, minutes later
    settled_early: list[Memory] = field(default_factory=list)  # the same, MEMORY_WAIT_S after
    settled_after_s: float = 0.0  # how long after their create
    scale_ok: int = 0
    scale_errors: list[str] = field(default_factory=list)
    scale_create_s: float = 0.0
    scale_wall_s: float = 0.0
    scale_mem_delta_bytes: int = 0
    scale_cmd_ms: list[float] = field(default_factory=list)  # commands.run, one per sandbox
    scale_idle_cpu_ms_per_s: float = 0.0  # per sandbox, all idle
    scale_busy_pct: float = 0.0  # host CPUs, all idle
    scale_busy_floor_pct: float = 0.0  # host CPUs before the first create
    scale_api_ms: list[float] = field(default_factory=list)  # GET /sandboxes, all running
    scale_api_floor_ms: list[float] = field(default_factory=list)  # ... before the first create
    pause_ms: list[float] = field(default_factory=list)  # idle sandbox
    resume_ms: list[float] = field(default_factory=list)
    snapshot_bytes: list[int] = field(default_factory=list)
    dirty_pause_ms: list[float] = field(default_factory=list)  # DIRTY_MIB written
    dirty_resume_ms: list[float] = field(default_factory=list)
    dirty_snapshot_bytes: list[int] = field(default_factory=list)
    dirty_rss_kib: int = 0
    storage_bytes: int = 0  # what STORAGE_SANDBOXES paused sandboxes take in the chunk store
    storage_paused: int = 0
    ci_base_create_ms: list[float] = field(default_factory=list)  # alternating with the next
    ci_first_result_ms: list[float] = field(default_factory=list)  # create -> "1+1" result
    ci_create_ms: list[float] = field(default_factory=list)  # the create alone
    first_cell_ms: dict[str, list[float]] = field(default_factory=dict)  # language -> samples
    ci_cell_ms: list[float] = field(default_factory=list)  # run_code("1+1") round trips
    team_snapshot_ms: list[float] = field(default_factory=list)  # create_snapshot(), idle
    from_snapshot_ms: list[float] = field(default_factory=list)  # SDK creates from it
    from_template_ms: list[float] = field(default_factory=list)  # alternating with those
    fork_ms: list[float] = field(default_factory=list)  # fork(count=FORK_COUNT), wall
    fork_floor_ms: list[float] = field(default_factory=list)  # FORK_COUNT node creates, wall
    build_cold_s: float = 0.0  # Template.build(skip_cache=True) of a small template
    build_same_s: float = 0.0  # the same again
    build_last_step_s: float = 0.0  # its last step changed
    custom_create_ms: list[float] = field(default_factory=list)  # its creates (a server runs)
    custom_base_create_ms: list[float] = field(default_factory=list)  # alternating, `base`
    warm_create_ms: list[float] = field(default_factory=list)  # SDK creates, pool full
    warm_claims: int = 0  # of those, how many the node served from the pool
    burst_ms: list[float] = field(default_factory=list)  # WARM_BURST SDK creates at once
    burst_claims: int = 0
    burst_refill_s: float = 0.0  # from the burst's last create to a full pool again
    burst_levels: list[tuple[float, int]] = field(default_factory=list)  # (s, ready) samples
    egress_ms: dict[str, list[float]] = field(default_factory=dict)  # by path: see measure_egress
    events: list[dict[str, Any]] = field(default_factory=list)  # sandboxes that ended by themselves


def measure_sequential(fleet: Fleet, figures: NodeFigures) -> None:
    """Node-level creates alternating with the official client's creates through the API.
    Every sandbox is killed before the next create (kills are not part of a create figure),
    and each create starts once the node has settled: the previous sandbox's `runsc delete`
    (~1.3 s) and the replacement of the ready disk it took are finished, as nothing runs in
    the background of the raw restores either. Creates under load are the concurrent rows."""
    fleet.sdk_kill(fleet.sdk_create()[0])  # the client's first call sets up its pool
    with fleet.client() as client:
        for _ in range(SEQUENTIAL_CREATES):
            fleet.settle(poll_s=0.05)
            created = fleet.create(client)
            figures.sequential_ms.append(created.ms)
            start = time.perf_counter()
            fleet.kill(client, created.sandbox_id)
            figures.kill_ms.append(elapsed_ms(start))
            fleet.settle(poll_s=0.05)
            sbx, created = fleet.sdk_create()
            figures.sdk_create_ms.append(created.ms)
            fleet.sdk_kill(sbx)


class HealthProbe:
    """/health round trips on one keep-alive connection, every 50 ms until stopped: how the
    API answers while the node restores (a blocked event loop would hold every probe)."""

    def __init__(self) -> None:
        self.ms: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(base_url=API_URL, timeout=30) as http:
            http.get("/health")  # connect before measuring
            while not self._stop.is_set():
                start = time.perf_counter()
                http.get("/health").raise_for_status()
                self.ms.append(elapsed_ms(start))
                self._stop.wait(0.05)

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()


def measure_concurrent_idle_exec(fleet: Fleet, figures: NodeFigures) -> None:
    """10 concurrent creates, with /health probed before and during them; the same sandboxes
    then serve the idle-memory and exec runs."""
    fleet.settle()
    with HealthProbe() as idle:
        time.sleep(HEALTH_IDLE_S)
    figures.health_idle_ms = idle.ms
    with HealthProbe() as busy:
        created = _all_created(fleet.create_concurrently(CONCURRENT_CREATES))
    figures.health_busy_ms = busy.ms
    figures.concurrent_ms = [c.ms for c in created]
    figures.concurrent_wall_ms = (max(c.end for c in created) - min(c.start for c in created)) * 1e3
    time.sleep(MEMORY_WAIT_S)  # let restore-time activity settle before reading memory
    figures.idle = [sandbox_memory(c.container_id) for c in created]
    fleet.kept = {c.sandbox_id: c for c in created[:SETTLED_SANDBOXES]}
    figures.settled_early = figures.idle[:SETTLED_SANDBOXES]
    with fleet.client() as client:
        target = created[0].sandbox_id
        for _ in range(EXEC_RUNS):
            start = time.perf_counter()
            result = client.exec(target, ["true"], user="root", timeout=30)
            figures.exec_ms.append(elapsed_ms(start))
            if result["exit_code"] != 0:
                raise RuntimeError(f"exec true exited {result['exit_code']}: {result['stderr']}")
    # The SDK's sandbox is one of the API's (`Sandbox.connect` asks the API, which knows only
    # its own), made while the 10 above still run.
    sdk_id = fleet.sdk_create()[0].sandbox_id
    with fleet.client() as client:
        record = client.get(sdk_id)
    measure_sdk(fleet, sdk_id, record["container_id"], record["slot_address"], figures)
    fleet.kill_all()


def measure_sdk(
    fleet: Fleet, sandbox_id: str, container_id: str, address: str, figures: NodeFigures
) -> None:
    """The official client, straight at the sandbox's envd and through the proxy. Each round
    runs a raw `runsc exec true` into the same sandbox, then `commands.run("true")` both ways
    (which goes first alternates), so the floor and both paths see exactly the same load."""
    direct = fleet.sdk_connect(sandbox_id, f"http://{address}:{ENVD_PORT}")
    proxied = fleet.sdk_connect(sandbox_id, PROXY_URL)
    paths = [(direct, figures.sdk_cmd_ms), (proxied, figures.sdk_proxy_cmd_ms)]
    # The bench's own probe dir (as sweep() uses), not the server's: probing refreshes it.
    state_dir = fleet.socket.parent
    runtime = open_runtime(RUNSC, state_dir.parent, state_dir / "runsc", PLATFORM)

    async def alternate() -> None:
        for n in range(SDK_CMD_RUNS):
            start = time.perf_counter()
            result = await runtime.exec(container_id, ["true"])
            figures.sdk_floor_ms.append(elapsed_ms(start))
            if not result.ok:
                raise RuntimeError(f"runsc exec true failed: {result.stderr.strip()[-300:]}")
            for sbx, samples in paths if n % 2 == 0 else paths[::-1]:
                start = time.perf_counter()
                sbx.commands.run("true")  # blocking on purpose: nothing else runs on this loop
                samples.append(elapsed_ms(start))

    direct.commands.run("true")  # first use opens the connections
    proxied.commands.run("true")
    asyncio.run(alternate())
    payload = os.urandom(SDK_FILE_BYTES)
    for _ in range(SDK_FILE_RUNS):
        start = time.perf_counter()
        direct.files.write("/home/user/bench.bin", payload)
        back = direct.files.read("/home/user/bench.bin", format="bytes")
        figures.sdk_file_ms.append(elapsed_ms(start))
        if bytes(back) != payload:
            raise RuntimeError("1 MB file read back differently")


def _api_list_ms(fleet: Fleet, runs: int) -> list[float]:
    """GET /sandboxes round trips: how the API answers while the node holds what it holds."""
    samples = []
    with httpx.Client(base_url=API_URL, headers={"X-API-Key": fleet.api_key}, timeout=60) as api:
        for _ in range(runs):
            start = time.perf_counter()
            api.get("/sandboxes").raise_for_status()
            samples.append(elapsed_ms(start))
    return samples


def _until_coarse(fleet: Fleet, count: int) -> None:
    """Until `count` sandboxes have the idle timers (node/idle_timers.py), so that the idle
    figures are not those of the last restores."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    with fleet.client() as client:
        while client.info()["coarse_timers"] < count:
            if time.monotonic() > deadline:
                log(f"fewer than {count} sandboxes had coarse timers after {SETTLE_TIMEOUT_S:g}s")
                return
            time.sleep(0.5)


def _scale_cmd(sbx: Sandbox) -> float:
    start = time.perf_counter()
    result = sbx.commands.run("true")
    if result.exit_code != 0:
        raise RuntimeError(f"{sbx.sandbox_id}: `true` exited {result.exit_code}")
    return elapsed_ms(start)


def measure_scale(fleet: Fleet, figures: NodeFigures) -> None:
    """SCALE_TOTAL sandboxes made with the official client, left idle, then each runs
    `commands.run("true")` through the proxy while the rest stay idle."""
    figures.scale_api_floor_ms = _api_list_ms(fleet, SCALE_API_RUNS)
    figures.scale_busy_floor_pct = host_busy_pct(SCALE_CPU_S / 4)
    available_before = mem_available()
    start = time.perf_counter()
    boxes: list[Sandbox] = []
    for _ in range(SCALE_TOTAL // SCALE_BATCH):
        for result in _run_parallel([fleet.sdk_create] * SCALE_BATCH):
            if isinstance(result, Exception):
                figures.scale_errors.append(f"create: {result!r}")
            else:
                boxes.append(result[0])
    figures.scale_create_s = time.perf_counter() - start
    _until_coarse(fleet, len(boxes))
    with fleet.client() as client:
        containers = [s["container_id"] for s in client.list_sandboxes()]
    figures.scale_idle_cpu_ms_per_s = idle_cpu_ms_per_s(containers, SCALE_CPU_S / 2)
    figures.scale_busy_pct = host_busy_pct(SCALE_CPU_S / 2)
    figures.scale_mem_delta_bytes = available_before - mem_available()
    figures.scale_api_ms = _api_list_ms(fleet, SCALE_API_RUNS)
    calls = [functools.partial(_scale_cmd, sbx) for sbx in boxes]
    sweep = time.perf_counter()
    for outcome in _run_parallel(calls, SCALE_CMD_PARALLEL):
        if isinstance(outcome, Exception):
            figures.scale_errors.append(f"commands.run: {outcome!r}")
        else:
            figures.scale_cmd_ms.append(outcome)
            figures.scale_ok += 1
    figures.scale_wall_s = figures.scale_create_s + time.perf_counter() - sweep
    # Through the API, which keeps the team's count.
    _run_parallel([functools.partial(fleet.sdk_kill, sbx) for sbx in boxes], KILL_PARALLEL)
    fleet.kill_all()


def _pause_cycles(
    fleet: Fleet, sbx: Sandbox, cycles: int, pause_ms: list[float], resume_ms: list[float],
    sizes: list[int],
) -> Sandbox:  # fmt: skip
    """SDK pause() and Sandbox.connect() of the paused sandbox, in turn, each on a settled node:
    the previous incarnation's `runsc delete` (~1.3 s, which the resume does not wait for: it
    restores into a new container) and the ready-disk refill are done first, as nothing runs
    beside the raw checkpoints and restores either."""
    snapshots = fleet.socket.parent / "snapshots"
    for _ in range(cycles):
        fleet.settle(poll_s=0.05)
        start = time.perf_counter()
        if not sbx.pause():
            raise RuntimeError(f"sandbox {sbx.sandbox_id} was already paused")
        pause_ms.append(elapsed_ms(start))
        manifest = json.loads((snapshots / sbx.sandbox_id / "manifest.json").read_text())
        # What the pause added to the store: a chunked snapshot shares the rest.
        sizes.append(int(manifest.get("stored_bytes", manifest["size_bytes"])))
        fleet.settle(poll_s=0.05)
        start = time.perf_counter()
        sbx = fleet.sdk_connect(sbx.sandbox_id, PROXY_URL, timeout=SANDBOX_TIMEOUT_S)
        resume_ms.append(elapsed_ms(start))
    return sbx


def _start_dirty(sbx: Sandbox) -> tuple[int, int]:
    """Start the process holding DIRTY_MIB of random bytes; its pid and RSS (KiB) once there."""
    sbx.files.write("/tmp/dirty.py", DIRTY_SCRIPT)
    sbx.commands.run("python3 /tmp/dirty.py", background=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        status = sbx.commands.run("cat /tmp/dirty.status 2>/dev/null || true").stdout
        fields = dict(line.split(":", 1) for line in status.splitlines() if ":" in line)
        if "VmRSS" in fields:
            pid, rss = int(fields["Pid"]), int(fields["VmRSS"].split()[0])
            if rss < DIRTY_MIB * 1024:
                raise RuntimeError(f"the {DIRTY_MIB} MiB process has only {rss} KiB resident")
            return pid, rss
        time.sleep(0.5)
    raise RuntimeError(f"the {DIRTY_MIB} MiB process did not report its memory in time")


def measure_pause(fleet: Fleet, figures: NodeFigures) -> None:
    """Pause/resume cycles of one idle API sandbox, then of one holding DIRTY_MIB of written
    memory; no process with open sockets runs in either (a pause would be refused)."""
    ids: list[str] = []
    try:
        sbx = fleet.sdk_create()[0]
        ids.append(sbx.sandbox_id)
        time.sleep(IDLE_WAIT_S)
        sbx = _pause_cycles(fleet, sbx, PAUSE_IDLE_CYCLES, figures.pause_ms, figures.resume_ms,
                            figures.snapshot_bytes)  # fmt: skip
        sbx.commands.run("true")  # it answers after its last resume
        fleet.sdk_kill(sbx)
        fleet.settle()
        sbx = fleet.sdk_create()[0]
        ids.append(sbx.sandbox_id)
        pid, figures.dirty_rss_kib = _start_dirty(sbx)
        sbx = _pause_cycles(fleet, sbx, PAUSE_DIRTY_CYCLES, figures.dirty_pause_ms,
                            figures.dirty_resume_ms, figures.dirty_snapshot_bytes)  # fmt: skip
        sbx.commands.run(f"test -d /proc/{pid}")  # the process came back with its memory
        fleet.sdk_kill(sbx)
    finally:
        for sandbox_id in ids:  # running or paused: the API kill removes the snapshot too
            try:
                fleet.api_kill(sandbox_id)
            except Exception as exc:  # the leftover check reports any snapshot it kept
                log(f"could not kill {sandbox_id} through the API: {exc}")


def measure_storage(fleet: Fleet, figures: NodeFigures) -> None:
    """STORAGE_SANDBOXES sandboxes, each writing STORAGE_OWN_MIB of random bytes and paused;
    then the bytes on disk of every chunk their manifests name (index blocks included, each
    counted once) plus the manifests: what storing them takes, whatever else the store holds."""
    snapshots = fleet.socket.parent / "snapshots"
    own = f"head -c {STORAGE_OWN_MIB << 20} /dev/urandom > /home/user/own.bin"

    created: list[str] = []  # killed at the end, whatever state each was left in

    def one() -> str:
        sbx = fleet.sdk_create()[0]
        created.append(sbx.sandbox_id)
        sbx.commands.run(own)
        if not sbx.pause():
            raise RuntimeError(f"sandbox {sbx.sandbox_id} was already paused")
        return sbx.sandbox_id

    paused: list[str] = []
    try:
        for _ in range(STORAGE_SANDBOXES // STORAGE_BATCH):
            results = _run_parallel([one] * STORAGE_BATCH)
            paused += [r for r in results if isinstance(r, str)]
            for result in results:
                if isinstance(result, Exception):
                    raise result
        named: set[str] = set()
        for sandbox_id in paused:
            manifest = json.loads((snapshots / sandbox_id / "manifest.json").read_text())
            if "files" not in manifest:
                raise RuntimeError(f"the snapshot of {sandbox_id} is not kept as chunks")
            named_chunks(manifest, ChunkStore(snapshots / CHUNKS), into=named)
            figures.storage_bytes += (snapshots / sandbox_id / "manifest.json").stat().st_size
        chunks = snapshots / "chunks"
        figures.storage_bytes += sum((chunks / d[:2] / d).stat().st_size for d in named)
        figures.storage_paused = len(paused)
    finally:
        kills = [functools.partial(fleet.api_kill, i) for i in created]
        for sandbox_id, outcome in zip(created, _run_parallel(kills, KILL_PARALLEL), strict=True):
            if isinstance(outcome, Exception):  # the leftover check reports what it kept
                log(f"could not kill {sandbox_id} through the API: {outcome}")


def measure_interpreter(fleet: Fleet, figures: NodeFigures) -> None:
    """What an e2b-code-interpreter user waits for: create through to the first cell's result,
    beside a plain base create at the same time; then a trivial cell's round trip."""
    fleet.sdk_kill(fleet.sdk_create()[0])
    for i in range(INTERPRETER_CREATES):
        sbx, created = fleet.sdk_create()
        figures.ci_base_create_ms.append(created.ms)
        fleet.sdk_kill(sbx)
        ci, created = fleet.sdk_create(CodeInterpreter, INTERPRETER_TEMPLATE)
        assert isinstance(ci, CodeInterpreter)
        figures.ci_create_ms.append(created.ms)
        text = ci.run_code("1+1").text
        figures.ci_first_result_ms.append(elapsed_ms(created.start))
        if text != "2":
            raise RuntimeError(f"run_code('1+1') gave {text!r}")
        if i == INTERPRETER_CREATES - 1:
            for _ in range(INTERPRETER_CELLS):
                start = time.perf_counter()
                ci.run_code("1+1")
                figures.ci_cell_ms.append(elapsed_ms(start))
        fleet.sdk_kill(ci)
    for _ in range(LANGUAGE_RUNS):
        for language in LANGUAGES:
            ci, _ = fleet.sdk_create(CodeInterpreter, INTERPRETER_TEMPLATE)
            assert isinstance(ci, CodeInterpreter)
            start = time.perf_counter()
            execution = ci.run_code("1+1", language=language)
            figures.first_cell_ms.setdefault(language, []).append(elapsed_ms(start))
            shown = execution.text or (execution.results[0].text if execution.results else "")
            if shown not in ("2", "[1] 2"):
                raise RuntimeError(f"a first {language} cell gave {shown!r}")
            fleet.sdk_kill(ci)


def _alternate_creates(fleet: Fleet, template: str, runs: int, ms: list[float],
                       base_ms: list[float]) -> None:  # fmt: skip
    """SDK creates from `template` alternating with creates from TEMPLATE, each on a settled
    node and killed at once: their times go to `ms` and `base_ms`."""
    for _ in range(runs):
        for name, times in ((template, ms), (TEMPLATE, base_ms)):
            fleet.settle(poll_s=0.05)
            sbx, created = fleet.sdk_create(template=name)
            times.append(created.ms)
            fleet.sdk_kill(sbx)


def measure_snapshots(fleet: Fleet, figures: NodeFigures) -> None:
    """create_snapshot() of an idle running sandbox; creates from that snapshot alternating
    with creates from its template; forks of FORK_COUNT children alternating with as many
    concurrent node creates (the fork's floor, beside the same running parent). Each on a
    settled node."""
    sbx = fleet.sdk_create()[0]
    snapshots: list[str] = []
    try:
        time.sleep(IDLE_WAIT_S)
        for _ in range(SNAPSHOT_RUNS):
            fleet.settle(poll_s=0.05)
            start = time.perf_counter()
            snapshots.append(sbx.create_snapshot().snapshot_id)
            figures.team_snapshot_ms.append(elapsed_ms(start))
        _alternate_creates(fleet, snapshots[-1], SNAPSHOT_CREATES, figures.from_snapshot_ms,
                           figures.from_template_ms)  # fmt: skip
        for _ in range(FORK_RUNS):
            fleet.settle(poll_s=0.05)
            start = time.perf_counter()
            children = sbx.fork(count=FORK_COUNT, timeout=SANDBOX_TIMEOUT_S)
            figures.fork_ms.append(elapsed_ms(start))
            for forked in children:
                if isinstance(forked, Exception):
                    raise RuntimeError(f"a fork child did not start: {forked!r}")
                fleet.ever.add(forked.sandbox_id)
                fleet.sdk_kill(forked)
            fleet.settle(poll_s=0.05)
            created = _all_created(fleet.create_concurrently(FORK_COUNT))
            figures.fork_floor_ms.append(
                (max(c.end for c in created) - min(c.start for c in created)) * 1e3
            )
            with fleet.client() as client:
                for c in created:
                    fleet.kill(client, c.sandbox_id)
    finally:
        for snapshot_id in snapshots:
            Sandbox.delete_snapshot(snapshot_id, api_key=fleet.api_key, api_url=API_URL)
        fleet.sdk_kill(sbx)


def _small_template(last: str) -> Any:
    from e2b import Template, wait_for_port

    return (
        Template()
        .from_base_image()
        .run_cmd("mkdir -p /home/user/site && echo lesson > /home/user/site/index.html")
        .set_envs({"MODE": "lesson"})
        .set_workdir("/home/user/site")
        .run_cmd(f"echo {last} > /home/user/last")
        .set_start_cmd("python3 -m http.server 8000", wait_for_port(8000))
    )


def measure_templates(fleet: Fleet, figures: NodeFigures) -> None:
    """A small template built through the SDK: cold, unchanged, last step changed; then SDK
    creates from it (its server running) alternating with creates from `base`."""
    from e2b import Template

    name = f"bench-{os.getpid()}"
    options = {"api_key": fleet.api_key, "api_url": API_URL}

    def build(last: str, skip_cache: bool = False) -> float:
        start = time.perf_counter()
        Template.build(_small_template(last), name, skip_cache=skip_cache, **options)
        return time.perf_counter() - start

    try:
        figures.build_cold_s = build("one", skip_cache=True)
        fleet.settle(poll_s=0.05)
        figures.build_same_s = build("one")
        fleet.settle(poll_s=0.05)
        figures.build_last_step_s = build("two")
        _alternate_creates(fleet, name, TEMPLATE_CREATES, figures.custom_create_ms,
                           figures.custom_base_create_ms)  # fmt: skip
    finally:
        with httpx.Client(base_url=API_URL, headers={"X-API-Key": fleet.api_key},
                          timeout=60) as http:  # fmt: skip
            http.delete(f"/templates/{name}")


def measure_egress(fleet: Fleet, figures: NodeFigures) -> None:
    """curl's own total time inside one sandbox, each path in turn per round."""
    host = "pkg.example.test"  # allowed by name; on fakenet.NAMED, which is denied
    sbx, _ = fleet.sdk_create(network={
        "deny_out": [ALL_TRAFFIC], "dns_servers": [fakenet.DNS],
        "allow_out": [fakenet.BY_IP, host, "*.cdn.example.test"],
        "rules": {"*.cdn.example.test": [{"transform": {"headers": {"X-Bench": "1"}}}]},
    })  # fmt: skip
    sbx.commands.run(f"echo nameserver {fakenet.DNS} > /etc/resolv.conf", user="root")
    # Names resolved by curl itself (--resolve), as addresses are: the sandbox's own DNS
    # lookup is not the proxy's cost. The proxy still resolves them, to where they point.
    # HTTPS without verification (-k) both ways: loading the system CA bundle costs curl
    # ~70 ms under gVisor on either path, which would hide what the proxy adds.
    named = f"--resolve {host}:80:{fakenet.NAMED} http://{host}"
    rule = "a.cdn.example.test"
    paths = {
        "small_direct": f"http://{fakenet.BY_IP}/", "small_proxy": f"{named}/",
        "tls_direct": f"-k https://{fakenet.BY_IP}/",
        "tls_rule": f"-k --resolve {rule}:443:{fakenet.CDN} https://{rule}/",
    }  # fmt: skip
    large = {"large_direct": f"http://{fakenet.BY_IP}/bytes/{EGRESS_LARGE_BYTES}",
             "large_proxy": f"{named}/bytes/{EGRESS_LARGE_BYTES}"}  # fmt: skip
    script = "".join(
        f"for i in $(seq {runs}); do\n" + "".join(
            f"curl -sf -o /dev/null -w '{key} %{{time_total}}\\n' {url}\n"
            for key, url in urls.items()
        ) + "done\n"
        for runs, urls in ((EGRESS_SMALL_RUNS, paths), (EGRESS_LARGE_RUNS, large))
    )  # fmt: skip
    sbx.files.write("/tmp/egress.sh", script)
    out = sbx.commands.run("sh /tmp/egress.sh", timeout=600).stdout
    for line in out.splitlines():
        key, seconds = line.split()
        figures.egress_ms.setdefault(key, []).append(float(seconds) * 1000)
    fleet.sdk_kill(sbx)


def _pool_full(fleet: Fleet) -> dict[str, Any]:
    """Wait until the pool holds WARM_POOL_SIZE ready and nothing is being torn down; the
    node's warm counters then."""
    deadline = time.monotonic() + SETTLE_TIMEOUT_S
    with fleet.client() as client:
        while True:
            info = client.info()
            warm: dict[str, Any] = info["warm"]
            full = warm["ready"].get(TEMPLATE) == WARM_POOL_SIZE and not warm["filling"]
            if full and not info["settling"]:
                return warm
            if time.monotonic() > deadline:
                raise RuntimeError(f"the warm pool did not fill within {SETTLE_TIMEOUT_S:g}s")
            time.sleep(WARM_SAMPLE_S)


def measure_warm(fleet: Fleet, server: Server, figures: NodeFigures) -> None:
    """Creates from a warm pool: one at a time with the pool full (the official client's wall
    time), then a burst of WARM_BURST against a pool of WARM_POOL_SIZE, with the pool's level
    sampled until it is full again."""
    server.stop()
    server.env["VIVARIUM_WARM_POOL"] = f"{TEMPLATE}={WARM_POOL_SIZE}"
    server.start()
    before = _pool_full(fleet)
    fleet.sdk_kill(fleet.sdk_create()[0])  # the client's first call sets up its pool
    for _ in range(WARM_CREATES):
        _pool_full(fleet)
        sbx, created = fleet.sdk_create()
        figures.warm_create_ms.append(created.ms)
        fleet.sdk_kill(sbx)
    before = _pool_full(fleet)
    figures.warm_claims = before["claims"] - 1  # the client's first create took one too

    t0 = time.perf_counter()
    done = threading.Event()

    def sample() -> None:
        with fleet.client() as client:
            while not done.is_set():
                ready = client.info()["warm"]["ready"].get(TEMPLATE, 0)
                figures.burst_levels.append((round(time.perf_counter() - t0, 3), ready))
                time.sleep(WARM_SAMPLE_S)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    barrier = threading.Barrier(WARM_BURST, timeout=30)

    def one() -> tuple[Sandbox, Created]:
        barrier.wait()
        return fleet.sdk_create()

    results = _run_parallel([one] * WARM_BURST)
    burst_end = time.perf_counter()
    made = [r for r in results if not isinstance(r, Exception)]
    for sbx, _ in made:
        fleet.sdk_kill(sbx)
    errors = [r for r in results if isinstance(r, Exception)]
    if errors:
        raise RuntimeError(f"{len(errors)} burst create(s) failed, first: {errors[0]!r}")
    figures.burst_ms = [created.ms for _, created in made]
    after = _pool_full(fleet)
    figures.burst_refill_s = time.perf_counter() - burst_end
    done.set()
    sampler.join()
    figures.burst_claims = after["claims"] - before["claims"]


def measure_node(fleet: Fleet, server: Server) -> NodeFigures:
    figures = NodeFigures()
    try:
        log(f"node: {SEQUENTIAL_CREATES} sequential creates, each beside an SDK create")
        measure_sequential(fleet, figures)
        fleet.settle()
        log(f"node: {CONCURRENT_CREATES} concurrent creates, idle memory, exec, SDK commands")
        measure_concurrent_idle_exec(fleet, figures)
        fleet.settle()
        log(f"node: scale to {SCALE_TOTAL} sandboxes")
        measure_scale(fleet, figures)
        fleet.settle()
        log(f"node: {PAUSE_IDLE_CYCLES} pause/resume cycles idle, {PAUSE_DIRTY_CYCLES} with "
            f"{DIRTY_MIB} MiB written")  # fmt: skip
        measure_pause(fleet, figures)
        fleet.settle()
        log(f"node: {STORAGE_SANDBOXES} sandboxes paused with {STORAGE_OWN_MIB} MiB of their "
            "own each")  # fmt: skip
        measure_storage(fleet, figures)
        fleet.settle()
        log(f"node: {SNAPSHOT_RUNS} snapshots of a running sandbox, {SNAPSHOT_CREATES} "
            f"creates from one, {FORK_RUNS} forks of {FORK_COUNT}")  # fmt: skip
        measure_snapshots(fleet, figures)
        fleet.settle()
        log(f"node: {INTERPRETER_CREATES} code-interpreter creates to a first result, "
            f"{INTERPRETER_CELLS} cells")  # fmt: skip
        measure_interpreter(fleet, figures)
        fleet.settle()
        log(f"node: egress proxy: {EGRESS_SMALL_RUNS} small requests and {EGRESS_LARGE_RUNS} "
            f"downloads of {EGRESS_LARGE_BYTES // MIB} MiB each way")  # fmt: skip
        measure_egress(fleet, figures)
        fleet.settle()
        log(f"node: a small team template built cold, unchanged and changed; "
            f"{TEMPLATE_CREATES} creates from it")  # fmt: skip
        measure_templates(fleet, figures)
        measure_settled(fleet, figures)
        fleet.settle()
        log(f"node: warm pool of {WARM_POOL_SIZE}: {WARM_CREATES} creates, a burst of "
            f"{WARM_BURST}")  # fmt: skip
        measure_warm(fleet, server, figures)
        with fleet.client() as client:
            figures.events = client.info()["events"]
    finally:
        fleet.kill_all(kept_too=True)
    return figures


def measure_settled(fleet: Fleet, figures: NodeFigures) -> None:
    """The memory of the sandboxes kept idle since the concurrent creates, then killed."""
    kept = list(fleet.kept.values())
    figures.settled = [sandbox_memory(c.container_id) for c in kept]
    figures.settled_after_s = time.perf_counter() - min(c.end for c in kept)
    fleet.kill_all(kept_too=True)
    fleet.kept = {}


# -- cleanup ---------------------------------------------------------------------------------


async def _sweep_containers(runtime: Runsc) -> list[str]:
    try:
        for container in await runtime.list():
            try:
                await runtime.delete(container.id)
            except Exception as exc:  # keep sweeping; what stays is reported below
                log(f"could not delete container {container.id}: {exc}")
        return [f"runsc container {c.id} in {runtime.root}" for c in await runtime.list()]
    except Exception as exc:  # `runsc list` failing must not stop the rest of the cleanup
        return [f"runsc list in {runtime.root} failed: {exc}"]


async def sweep(work: Path, server_state: Path) -> list[str]:
    """Remove whatever this run may have left, idempotently; return what could not be removed."""
    problems: list[str] = []
    for root in (work / "runsc-raw", server_state / "runsc"):
        if root.is_dir():
            runtime = await asyncio.to_thread(open_runtime, RUNSC, work, root)
            problems += await _sweep_containers(runtime)
    for prefix, cidr in ((RAW_PREFIX, RAW_CIDR), (SLOT_PREFIX, SLOT_CIDR)):
        pool = SlotPool(prefix, cidr, (), 0, 1)  # used only to find slots by name
        for index in await pool.existing_indexes():
            await destroy_slot(prefix, index)
        problems += [f"network slot {prefix}-{i}" for i in await pool.existing_indexes()]
    await HostFirewall(SLOT_PREFIX, SLOT_CIDR, ()).uninstall()
    # Snapshots of paused sandboxes (the API's kill removes them) and the raw checkpoints.
    snapshots = server_state / "snapshots"
    if snapshots.is_dir():
        problems += [f"snapshot {path}" for path in snapshots.iterdir() if path.name != CHUNKS]
        # Chunks wait for the node's next collection; a collection now must leave none.
        store = SnapshotStore(snapshots)
        await asyncio.to_thread(store.collect_chunks)
        left = [p for d in store.chunks.root.glob("??") for p in d.iterdir()]
        if left:
            problems.append(f"{len(left)} chunk(s) in {store.chunks.root} after a collection")
    if (work / "raw-checkpoints").exists():
        problems.append(f"raw checkpoints in {work / 'raw-checkpoints'}")
    return problems


def leftover_cgroups(container_ids: set[str]) -> list[str]:
    """Cgroups runsc should have removed with the containers, in any hierarchy (v1 or v2),
    for every incarnation of a sandbox (`<sandbox id>-<suffix>`, one per create or resume)."""
    parents = [CGROUP_ROOT / CGROUP_PARENT] + [d / CGROUP_PARENT for d in CGROUP_ROOT.iterdir()]
    return [
        f"cgroup {cgroup}"
        for parent in parents if parent.is_dir()
        for cgroup in parent.iterdir()
        if cgroup.is_dir()
        and (cgroup.name in container_ids or cgroup.name.rsplit("-", 1)[0] in container_ids)
    ]  # fmt: skip


# -- report ----------------------------------------------------------------------------------


def build_rows(spawn: list[float], raw: RawFloor, node: NodeFigures) -> list[Row]:
    restore50, restore95 = p50(raw.restore_ms), p95(raw.restore_ms)
    egress = node.egress_ms
    rexec50 = p50(raw.exec_ms)
    assert raw.memory is not None
    raw_cg, raw_pss = raw.memory.cgroup_bytes / MIB, raw.memory.pss_bytes / MIB
    idle_cg = statistics.mean(m.cgroup_bytes for m in node.idle) / MIB
    idle_pss = statistics.mean(m.pss_bytes for m in node.idle) / MIB
    serial_s = SCALE_TOTAL * (restore50 + rexec50) / 1000
    create50, create95 = p50(node.sequential_ms), p95(node.sequential_ms)
    cmd50, floor50, floor95 = p50(node.sdk_cmd_ms), p50(node.sdk_floor_ms), p95(node.sdk_floor_ms)
    proxy_cmd50 = p50(node.sdk_proxy_cmd_ms)
    delta = node.scale_mem_delta_bytes / MIB
    ckpt50, ckpt_restore50 = p50(raw.checkpoint_ms), p50(raw.checkpoint_restore_ms)
    raw_snapshot = p50([float(b) for b in raw.checkpoint_bytes]) / MIB
    idle_snapshot = p50([float(b) for b in node.snapshot_bytes]) / MIB
    dirty_snapshot = p50([float(b) for b in node.dirty_snapshot_bytes]) / MIB
    dirty = f"{DIRTY_MIB} MiB written"
    return [
        Row("spawn_p50_ms", "native spawn `true` p50", p50(spawn), "ms", samples=tuple(spawn)),
        Row("spawn_p95_ms", "native spawn `true` p95", p95(spawn), "ms"),
        Row("raw_restore_p50_ms", "raw runsc restore p50", restore50, "ms",
            samples=tuple(raw.restore_ms)),
        Row("raw_restore_p95_ms", "raw runsc restore p95", restore95, "ms"),
        Row("raw_exec_p50_ms", "raw runsc exec `true` p50", rexec50, "ms", p50(spawn),
            "native spawn p50", samples=tuple(raw.exec_ms)),
        Row("raw_delete_p50_ms", "raw runsc delete p50", p50(raw.delete_ms), "ms",
            samples=tuple(raw.delete_ms)),
        Row("raw_checkpoint_p50_ms", "raw runsc checkpoint p50 (bare, idle)", ckpt50, "ms",
            samples=tuple(raw.checkpoint_ms)),
        Row("raw_checkpoint_restore_p50_ms", "raw runsc restore from that checkpoint p50",
            ckpt_restore50, "ms", samples=tuple(raw.checkpoint_restore_ms)),
        Row("create_seq_p50_ms", "create p50 (sequential)", create50, "ms",
            restore50, "raw restore p50", max_ratio=CREATE_TARGET_RATIO,
            samples=tuple(node.sequential_ms)),
        Row("create_seq_p95_ms", "create p95 (sequential)", create95, "ms",
            restore95, "raw restore p95"),
        Row("sdk_create_p50_ms", "SDK Sandbox.create() p50 (API)", p50(node.sdk_create_ms), "ms",
            create50, "node create p50, alternating", samples=tuple(node.sdk_create_ms)),
        Row("sdk_create_p95_ms", "SDK Sandbox.create() p95 (API)", p95(node.sdk_create_ms), "ms",
            create95, "node create p95, alternating"),
        Row("api_create_added_ms", "API adds to create p50 (SDK - node)",
            p50(node.sdk_create_ms) - create50, "ms", max_value=API_CREATE_MAX_ADDED_MS),
        Row("create_conc_p50_ms", f"create p50 ({CONCURRENT_CREATES} concurrent)",
            p50(node.concurrent_ms), "ms", restore50, "raw restore p50",
            samples=tuple(node.concurrent_ms)),
        Row("create_conc_p95_ms", f"create p95 ({CONCURRENT_CREATES} concurrent)",
            p95(node.concurrent_ms), "ms", restore95, "raw restore p95"),
        Row("create_conc_wall_ms", f"create wall ({CONCURRENT_CREATES} concurrent)",
            node.concurrent_wall_ms, "ms", CONCURRENT_CREATES * restore50,
            f"{CONCURRENT_CREATES} x raw restore p50"),
        Row("health_busy_p50_ms", f"API /health p50 (during {CONCURRENT_CREATES} creates)",
            p50(node.health_busy_ms), "ms", p50(node.health_idle_ms), "/health p50, idle",
            samples=tuple(node.health_busy_ms)),
        Row("health_busy_p95_ms", f"API /health p95 (during {CONCURRENT_CREATES} creates)",
            p95(node.health_busy_ms), "ms", p95(node.health_idle_ms), "/health p95, idle"),
        Row("kill_seq_p50_ms", "kill p50 (sequential)", p50(node.kill_ms), "ms",
            p50(raw.delete_ms), "raw runsc delete p50, full teardown", samples=tuple(node.kill_ms)),
        Row("exec_p50_ms", "node exec `true` p50", p50(node.exec_ms), "ms", rexec50,
            "raw runsc exec p50", samples=tuple(node.exec_ms)),
        Row("sdk_floor_p50_ms", "runsc exec `true` p50, SDK's sandbox", p50(node.sdk_floor_ms),
            "ms", rexec50, "raw runsc exec p50", samples=tuple(node.sdk_floor_ms)),
        Row("sdk_cmd_p50_ms", "SDK commands.run('true') p50 (envd)", cmd50, "ms",
            floor50, "runsc exec p50, same sandbox, alternating",
            max_ratio=SDK_CMD_TARGET_RATIO, samples=tuple(node.sdk_cmd_ms)),
        Row("sdk_cmd_p95_ms", "SDK commands.run('true') p95 (envd)", p95(node.sdk_cmd_ms), "ms",
            floor95, "runsc exec p95, same sandbox, alternating"),
        Row("sdk_proxy_cmd_p50_ms", "SDK commands.run('true') p50 (proxy)", proxy_cmd50, "ms",
            floor50, "runsc exec p50, same sandbox, alternating",
            samples=tuple(node.sdk_proxy_cmd_ms)),
        Row("sdk_proxy_cmd_p95_ms", "SDK commands.run('true') p95 (proxy)",
            p95(node.sdk_proxy_cmd_ms), "ms", floor95, "runsc exec p95, same sandbox, alternating"),
        Row("proxy_cmd_added_ms", "proxy adds to commands.run p50 (proxy - envd)",
            proxy_cmd50 - cmd50, "ms", max_value=PROXY_MAX_ADDED_MS),
        Row("sdk_file_p50_ms", "SDK 1 MB write+read p50", p50(node.sdk_file_ms), "ms", rexec50,
            "raw runsc exec p50", samples=tuple(node.sdk_file_ms)),
        Row("idle_cgroup_mib", "idle memory/sandbox (cgroup usage)", idle_cg, "MiB", raw_cg,
            "raw restored container", max_value=IDLE_MAX_MIB),
        Row("idle_pss_mib", "idle memory/sandbox (Pss)", idle_pss, "MiB", raw_pss,
            "raw restored container"),
        Row("settled_cgroup_mib",
            f"idle memory/sandbox, settled ({node.settled_after_s / 60:.0f} min idle)",
            statistics.mean(m.cgroup_bytes for m in node.settled) / MIB, "MiB",
            statistics.mean(m.cgroup_bytes for m in node.settled_early) / MIB,
            f"the same {SETTLED_SANDBOXES}, {MEMORY_WAIT_S:g} s after their create",
            max_value=IDLE_MAX_MIB),
        Row("idle_cpu_ms_per_s", "idle CPU/sandbox (host, all threads)",
            node.scale_idle_cpu_ms_per_s, "ms/s", raw.idle_cpu_ms_per_s,
            "raw restored container, idle"),
        Row("scale_ok", "scale: sandboxes answering commands.run", node.scale_ok, "count",
            SCALE_TOTAL, "requested", min_value=SCALE_TOTAL),
        Row("scale_cmd_p50_ms", f"scale: commands.run('true') p50, {SCALE_TOTAL} running",
            p50(node.scale_cmd_ms), "ms", proxy_cmd50, "one sandbox alone (proxy) p50",
            samples=tuple(node.scale_cmd_ms)),
        Row("scale_cmd_max_ms", f"scale: commands.run('true') slowest, {SCALE_TOTAL} running",
            max(node.scale_cmd_ms, default=0.0), "ms", proxy_cmd50,
            "one sandbox alone (proxy) p50", max_value=SCALE_CMD_MAX_MS),
        Row("scale_host_busy_pct", f"scale: host CPUs busy, {SCALE_TOTAL} idle",
            node.scale_busy_pct, "%", node.scale_busy_floor_pct, "before the first create"),
        Row("scale_api_p50_ms", f"scale: API list p50, {SCALE_TOTAL} running",
            p50(node.scale_api_ms), "ms", p50(node.scale_api_floor_ms),
            "before the first create"),
        Row("scale_wall_s", f"scale: create {SCALE_TOTAL} + a command in each",
            node.scale_wall_s, "s", serial_s, f"{SCALE_TOTAL} x (raw restore+exec p50)"),
        Row("scale_host_mem_mib", "scale: host MemAvailable drop", delta, "MiB",
            max(node.scale_ok, 1) * raw_cg, "n x raw container cgroup"),
        Row("pause_p50_ms", "SDK pause() p50 (idle)", p50(node.pause_ms), "ms", ckpt50,
            "raw checkpoint p50", max_ratio=PAUSE_TARGET_RATIO, samples=tuple(node.pause_ms)),
        Row("resume_p50_ms", "SDK connect() resume p50 (idle)", p50(node.resume_ms), "ms",
            ckpt_restore50, "raw restore from checkpoint p50", max_ratio=RESUME_TARGET_RATIO,
            samples=tuple(node.resume_ms)),
        Row("snapshot_mib", "snapshot stored per pause (idle)", idle_snapshot, "MiB", raw_snapshot,
            "raw bare checkpoint", max_value=IDLE_SNAPSHOT_MAX_MIB,
            samples=tuple(b / MIB for b in node.snapshot_bytes)),
        Row("storage_mib", f"storage: {node.storage_paused} paused, {STORAGE_OWN_MIB} MiB own "
            "each", node.storage_bytes / MIB, "MiB",
            raw_snapshot + node.storage_paused * STORAGE_OWN_MIB,
            f"raw bare checkpoint + {node.storage_paused} x {STORAGE_OWN_MIB} MiB",
            max_ratio=STORAGE_TARGET_RATIO),
        Row("dirty_pause_p50_ms", f"SDK pause() p50 ({dirty})", p50(node.dirty_pause_ms), "ms",
            ckpt50, "raw checkpoint p50, bare", samples=tuple(node.dirty_pause_ms)),
        Row("dirty_resume_p50_ms", f"SDK connect() resume p50 ({dirty})",
            p50(node.dirty_resume_ms), "ms", ckpt_restore50,
            "raw restore from checkpoint p50, bare", samples=tuple(node.dirty_resume_ms)),
        Row("dirty_snapshot_mib", f"snapshot stored per pause ({dirty})", dirty_snapshot, "MiB",
            raw_snapshot + DIRTY_MIB, f"raw bare checkpoint + {DIRTY_MIB} MiB",
            samples=tuple(b / MIB for b in node.dirty_snapshot_bytes)),
        Row("team_snapshot_p50_ms", "SDK create_snapshot() p50 (idle; it keeps running)",
            p50(node.team_snapshot_ms), "ms", ckpt50, "raw checkpoint p50",
            max_ratio=SNAPSHOT_TARGET_RATIO, samples=tuple(node.team_snapshot_ms)),
        Row("from_snapshot_p50_ms", "SDK create from a snapshot p50",
            p50(node.from_snapshot_ms), "ms", p50(node.from_template_ms),
            "SDK create from the template p50, alternating",
            max_ratio=SNAPSHOT_CREATE_TARGET_RATIO, samples=tuple(node.from_snapshot_ms)),
        Row("fork_wall_ms", f"SDK fork(count={FORK_COUNT}) wall p50", p50(node.fork_ms), "ms",
            ckpt50 + p50(node.fork_floor_ms),
            f"raw checkpoint p50 + {FORK_COUNT} concurrent node creates (wall p50, alternating)",
            max_ratio=FORK_TARGET_RATIO, samples=tuple(node.fork_ms)),
        Row("ci_first_result_p50_ms", "code interpreter: create -> run_code('1+1') p50",
            p50(node.ci_first_result_ms), "ms", p50(node.ci_base_create_ms),
            "SDK base create p50, alternating", max_ratio=INTERPRETER_TARGET_RATIO,
            samples=tuple(node.ci_first_result_ms)),
        Row("ci_create_p50_ms", "code interpreter: SDK create p50", p50(node.ci_create_ms), "ms",
            p50(node.ci_base_create_ms), "SDK base create p50, alternating",
            samples=tuple(node.ci_create_ms)),
        *(Row(f"first_cell_{language}_p50_ms",
              f"code interpreter: first {language} cell on a new sandbox p50",
              p50(node.first_cell_ms[language]), "ms", p50(node.first_cell_ms["python"]),
              "first Python cell p50", samples=tuple(node.first_cell_ms[language]))
          for language in LANGUAGES if language != "python"),
        Row("ci_cell_p50_ms", "code interpreter: run_code('1+1') p50", p50(node.ci_cell_ms),
            "ms", proxy_cmd50, "SDK commands.run('true') p50 (proxy)",
            samples=tuple(node.ci_cell_ms)),
        Row("ci_cell_p95_ms", "code interpreter: run_code('1+1') p95", p95(node.ci_cell_ms),
            "ms"),
        Row("warm_create_p50_ms", "SDK create p50 from a warm pool", p50(node.warm_create_ms),
            "ms", p50(node.sdk_create_ms), "SDK create p50, pool empty",
            max_value=WARM_CREATE_MAX_MS, samples=tuple(node.warm_create_ms)),
        Row("warm_create_p95_ms", "SDK create p95 from a warm pool", p95(node.warm_create_ms),
            "ms", p95(node.sdk_create_ms), "SDK create p95, pool empty"),
        Row("warm_claims", f"warm creates served from the pool (of {WARM_CREATES})",
            node.warm_claims, "count", WARM_CREATES, "creates", min_value=WARM_CREATES),
        Row("burst_p50_ms", f"burst of {WARM_BURST} SDK creates, pool of {WARM_POOL_SIZE}: p50",
            p50(node.burst_ms), "ms", p50(node.sdk_create_ms), "SDK create p50, pool empty",
            samples=tuple(node.burst_ms)),
        Row("burst_p95_ms", f"burst of {WARM_BURST} SDK creates, pool of {WARM_POOL_SIZE}: p95",
            p95(node.burst_ms), "ms", p95(node.sdk_create_ms), "SDK create p95, pool empty"),
        Row("burst_claims", "burst: creates served from the pool", node.burst_claims, "count",
            WARM_POOL_SIZE, "pool size"),
        Row("egress_small_p50_ms", "HTTP request through the egress proxy (allowed name): p50",
            p50(egress["small_proxy"]), "ms", p50(egress["small_direct"]),
            "straight out (allowed address)", samples=tuple(egress["small_proxy"])),
        Row("egress_rule_p50_ms", "HTTPS request with a header rule (proxy re-encrypts): p50",
            p50(egress["tls_rule"]), "ms", p50(egress["tls_direct"]), "HTTPS straight out",
            samples=tuple(egress["tls_rule"])),
        Row("egress_download_p50_ms",
            f"{EGRESS_LARGE_BYTES // MIB} MiB download through the egress proxy: p50",
            p50(egress["large_proxy"]), "ms", p50(egress["large_direct"]), "straight out",
            max_ratio=EGRESS_DOWNLOAD_TARGET_RATIO, samples=tuple(egress["large_proxy"])),
        Row("template_build_cold_s", "team template build, cold (5 steps, a server started)",
            node.build_cold_s, "s", ckpt50 / 1000 + restore50 / 1000,
            "raw checkpoint + raw restore p50"),
        Row("template_build_same_s", "team template build, nothing changed", node.build_same_s,
            "s", max_value=TEMPLATE_REBUILD_MAX_S),
        Row("template_build_last_step_s", "team template build, last step changed",
            node.build_last_step_s, "s", node.build_cold_s, "the cold build"),
        Row("template_create_p50_ms", "SDK create from a team template, its server running: p50",
            p50(node.custom_create_ms), "ms", p50(node.custom_base_create_ms),
            "SDK create from base p50, alternating", max_ratio=TEMPLATE_CREATE_TARGET_RATIO,
            samples=tuple(node.custom_create_ms)),
        Row("burst_refill_s", "burst: pool full again after the last create",
            node.burst_refill_s, "s", WARM_POOL_SIZE * restore50 / 1000,
            f"{WARM_POOL_SIZE} x raw restore p50"),
    ]  # fmt: skip


def write_json(rows: list[Row], machine: dict[str, Any], node: NodeFigures) -> None:
    results: dict[str, Any] = {row.key: row.to_json() for row in rows}
    results["details"] = {
        "idle_pids_per_sandbox": [m.pids for m in node.idle],
        "scale_create_s": round(node.scale_create_s, 3),
        "scale_errors": node.scale_errors,
        "dirty_rss_kib": node.dirty_rss_kib,
        "burst_pool_levels": node.burst_levels,
        "node_events": node.events,
        "targets_met": all(row.met is not False for row in rows),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"machine": machine, "results": results}, indent=2) + "\n")


# -- main ------------------------------------------------------------------------------------


def _interrupted(signum: int, frame: FrameType | None) -> None:
    # SIGTERM takes the same path as Ctrl-C, so every finally block below runs.
    raise KeyboardInterrupt


def run(work: Path) -> int:
    server_state = work / "server"
    server_state.mkdir()
    template = TemplateStore(TEMPLATE_DIR).get(TEMPLATE)
    server = Server(server_state)
    fleet = Fleet(server.socket)
    failed = True
    internet = contextlib.ExitStack()
    try:
        server.env.update({f"VIVARIUM_{k.upper()}": v for k, v in internet.enter_context(
            fake_internet_settings(work)).items()})  # fmt: skip
        log(f"floor: {SPAWN_RUNS} native spawns")
        spawn = measure_spawn()
        log(f"floor: {RESTORE_RUNS} raw runsc restores")
        raw = asyncio.run(measure_raw(template, work))
        log("starting the server under test")
        server.start()
        fleet.api_key = server.api_key()
        log("server ready")
        node = measure_node(fleet, server)
        failed = False
    finally:
        if failed and server.proc is not None:
            log(f"server log tail:\n{server.tail()}")
        log("stopping the server and cleaning up")
        try:
            server.stop()
            internet.close()
            if server.log_path.exists():
                SERVER_LOG.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(server.log_path, SERVER_LOG)
        finally:
            problems = asyncio.run(sweep(work, server_state))
        problems += leftover_cgroups(fleet.ever | {raw_cid(i) for i in range(RESTORE_RUNS)})
        if problems:
            log("cleanup left: " + "; ".join(problems))
        else:
            log("cleanup verified: no containers, slots, cgroups or snapshots left")
    machine = {"nproc": os.cpu_count(), "kernel": platform.release(),
               "runsc_version": runsc_version(RUNSC), "runsc_platform": raw.platform}  # fmt: skip
    rows = build_rows(spawn, raw, node)
    print_table(rows)
    write_json(rows, machine, node)
    for problem in node.scale_errors:
        print(f"scale error: {problem}")
    for event in node.events:
        print(f"node event: sandbox {event['sandbox_id']} {event['reason']}")
    missed = [row.metric for row in rows if row.met is False]
    print(f"\ntargets: {'all met' if not missed else 'missed: ' + ', '.join(missed)}")
    print(f"results: {RESULTS.relative_to(REPO)}")
    return 1 if problems else 0


@contextlib.contextmanager
def fake_internet_settings(work: Path) -> Iterator[dict[str, str]]:
    """The tests' fake internet, up while the server runs, and the settings that let it in."""
    with fakenet.fake_internet(work) as cert:
        yield {
            "egress_allow": fakenet.OPENED,
            "egress_dns": fakenet.DNS,
            "egress_ca_file": str(cert),
        }


def main() -> int:
    if os.geteuid() != 0:
        print("the bench runs real sandboxes and needs root", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _interrupted)
    work = Path(tempfile.mkdtemp(prefix="vivarium-bench-"))
    try:
        return run(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())

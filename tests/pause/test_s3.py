"""The S3-compatible snapshot store, against a real S3 server (moto's, started here), through
the official client: a paused sandbox survives the loss of the node's disk and a restart; a
store that fails mid-pause or cannot be reached leaves the sandbox running and nothing
half-written visible; a stored snapshot of another runsc version is refused and kept; kill
deletes the objects."""

from __future__ import annotations

import contextlib
import json
import shutil
import signal
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from e2b import Sandbox, SandboxState
from e2b.exceptions import SandboxException, ServiceBusyException

from tests.integration.support import Server, running_server, sdk_options
from tests.s3server import CREDENTIALS, MotoServer, keys
from vivarium.node.chunks import ChunkStore
from vivarium.node.snapshots import named_chunks

pytestmark = pytest.mark.timeout(900)

S3_PORT = 5127
API_PORT = 3114  # proxy on API_PORT + 1000
ENDPOINT = f"http://127.0.0.1:{S3_PORT}"
BUCKET = "vivarium-snapshots"
PREFIX = "ci/node-a"
COUNTER = (
    "import os, time\nn = 0\nwhile True:\n    n += 1\n"
    "    open('/home/user/.count', 'w').write(str(n))\n"
    "    os.replace('/home/user/.count', '/home/user/count.txt')\n    time.sleep(0.2)\n"
)


@pytest.fixture(scope="module")
def moto() -> Iterator[MotoServer]:
    server = MotoServer(S3_PORT)
    server.start()
    try:
        yield server
    finally:
        if server.proc is not None:
            server.stop()


@pytest.fixture(scope="module")
def s3(moto: MotoServer) -> Any:
    client = moto.client()
    client.create_bucket(Bucket=BUCKET)
    return client


@pytest.fixture(scope="module")
def server(s3: Any) -> Iterator[Server]:
    with running_server("s3", "va", "10.243.0.0/24", API_PORT, env=CREDENTIALS,
                        snapshot_url=f"s3://{BUCKET}/{PREFIX}", s3_endpoint_url=ENDPOINT,
                        snapshot_dedup="1") as srv:  # fmt: skip
        yield srv


_opts = sdk_options


def _keys(s3: Any, sandbox_id: str = "") -> list[str]:
    return keys(s3, BUCKET, f"{PREFIX}/{sandbox_id}/" if sandbox_id else "")


def _snapshots(server: Server) -> list[Path]:
    """What the node's snapshot directory holds besides its chunk store."""
    return [p for p in (server.state_dir / "snapshots").iterdir() if p.name != "chunks"]


def _wait_for(check: Callable[[], bool], timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.1)


def _count(sbx: Sandbox) -> int:
    return int(sbx.files.read("/home/user/count.txt") or 0)


def _start_counter(sbx: Sandbox) -> None:
    sbx.files.write("/home/user/counter.py", COUNTER)
    sbx.commands.run("python3 /home/user/counter.py", background=True, timeout=0)
    _wait_for(lambda: sbx.files.exists("/home/user/count.txt") and _count(sbx) >= 3)


def test_snapshot_survives_the_loss_of_the_node_disk(server: Server, s3: Any) -> None:
    opts = _opts(server)
    sbx = Sandbox.create(timeout=300, metadata={"student": "grace"}, **opts)
    sbx.files.write("/home/user/notes.txt", "written before the pause\n")
    _start_counter(sbx)
    assert sbx.pause()
    manifests = _keys(s3, sbx.sandbox_id)
    assert len(manifests) == 1 and manifests[0].endswith("/manifest.json"), manifests
    local = server.state_dir / "snapshots" / sbx.sandbox_id
    stored = json.loads(s3.get_object(Bucket=BUCKET, Key=manifests[0])["Body"].read())
    assert stored == json.loads((local / "manifest.json").read_text())
    # Kept as chunks, shared in the bucket with every other snapshot that holds them.
    chunks = {k.rsplit("/", 1)[1] for k in _keys(s3, "chunks")}
    named = named_chunks(stored, ChunkStore(local.parent / "chunks"))
    assert named and named <= chunks

    # The node's disk is lost (or the sandbox moves to a fresh node): only the bucket has it.
    server.stop()
    shutil.rmtree(local)
    shutil.rmtree(server.state_dir / "snapshots" / "chunks")
    server.start()
    listed = {s.sandbox_id: s.state for s in Sandbox.list(**opts).next_items()}
    assert listed == {sbx.sandbox_id: SandboxState.PAUSED}

    back = Sandbox.connect(sbx.sandbox_id, timeout=300, **opts)
    assert back.get_info().state == SandboxState.RUNNING
    assert back.get_info().metadata == {"student": "grace"}
    assert back.files.read("/home/user/notes.txt") == "written before the pause\n"
    # The counter is the same process with its memory: it goes on from where it stood.
    resumed = _count(back)
    assert resumed >= 3
    _wait_for(lambda: _count(back) > resumed)
    assert (local / "manifest.json").is_file()  # fetched, verified, then put in place

    # Another pause replaces the stored copy: one snapshot per sandbox in the bucket.
    assert back.pause()
    again = [k for k in _keys(s3, sbx.sandbox_id) if k.endswith("/manifest.json")]
    assert len(again) == 1 and again != manifests
    assert Sandbox.kill(sbx.sandbox_id, **opts)
    assert not local.exists()
    _wait_for(lambda: _keys(s3, sbx.sandbox_id) == [])


def test_a_failed_upload_keeps_the_sandbox_running(
    server: Server, moto: MotoServer, s3: Any
) -> None:  # fmt: skip
    opts = _opts(server)
    sbx = Sandbox.create(timeout=300, **opts)
    sbx.files.write("/home/user/work.txt", "unsaved work")
    # 200 MiB in memory: the checkpoint takes a second or more, time enough to take the store
    # away after the pause checked it and before the snapshot is uploaded.
    sbx.commands.run("head -c 200M /dev/urandom > /home/user/big.bin")
    _start_counter(sbx)
    snapshots = server.state_dir / "snapshots"
    pulled = threading.Event()

    def pull_the_bucket() -> None:
        deadline = time.monotonic() + 60
        while not list(snapshots.glob(f".tmp-{sbx.sandbox_id}-*")):
            if time.monotonic() > deadline:
                return
            time.sleep(0.005)
        moto.stop()  # (and all it held: moto keeps its objects in memory)
        pulled.set()

    puller = threading.Thread(target=pull_the_bucket, daemon=True)
    puller.start()
    try:
        before = _count(sbx)
        with pytest.raises(SandboxException, match="storing the snapshot of sandbox .* failed"):
            sbx.pause()
    finally:
        puller.join(60)
        if moto.proc is None:
            moto.start()
        s3.create_bucket(Bucket=BUCKET)
    assert pulled.is_set()
    # The sandbox runs on, restored from the checkpoint the store refused: files and processes.
    assert sbx.is_running()
    assert Sandbox.get_info(sbx.sandbox_id, **opts).state == SandboxState.RUNNING
    assert sbx.files.read("/home/user/work.txt") == "unsaved work"
    now = _count(sbx)
    assert now >= before
    _wait_for(lambda: _count(sbx) > now)
    # Nothing half-written anywhere (the chunks it added here are named by nothing, and
    # collected).
    assert _snapshots(server) == []
    assert _keys(s3, sbx.sandbox_id) == []

    # With the bucket back, the same sandbox pauses and resumes.
    sbx.commands.run("rm /home/user/big.bin")  # (200 MiB of chunks to upload otherwise)
    assert sbx.pause()
    back = Sandbox.connect(sbx.sandbox_id, timeout=300, **opts)
    assert back.files.read("/home/user/work.txt") == "unsaved work"
    back.kill()
    _wait_for(lambda: _keys(s3, sbx.sandbox_id) == [])


def test_a_stored_snapshot_of_another_runsc_version_is_refused_and_kept(
    server: Server, s3: Any
) -> None:
    opts = _opts(server)
    sbx = Sandbox.create(timeout=300, **opts)
    sbx.files.write("/home/user/work.txt", "kept")
    assert sbx.pause()
    snapshots = server.state_dir / "snapshots"
    shutil.rmtree(snapshots / sbx.sandbox_id)  # only the bucket has it
    keys = _keys(s3, sbx.sandbox_id)
    (manifest_key,) = [k for k in keys if k.endswith("/manifest.json")]
    original = s3.get_object(Bucket=BUCKET, Key=manifest_key)["Body"].read()
    manifest = json.loads(original)
    ours, theirs = manifest["runsc_version"], "0.0~20991231.0"
    s3.put_object(Bucket=BUCKET, Key=manifest_key,
                  Body=json.dumps({**manifest, "runsc_version": theirs}).encode())  # fmt: skip

    for _ in range(2):  # refused again the same way: the first refusal changed nothing
        with pytest.raises(SandboxException) as refused:
            Sandbox.connect(sbx.sandbox_id, **opts)
        assert refused.value.status_code == 409  # type: ignore[attr-defined]
        assert f"made by runsc {theirs}, this node runs {ours}" in str(refused.value)
        assert Sandbox.get_info(sbx.sandbox_id, **opts).state == SandboxState.PAUSED
        assert _snapshots(server) == []  # nothing downloaded, nothing half-written
        assert _keys(s3, sbx.sandbox_id) == keys  # the stored snapshot is kept

    s3.put_object(Bucket=BUCKET, Key=manifest_key, Body=original)
    back = Sandbox.connect(sbx.sandbox_id, **opts)
    assert back.files.read("/home/user/work.txt") == "kept"
    back.kill()
    _wait_for(lambda: _keys(s3, sbx.sandbox_id) == [])


def test_an_unreachable_store_refuses_the_pause_and_the_start(
    server: Server, moto: MotoServer, s3: Any
) -> None:
    opts = _opts(server)
    sbx = Sandbox.create(timeout=300, **opts)
    sbx.files.write("/home/user/work.txt", "unsaved work")
    moto.stop()
    unreachable = f"503.*snapshot store s3://{BUCKET}/{PREFIX} is unreachable"
    with pytest.raises(ServiceBusyException, match=unreachable):
        sbx.pause()
    assert sbx.is_running()
    assert Sandbox.get_info(sbx.sandbox_id, **opts).state == SandboxState.RUNNING
    assert sbx.files.read("/home/user/work.txt") == "unsaved work"
    assert _snapshots(server) == []

    # A server whose store cannot be reached does not start, and says what to check.
    server.stop()
    with pytest.raises(RuntimeError) as refused:
        server.start()
    assert f"error: snapshot store s3://{BUCKET}/{PREFIX} is unreachable" in str(refused.value)
    assert "VIVARIUM_S3_ENDPOINT_URL" in str(refused.value)
    moto.start()  # an empty store again: moto keeps its data in memory
    s3.create_bucket(Bucket=BUCKET)
    server.start()
    assert sbx.is_running()  # adopted across the restarts
    assert sbx.files.read("/home/user/work.txt") == "unsaved work"
    assert sbx.pause()
    assert [k for k in _keys(s3, sbx.sandbox_id) if k.endswith("/manifest.json")]
    assert Sandbox.kill(sbx.sandbox_id, **opts)
    _wait_for(lambda: _keys(s3, sbx.sandbox_id) == [])


def test_a_pause_a_crash_cut_short_after_its_checkpoint_is_sealed_at_the_next_start(
    server: Server, s3: Any
) -> None:
    # The checkpoint stops the sandbox: from its end until the snapshot is sealed, the
    # checkpoint is the sandbox's only copy. A node killed then seals it when it starts again.
    opts = _opts(server)
    sbx = Sandbox.create(timeout=300, **opts)
    sbx.files.write("/home/user/work.txt", "written before the crash")
    sbx.commands.run("head -c 10M /dev/urandom > /home/user/big.bin")  # a seal that takes time
    _start_counter(sbx)
    staging = server.state_dir / "snapshots"

    def pause() -> None:
        with contextlib.suppress(Exception):  # its server dies under it
            sbx.pause()

    pausing = threading.Thread(target=pause, daemon=True)
    pausing.start()
    _wait_for(lambda: bool(list(staging.glob(f".tmp-{sbx.sandbox_id}-*/checkpointed.json"))), 120)
    server.stop(signal.SIGKILL)
    pausing.join(60)
    server.start()
    listed = {s.sandbox_id: s.state for s in Sandbox.list(**opts).next_items()}
    assert listed.get(sbx.sandbox_id) == SandboxState.PAUSED, listed
    with contextlib.closing(sqlite3.connect(server.state_dir / "vivarium.db")) as catalog:
        query = "select count(*) from snapshots where sandbox_id = ?"  # what retention reads
        assert catalog.execute(query, (sbx.sandbox_id,)).fetchone() == (1,)
    back = Sandbox.connect(sbx.sandbox_id, timeout=300, **opts)
    assert back.files.read("/home/user/work.txt") == "written before the crash"
    resumed = _count(back)  # the same process, with its memory
    assert resumed >= 3
    _wait_for(lambda: _count(back) > resumed)
    assert Sandbox.kill(sbx.sandbox_id, **opts)

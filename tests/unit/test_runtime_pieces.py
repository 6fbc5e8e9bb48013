from __future__ import annotations

import json
from pathlib import Path

import pytest

from vivarium.config import Settings
from vivarium.errors import ConfigError, HostNotReady, InvalidArgument
from vivarium.guest.envd import VOLUME_HUB
from vivarium.node.records import RecordStore, SandboxRecord, new_sandbox_id, valid_sandbox_id
from vivarium.runtime import procsys
from vivarium.runtime.bundle import Resources, base_spec, for_sandbox, has_volume_hub
from vivarium.runtime.cgroups import memory_stats, pids_limit_hits, settle_cpu
from vivarium.runtime.probe import Probe, check_release, release_date
from vivarium.runtime.runsc import checkpoint_error
from vivarium.templates.recipe import Recipe


def test_sandbox_spec_changes_only_netns_resources_cgroup_and_hub() -> None:
    spec = base_spec(Path("/t/rootfs"), ["/init"], ["A=1"], "sandbox", 100, Path("/t/hub"))
    out = for_sandbox(spec, Path("/var/run/netns/x"), Resources(256, 0.5, 100, 1024), "iabc",
                      Path("/c/hub"))  # fmt: skip
    assert out["root"] == spec["root"]
    hub = {"destination": VOLUME_HUB, "type": "bind", "source": "/t/hub",
           "options": ["rbind", "rw", "nosuid", "nodev"]}  # fmt: skip
    assert hub in spec["mounts"] and has_volume_hub(spec)
    assert out["mounts"] == [m if m != hub else {**hub, "source": "/c/hub"}
                             for m in spec["mounts"]]  # fmt: skip
    assert out["process"] == spec["process"]
    assert {"type": "network", "path": "/var/run/netns/x"} in out["linux"]["namespaces"]
    assert out["linux"]["resources"] == {
        "memory": {"limit": 256 * 1024 * 1024},
        # A starting sandbox outweighs running ones; the node settles it once it is up.
        "cpu": {"quota": 50_000, "period": 100_000, "shares": 65536},
        "pids": {"limit": 600},  # host tasks: the sentry's and the platform's as well
    }
    assert {"type": "RLIMIT_NPROC", "hard": 100, "soft": 100} in out["process"]["rlimits"]
    assert out["linux"]["cgroupsPath"] == "/vivarium/iabc"
    assert "cgroupsPath" not in spec["linux"]  # the template's spec is not modified


@pytest.mark.parametrize(
    "resources",
    [
        Resources(10, 1, 100, 1024),
        Resources(512, 0, 100, 1024),
        Resources(512, 1, 1, 1024),
        Resources(512, 1, 100, 1),
    ],
)
def test_resources_out_of_range_are_rejected(resources: Resources) -> None:
    with pytest.raises(InvalidArgument):
        resources.validate()


def test_procsys_copy_hides_only_rmem_default(tmp_path: Path) -> None:
    source = tmp_path / "sys"
    (source / "net" / "core").mkdir(parents=True)
    (source / "vm").mkdir()
    (source / "net" / "core" / "rmem_default").write_text("212992\n")
    (source / "net" / "core" / "somaxconn").write_text("4096\n")
    (source / "vm" / "mmap_min_addr").write_text("65536\n")
    copy = procsys.make_copy(tmp_path / "copy", source)
    assert not (copy / "net" / "core" / "rmem_default").exists()
    assert (copy / "net" / "core" / "somaxconn").read_text() == "4096\n"
    assert (copy / "vm" / "mmap_min_addr").read_text() == "65536\n"
    wrapped = procsys.wrap(["runsc", "run", "x"], copy)
    assert wrapped[:3] == ["unshare", "-m", "sh"]
    assert wrapped[-3:] == ["runsc", "run", "x"]


def test_cgroup_readers_handle_v1_layout(tmp_path: Path) -> None:
    memory = tmp_path / "memory" / "vivarium" / "iabc"
    memory.mkdir(parents=True)
    (memory / "memory.usage_in_bytes").write_text("1048576\n")
    (memory / "memory.limit_in_bytes").write_text("134217728\n")
    (memory / "memory.oom_control").write_text("oom_kill_disable 0\nunder_oom 0\noom_kill 1\n")
    pids = tmp_path / "pids" / "vivarium" / "iabc"
    pids.mkdir(parents=True)
    (pids / "pids.events").write_text("max 17\n")
    stats = memory_stats("iabc", tmp_path)
    assert stats is not None
    assert (stats.usage_bytes, stats.limit_bytes, stats.oom_kills) == (1048576, 134217728, 1)
    import vivarium.runtime.cgroups as cgroups

    assert cgroups.pids_limit_hits("iabc", tmp_path) == 17
    assert memory_stats("missing", tmp_path) is None
    assert pids_limit_hits("missing", tmp_path) == 0


def test_sandbox_ids_have_e2b_shape() -> None:
    ids = {new_sandbox_id() for _ in range(200)}
    assert len(ids) == 200
    for value in ids:
        assert len(value) == 20 and value[0] == "i" and valid_sandbox_id(value)
    assert not valid_sandbox_id("../etc")
    assert not valid_sandbox_id("")


def test_record_store_round_trip_and_strays(tmp_path: Path) -> None:
    store = RecordStore(tmp_path)
    record = SandboxRecord("iabc", "base", "b1", 3, "10.0.0.14", 1.0, 2.0, 512, 1.0, 100, True,
                           {"k": "v"}, {"E": "1"})  # fmt: skip
    store.save(record)
    (tmp_path / "ihalf").mkdir()
    (tmp_path / "ibroken").mkdir()
    (tmp_path / "ibroken" / "record.json").write_text("{")
    records, strays = store.load_all()
    assert records == [record]
    assert sorted(p.name for p in strays) == ["ibroken", "ihalf"]
    assert json.loads((tmp_path / "iabc" / "record.json").read_text())["metadata"] == {"k": "v"}


def test_recipe_hash_tracks_recipe_and_runsc() -> None:
    probe = Probe("0.0~20240729.0", "k", "ptrace", True, True)
    base = Recipe(name="base")
    assert base.recipe_hash(probe) == Recipe(name="base").recipe_hash(probe)
    assert base.recipe_hash(probe) != Recipe(name="base", packages=("python3",)).recipe_hash(probe)
    newer = Probe("0.0~20250101.0", "k", "ptrace", True, True)
    assert base.recipe_hash(probe) != base.recipe_hash(newer)


def test_settings_validation(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VIVARIUM_SLOT_PREFIX", "toolong")
    with pytest.raises(ConfigError, match="SLOT_PREFIX"):
        Settings.from_env()
    monkeypatch.setenv("VIVARIUM_SLOT_PREFIX", "viv")
    monkeypatch.setenv("VIVARIUM_SLOT_CIDR", "10.0.0.0/30")
    with pytest.raises(ConfigError, match="SLOT_CIDR"):
        Settings.from_env()
    monkeypatch.setenv("VIVARIUM_SLOT_CIDR", "10.231.0.0/18")
    monkeypatch.setenv("VIVARIUM_API_PORT", "http")
    with pytest.raises(ConfigError, match="API_PORT"):
        Settings.from_env()
    monkeypatch.setenv("VIVARIUM_API_PORT", "3000")
    monkeypatch.setenv("VIVARIUM_EGRESS_ALLOW", "10.1.2.3/32, not-a-cidr")
    with pytest.raises(ConfigError, match="EGRESS_ALLOW"):
        Settings.from_env()
    monkeypatch.setenv("VIVARIUM_EGRESS_ALLOW", "10.1.2.3/32")
    assert Settings.from_env().egress_allow == ("10.1.2.3/32",)


def test_a_refused_checkpoint_says_why_without_the_object_dump() -> None:
    stderr = (
        'checkpoint failed: checkpointing container "i1-0a": encoding error at object '
        'tcp.endpoint{ID:stack.TransportEndpointID{LocalPort:0x1f40, LocalAddress:"}"}, x:1}: '
        "endpoint still has waiters upon save:\ngoroutine 1 [running]:\n"
    )
    assert checkpoint_error(stderr) == (
        'checkpoint failed: checkpointing container "i1-0a": encoding error at object '
        "tcp.endpoint: endpoint still has waiters upon save"
    )
    assert checkpoint_error("no space left on device\n") == "no space left on device"


def test_runsc_releases_before_2024_07_29_are_refused_with_the_way_to_install() -> None:
    assert release_date("0.0~20240729.0") == 20240729
    assert release_date("release-20250310.0") == 20250310
    assert release_date("unknown") is None
    check_release("0.0~20240729.0")
    check_release("release-20251110.0")
    for old in ("0.0~20221219.0", "unknown"):
        with pytest.raises(HostNotReady, match="too old") as info:
            check_release(old)
        assert "bookworm-backports" in info.value.hint


@pytest.mark.parametrize(("layout", "value"), [("cpu/vivarium/iabc/cpu.shares", "1024"),
                                               ("vivarium/iabc/cpu.weight", "39")])  # fmt: skip
def test_a_started_sandbox_gets_a_running_ones_cpu_weight(
    tmp_path: Path, layout: str, value: str
) -> None:
    weight = tmp_path / layout  # cgroup v1, then v2
    weight.parent.mkdir(parents=True)
    weight.write_text("8192")
    assert settle_cpu("iabc", root=tmp_path)
    assert weight.read_text() == value
    assert not settle_cpu("gone", root=tmp_path)

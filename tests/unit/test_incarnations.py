"""Container ids of a sandbox's incarnations, and records written before they existed."""

from __future__ import annotations

import json
from pathlib import Path

from vivarium.node.records import RecordStore, SandboxRecord, new_container_id, new_sandbox_id


def _record(**extra: object) -> SandboxRecord:
    return SandboxRecord("iabc", "base", "b1", 3, "10.0.0.14", 1.0, 2.0, 512, 1.0, 100, True,
                         **extra)  # type: ignore[arg-type]  # fmt: skip


def test_every_incarnation_has_its_own_container_and_none_is_a_prefix_of_another() -> None:
    sandbox_id = new_sandbox_id()
    ids = {new_container_id(sandbox_id) for _ in range(200)}
    assert len(ids) == 200
    assert all(i.startswith(f"{sandbox_id}-") and len(i) == len(sandbox_id) + 7 for i in ids)
    # runsc resolves any unique prefix of a container id: none may be one of another's,
    # not even across sandboxes whose ids are prefixes of each other.
    others = {new_container_id(sandbox_id + "x") for _ in range(50)}
    everything = sorted(ids | others)
    assert not any(b.startswith(a) for a in everything for b in everything if a != b)


def test_records_are_kept_per_container(tmp_path: Path) -> None:
    store = RecordStore(tmp_path)
    record = _record(container_id="iabc-0a1b2c")
    store.save(record)
    assert (tmp_path / "iabc-0a1b2c" / "record.json").is_file()
    assert store.load_all() == ([record], [])


def test_a_record_from_before_incarnations_runs_in_the_container_named_after_the_sandbox(
    tmp_path: Path,
) -> None:
    legacy = {k: v for k, v in _record().to_json().items() if k != "container_id"}
    (tmp_path / "iabc").mkdir()
    (tmp_path / "iabc" / "record.json").write_text(json.dumps(legacy))
    [record], strays = RecordStore(tmp_path).load_all()
    assert strays == []
    assert record.container_id == "iabc"
    assert SandboxRecord.from_json(legacy).container_id == "iabc"  # in an old snapshot, too

"""envd's machine identity (guest/envd/identity.py), on a scratch file: never the host's."""

from __future__ import annotations

import re
import stat
from pathlib import Path

from vivarium.guest.envd.identity import new_machine_id


def test_a_new_machine_id_replaces_the_file_whole(tmp_path: Path) -> None:
    path = tmp_path / "machine-id"
    path.write_text("0" * 32 + "\n")
    first = new_machine_id(str(path))
    assert re.fullmatch("[0-9a-f]{32}", first)
    assert path.read_text() == first + "\n"
    assert stat.S_IMODE(path.stat().st_mode) == 0o444
    assert new_machine_id(str(path)) != first
    assert [p.name for p in tmp_path.iterdir()] == ["machine-id"]  # no temporary file left

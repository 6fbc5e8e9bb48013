"""A template build's layers: each step's overlayfs upper directory, kept in the cache, and
flattened onto the base's files exactly as the kernel's overlay showed them to the step."""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest

from vivarium.templates import layers
from vivarium.templates.layers import LayerCache


@pytest.fixture(autouse=True)
def as_root() -> None:
    if os.geteuid() != 0:
        pytest.fail("these tests mount overlayfs: run them as root (`make test`)")


def _view(root: Path) -> dict[str, tuple[str, ...]]:
    """What a tree shows: each entry's kind, mode, owner and contents or target."""
    seen: dict[str, tuple[str, ...]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            path = Path(dirpath, name)
            st = path.lstat()
            rel = str(path.relative_to(root))
            mode = f"{stat.S_IMODE(st.st_mode):o} {st.st_uid}"
            if path.is_symlink():
                seen[rel] = ("link", os.readlink(path))
            elif path.is_dir():
                seen[rel] = ("dir", mode)
            else:
                seen[rel] = ("file", mode, path.read_text())
    return seen


def _sh(script: str, cwd: Path) -> None:
    subprocess.run(["sh", "-ec", script], cwd=cwd, check=True)


def _step(tmp: Path, name: str, lowers: list[Path], script: str) -> tuple[Path, dict]:
    """Run `script` on an overlay of `lowers`; the upper directory and what the overlay showed."""
    upper, work, merged = tmp / name / "upper", tmp / name / "work", tmp / name / "merged"
    upper.mkdir(parents=True)
    work.mkdir()
    layers.mount_overlay(merged, lowers, upper, work)
    try:
        _sh(script, merged)
        view = _view(merged)
    finally:
        subprocess.run(["umount", str(merged)], check=True)
    return upper, view


def test_layers_flatten_to_what_the_overlay_showed(tmp_path: Path) -> None:
    base = tmp_path / "base"
    base.mkdir()
    _sh(
        "mkdir -p a dir/x opaque was_dir replace_me_dir; echo keep > a/keep; echo gone > a/gone;"
        "echo y > dir/x/y; echo old > hard1; ln hard1 hard2; ln -s a link; echo f > replace_me;"
        "echo old > opaque/old; echo in > was_dir/in; echo z > replace_me_dir/z",
        base,
    )
    cache = LayerCache(tmp_path / "cache")
    # Step 1: deletions (a file, a tree), a write to one of two hard links, kinds changed
    # both ways, a directory replaced by a new one of the same name (opaque), a link made.
    upper1, shown1 = _step(tmp_path, "one", [base],
                           "rm a/gone; rm -r dir/x; echo new > hard1; rm replace_me;"
                           "mkdir replace_me; echo inside > replace_me/in; rm -r was_dir;"
                           "echo now-a-file > was_dir; rm -r opaque; mkdir opaque;"
                           "echo fresh > opaque/new; mkdir fresh; ln -s ../a fresh/l;"
                           "rm -r replace_me_dir; ln -s a replace_me_dir; chmod 700 a")  # fmt: skip
    one = cache.put(layers.chain("scope", "one"), upper1, {"user": "user"})
    assert cache.get(one.key) == one and one.context == {"user": "user"} and not one.empty
    cache.release(one.key)
    # Step 2, on step 1's cached layer: it removes what step 1 made.
    upper2, shown2 = _step(tmp_path, "two", [one.diff, base],
                           "rm -r fresh opaque/new; echo again > a/gone")  # fmt: skip
    two = cache.put(layers.chain(one.key, "two"), upper2, {})

    flat = tmp_path / "flat"
    subprocess.run(["cp", "-a", f"{base}/.", str(flat)], check=True)
    layers.apply(one.diff, flat)
    assert _view(flat) == shown1
    assert (flat / "hard2").read_text() == "old\n"  # the write did not go through the link
    layers.apply(two.diff, flat)
    assert _view(flat) == shown2
    marks = [(p, x) for p in flat.rglob("*") for x in os.listxattr(p, follow_symlinks=False)
             if x.startswith("trusted.overlay.")]  # fmt: skip
    assert marks == []
    assert not any(stat.S_ISCHR(p.lstat().st_mode) for p in flat.rglob("*"))


def test_an_empty_step_pruning_and_a_step_run_again(tmp_path: Path) -> None:
    cache = LayerCache(tmp_path / "cache", budget_bytes=0)
    empty = cache.put("e" * 64, None, {"env": {"A": "1"}})  # held by its build
    assert empty.empty
    cache.release(empty.key)
    held = cache.put("h" * 64, None, {})
    assert cache.prune() >= 1  # over a budget of nothing: all go, but the one a build holds
    assert cache.get(empty.key) is None and cache.get(held.key) is not None
    cache.release(held.key)
    cache.release(held.key)
    cache.prune()
    assert cache.get(held.key) is None
    # A step that ran again (skip_cache) replaces what was kept under its key.
    (tmp_path / "first").mkdir()
    (tmp_path / "first" / "file").write_text("old")
    (tmp_path / "second").mkdir()
    (tmp_path / "second" / "file").write_text("new")
    first = cache.put("k" * 64, tmp_path / "first", {})
    cache.release(first.key)
    second = cache.put("k" * 64, tmp_path / "second", {"again": True})
    assert (second.diff / "file").read_text() == "new" and second.context == {"again": True}
    again = cache.get("k" * 64)
    assert again is not None and (again.diff / "file").read_text() == "new"

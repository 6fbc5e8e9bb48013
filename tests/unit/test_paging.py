"""Keyset paging of sandbox lists, both orders."""

from __future__ import annotations

from vivarium.api.shapes import page


def _all_pages(rows: list[dict[str, object]], ascending: bool) -> list[str]:
    seen: list[str] = []
    token = None
    while True:
        chunk, token = page(rows, 2, token, ascending=ascending)
        seen += [str(r["id"]) for r in chunk]
        if token is None:
            return seen


def test_pages_cover_every_row_once_in_either_order() -> None:
    rows = [{"id": f"s{i}", "started_at": float(i % 3)} for i in range(7)]  # ties on purpose
    newest_first = _all_pages(rows, ascending=False)
    oldest_first = _all_pages(rows, ascending=True)
    assert sorted(newest_first) == sorted(oldest_first) == sorted(str(r["id"]) for r in rows)
    assert [r for r in newest_first if r in ("s2", "s0")] == ["s2", "s0"]
    assert [r for r in oldest_first if r in ("s2", "s0")] == ["s0", "s2"]


def test_snapshots_page_by_their_creation_time() -> None:
    rows = [{"id": f"s{i}", "created_at": float(i)} for i in range(5)]
    chunk, token = page(rows, 3, None, by="created_at")
    assert [r["id"] for r in chunk] == ["s4", "s3", "s2"] and token
    chunk, token = page(rows, 3, token, by="created_at")
    assert [r["id"] for r in chunk] == ["s1", "s0"] and token is None

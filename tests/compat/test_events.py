"""Lifecycle events of sandboxes the official client drives: in the catalog (per sandbox and per
team, with who did it) and at the webhook, signed and in order."""

from __future__ import annotations

import hashlib
import hmac
import json
import time

from e2b import Sandbox

from tests.compat.conftest import WEBHOOK_SECRET, Compat, Webhook


def _posted(sandbox_id: str) -> list[dict[str, object]]:
    out = []
    for headers, body in list(Webhook.received):
        expected = "sha256=" + hmac.new(WEBHOOK_SECRET.encode(), body, hashlib.sha256).hexdigest()
        assert hmac.compare_digest(headers["X-Vivarium-Signature"], expected)
        event = json.loads(body)
        if event["sandboxID"] == sandbox_id:
            out.append(event)
    return out


def test_a_sandboxs_life_is_told_in_order(compat: Compat) -> None:
    sandbox = Sandbox.create(timeout=120)
    sandbox_id = sandbox.sandbox_id
    assert sandbox.pause()
    Sandbox.connect(sandbox_id, timeout=120)
    Sandbox.kill(sandbox_id)
    expected = [("created", "key:default"), ("paused", "key:default"),
                ("resumed", "key:default"), ("killed", "key:default")]  # fmt: skip
    with compat.admin() as http:
        mine = http.get(f"/sandboxes/{sandbox_id}/events").json()
        assert [(e["type"], e["actor"]) for e in mine] == expected
        assert mine[0]["reason"] == "from template base"
        team = http.get("/events", params={"after": mine[0]["id"] - 1, "limit": 100}).json()
        assert [e["id"] for e in team if e["sandboxID"] == sandbox_id] == [e["id"] for e in mine]
        assert http.get("/events", params={"limit": "lots"}).status_code == 400
        other = compat.new_team(f"events-{sandbox_id[-6:]}", max_sandboxes=1)
        theirs = http.get(f"/sandboxes/{sandbox_id}/events", headers={"X-API-Key": other})
        assert theirs.status_code == 404
    deadline = time.monotonic() + 30
    while len(_posted(sandbox_id)) < len(expected):
        assert time.monotonic() < deadline, _posted(sandbox_id)
        time.sleep(0.2)
    posted = _posted(sandbox_id)
    assert [(e["type"], e["actor"]) for e in posted] == expected
    assert [e["id"] for e in posted] == [e["id"] for e in mine]

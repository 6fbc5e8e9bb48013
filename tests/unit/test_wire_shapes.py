"""What the REST API answers, read by the official client's own parsers: states in between,
metadata filters as the client encodes them, and which errors it may resend by itself."""

from __future__ import annotations

import random
import urllib.parse

import httpx
from e2b.api.client.models.listed_sandbox import ListedSandbox
from e2b.api.client.models.sandbox_detail import SandboxDetail
from e2b.retry import _retry_delay

from vivarium.api import shapes
from vivarium.errors import CatalogUnavailable, HostNotReady, UpstreamFailed
from vivarium.httpjson import error_response

ROW = {
    "id": "iabc", "template_id": "tmpl123", "started_at": 0.0, "end_at": 60.0, "cpu_count": 1,
    "memory_mb": 1024, "disk_mb": 0, "envd_version": "0.2.0", "metadata": {"a": "b"},
    "volume_mounts": [], "allow_internet": True, "egress": None, "public_traffic": True,
    "auto_resume": False, "auto_pause": True,
}  # fmt: skip


def test_states_in_between_are_ones_the_client_knows() -> None:
    for state, seen in (("pausing", "paused"), ("starting", "running"), ("paused", "paused")):
        row = {**ROW, "state": state}
        assert ListedSandbox.from_dict(shapes.listed(row, "c")).state.value == seen
        detail = shapes.detail(row, None, "c", "localhost:3001", {"tmpl123": "my-app"})
        parsed = SandboxDetail.from_dict(detail)
        assert (parsed.state.value, parsed.alias) == (seen, "my-app")


def test_a_metadata_filter_reads_as_the_client_encodes_it() -> None:
    wanted = {"user": "a@b.com", "lesson": "7: loops & lists", "100%": "x=y"}
    # The client's paginator: each key and value quoted, then the whole encoded as one value.
    quoted = {urllib.parse.quote(k): urllib.parse.quote(v) for k, v in wanted.items()}
    params = {"metadata": urllib.parse.urlencode(quoted)}
    _, metadata, _, _ = shapes.list_query(params)
    assert metadata == wanted


def test_the_client_resends_only_what_a_retry_can_fix() -> None:
    request = httpx.Request("POST", "http://api/sandboxes")

    def resent(exc: Exception) -> bool:
        answer = error_response(exc)  # type: ignore[arg-type]
        response = httpx.Response(answer.status_code, headers=dict(answer.headers),
                                  content=answer.body, request=request)  # fmt: skip
        return _retry_delay(response, 0, random.random) is not None

    assert not resent(UpstreamFailed("the node failed mid-create"))  # it may have made one
    assert not resent(HostNotReady("built under another runsc"))
    assert resent(CatalogUnavailable("the catalog is down"))

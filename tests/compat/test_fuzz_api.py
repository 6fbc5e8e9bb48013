"""Schema-driven fuzzing of the REST API (schemathesis, from the served /openapi.json): whatever
the generated input, the server must never answer 5xx.

It runs as a team whose concurrency limit is 1, so generated creates that are valid start at
most one sandbox at a time (and are killed right away) instead of filling the host.
"""

from __future__ import annotations

import uuid
from typing import Any

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from tests.compat.conftest import Compat
from vivarium.api.openapi import document

pytestmark = pytest.mark.timeout(900)


@pytest.fixture(scope="module")
def fuzz_team(compat: Compat) -> dict[str, Any]:
    return {"key": compat.new_team(f"fuzz-{uuid.uuid4().hex[:6]}", max_sandboxes=1),
            "url": compat.api_url}  # fmt: skip


def test_no_server_errors(compat: Compat, fuzz_team: dict[str, Any]) -> None:
    # Schemathesis' own pytest plugin does not load under this pytest; its strategies do.
    schema = schemathesis.openapi.from_url(f"{compat.api_url}/openapi.json")
    headers = {"X-API-Key": fuzz_team["key"]}
    tested: set[tuple[str, str]] = set()
    for result in schema.get_all_operations():
        operation = result.ok()

        @given(case=operation.as_strategy())
        @settings(max_examples=20, deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))  # fmt: skip
        def no_5xx(case: schemathesis.Case) -> None:
            response = case.call(base_url=fuzz_team["url"], headers=headers)
            case.validate_response(response, checks=[not_a_server_error], headers=headers)
            if response.status_code == 201 and isinstance(response.json(), dict):
                created = response.json().get("sandboxID")
                if created:  # keep the team under its limit for the next examples
                    httpx.delete(f"{fuzz_team['url']}/sandboxes/{created}", headers=headers,
                                 timeout=30)  # fmt: skip

        no_5xx()
        tested.add((operation.path, operation.method.lower()))
    # Every operation of the document was exercised; the document lists every served route
    # (tests/unit/test_openapi_routes.py). Schemathesis leaves out the document's own route.
    documented = {(path, method) for path, ops in document()["paths"].items() for method in ops}
    assert tested == documented - {("/openapi.json", "get")}

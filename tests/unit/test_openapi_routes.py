"""The OpenAPI document lists every route the API serves, so that a walk over it (the security
suite's, the fuzzer's) reaches them all."""

from __future__ import annotations

from types import SimpleNamespace

from starlette.routing import Route

from vivarium.api.app import create_app
from vivarium.api.openapi import document
from vivarium.config import Settings


def test_every_served_route_is_in_the_openapi_document() -> None:
    control = SimpleNamespace(node_id="n", settings=Settings(), volumes=None, templates=None)
    app = create_app(control)  # type: ignore[arg-type]
    served = {
        (route.path, method.lower())
        for route in app.routes
        if isinstance(route, Route)
        for method in route.methods or ()
        if method != "HEAD"
    }
    documented = {(path, method) for path, ops in document()["paths"].items() for method in ops}
    assert served == documented

"""`network={"allow_public_traffic": False}`: the sandbox's own ports answer through the proxy
only with its traffic access token (as E2B's `e2b-traffic-access-token`); envd keeps its own
token check, and the code interpreter's client sends the traffic token itself."""

from __future__ import annotations

import time

import httpx
from e2b import Sandbox
from e2b_code_interpreter import Sandbox as CodeSandbox

from tests.compat.conftest import Compat

SERVER = "python3 -m http.server 8000 --directory /home/user"


def _get(compat: Compat, sandbox_id: str, **headers: str) -> httpx.Response:
    route = {"E2b-Sandbox-Id": sandbox_id, "E2b-Sandbox-Port": "8000"}
    deadline = time.monotonic() + 30
    while True:  # the server inside may still be starting
        response = httpx.get(compat.sandbox_url + "/", headers={**route, **headers}, timeout=30)
        if response.status_code != 502 or time.monotonic() > deadline:
            return response
        time.sleep(0.2)


def test_a_private_sandbox_serves_its_ports_only_with_its_token(compat: Compat) -> None:
    private = Sandbox.create(timeout=120, network={"allow_public_traffic": False})
    public = Sandbox.create(timeout=120)
    try:
        token = private.traffic_access_token
        assert token and public.traffic_access_token is None
        for sandbox in (private, public):
            sandbox.commands.run(SERVER, background=True)  # envd still answers the client
        assert _get(compat, public.sandbox_id).status_code == 200
        refused = _get(compat, private.sandbox_id)
        assert refused.status_code == 403 and "traffic access token" in refused.json()["message"]
        wrong = _get(compat, private.sandbox_id, **{"e2b-traffic-access-token": "0" * 64})
        assert wrong.status_code == 403
        served = _get(compat, private.sandbox_id, **{"e2b-traffic-access-token": token})
        assert served.status_code == 200
        # The token survives a pause: the same one opens it afterwards.
        assert private.pause()
        private = Sandbox.connect(private.sandbox_id, timeout=120)
        assert private.traffic_access_token == token
        private.commands.run(SERVER, background=True)
        served = _get(compat, private.sandbox_id, **{"e2b-traffic-access-token": token})
        assert served.status_code == 200
    finally:
        private.kill()
        public.kill()


def test_the_code_interpreter_works_in_a_private_sandbox(compat: Compat) -> None:
    sandbox = CodeSandbox.create(timeout=120, network={"allow_public_traffic": False})
    try:
        assert sandbox.traffic_access_token
        assert sandbox.run_code("6 * 7").text == "42"
    finally:
        sandbox.kill()

"""Compatibility suite: the pinned official `e2b` client against a real `vivarium serve`
(real sandboxes, the real API and proxy), configured the way the README tells users to."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from tests.integration.support import TEMPLATE_DIR, Server, make_server

API_PORT = 3110  # proxy on API_PORT + 1000
WEBHOOK_PORT = 3119  # the session's webhook receiver (lifecycle events)
WEBHOOK_SECRET = "compat-webhook-secret-0123456789"
# The tests' own OCI registry (test_template_images.py), the server's mirror for image names.
REGISTRY = "127.0.0.1:3132"


class Webhook(BaseHTTPRequestHandler):
    """Keeps what the server posts: (headers, body), in the order received."""

    received: list[tuple[dict[str, str], bytes]] = []

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = self.rfile.read(int(self.headers["Content-Length"]))
        Webhook.received.append((dict(self.headers), body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@dataclass(frozen=True)
class Compat:
    server: Server
    api_url: str
    sandbox_url: str
    api_key: str

    def admin(self) -> httpx.Client:
        return httpx.Client(base_url=self.api_url, headers={"X-API-Key": self.api_key},
                            timeout=60)  # fmt: skip

    def new_team(self, name: str, max_sandboxes: int = 5) -> str:
        """A second team's API key."""
        with self.admin() as http:
            response = http.post("/teams", json={"name": name, "maxSandboxes": max_sandboxes})
        assert response.status_code == 201, response.text
        return str(response.json()["apiKey"])


@pytest.fixture(scope="package")  # stopped once the compat suite is done: it weighs on the rest
def compat(internet: dict[str, str]) -> Iterator[Compat]:
    if os.geteuid() != 0:
        pytest.fail("the compatibility suite runs real sandboxes and needs root (`make test`)")
    if not os.path.isdir(os.path.join(TEMPLATE_DIR, "base", "current")):
        pytest.fail(f"no base template in {TEMPLATE_DIR}: run `make test`, which builds it")
    # With a warm pool: the official clients meet warm sandboxes as well as restored ones.
    srv = make_server("compat", "vx", "10.237.0.0/20", API_PORT, max_sandboxes="40",
                      team_max_sandboxes="30", slot_prewarm="8",
                      warm_pool="base=2,code-interpreter-v1=1", team_max_volumes="6",
                      volume_size_mb="64", webhook_secret=WEBHOOK_SECRET,
                      registry_mirror=REGISTRY, registry_insecure=REGISTRY,
                      build_step_timeout="15", build_disk_mb="300",
                      build_ca_file=internet["egress_ca_file"],
                      **internet,
                      webhook_url=f"http://127.0.0.1:{WEBHOOK_PORT}/events")  # fmt: skip
    hook = ThreadingHTTPServer(("127.0.0.1", WEBHOOK_PORT), Webhook)
    threading.Thread(target=hook.serve_forever, daemon=True).start()
    srv.start()
    key = (srv.state_dir / "admin.key").read_text().strip()
    env = Compat(srv, f"http://127.0.0.1:{API_PORT}", f"http://127.0.0.1:{API_PORT + 1000}", key)
    names = ("E2B_API_KEY", "E2B_API_URL", "E2B_SANDBOX_URL", "E2B_VOLUME_API_URL")
    saved = {k: os.environ.get(k) for k in names}
    os.environ.update(E2B_API_KEY=key, E2B_API_URL=env.api_url, E2B_SANDBOX_URL=env.sandbox_url,
                      E2B_VOLUME_API_URL=env.api_url)  # fmt: skip
    try:
        yield env
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        with env.admin() as http:
            for page in [http.get("/v2/sandboxes").json()]:
                for row in page:
                    http.delete(f"/sandboxes/{row['sandboxID']}")
        srv.stop()
        hook.shutdown()

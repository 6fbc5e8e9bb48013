"""The node's one call into a fresh sandbox: envd's POST /init (identity, env vars, token).

envd is already running in the template checkpoint, so it answers within milliseconds of the
restore; the retries only cover the restored network stack's first moments.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable

import httpx

from vivarium.errors import RuntimeFailure
from vivarium.guest.envd import PORT as ENVD_PORT

INIT_TIMEOUT_S = 10.0


def envd_http() -> httpx.AsyncClient:
    """One client for all of the node's calls into sandboxes. Creating a client costs ~30 ms
    of CPU (it loads the CA bundle) on the event loop; keep-alive is off because slot
    addresses are reused by later sandboxes."""
    return httpx.AsyncClient(timeout=5, limits=httpx.Limits(max_keepalive_connections=0))


async def init_envd(
    http: httpx.AsyncClient,
    address: str,
    *,
    sandbox_id: str,
    template_id: str,
    env_vars: dict[str, str],
    access_token: str | None = None,
    ca_bundle: str | None = None,
    timeout_s: float = INIT_TIMEOUT_S,
) -> None:
    body: dict[str, object] = {"sandboxId": sandbox_id, "templateId": template_id,
                               "envVars": env_vars, "timestamp": time.time()}  # fmt: skip
    if ca_bundle:  # the egress CA (network/egress_ca.py): its certificate, never its key
        body["caBundle"] = ca_bundle
    if access_token:
        body["accessToken"] = access_token
    url = f"http://{address}:{ENVD_PORT}/init"
    failure = await until_answered(lambda: http.post(url, json=body, timeout=2), timeout_s, 0.02)
    if failure is not None:
        raise RuntimeFailure(f"envd in sandbox {sandbox_id} did not answer /init ({failure})",
                             "the template may be broken: rebuild it with --force")  # fmt: skip


async def until_answered(
    send: Callable[[], Awaitable[httpx.Response]], timeout_s: float, interval_s: float
) -> str | None:
    """Repeat a request until it succeeds (2xx) or `timeout_s` has passed: None once it did,
    otherwise what went wrong the last time. For programs that are starting or restoring."""
    deadline = time.monotonic() + timeout_s
    failure = "no attempt"
    while time.monotonic() < deadline:
        try:
            response = await send()
            if response.is_success:
                return None
            failure = f"HTTP {response.status_code}: {response.text[:200]}"
        except httpx.TransportError as exc:
            failure = f"{type(exc).__name__}: {exc}"
        await asyncio.sleep(interval_s)
    return failure

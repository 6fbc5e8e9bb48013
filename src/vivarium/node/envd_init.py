"""The node's one call into a fresh sandbox: envd's POST /init (identity, env vars, token).

envd is already running in the template checkpoint, so it answers within milliseconds of the
restore; the retries only cover the restored network stack's first moments.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable

import httpx

from vivarium.errors import RuntimeFailure
from vivarium.guest.envd import PORT as ENVD_PORT

INIT_TIMEOUT_S = 10.0
WAKE_POLL_S = 0.005  # while runsc restores: a refused connection costs the node ~0.3 ms
WAKE_AFTER_S = 1.0  # how long a create waits for envd's first answer once runsc is done


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


async def wake_envd(http: httpx.AsyncClient, address: str) -> None:
    """Ask envd for /health until it answers: run beside `runsc restore`. A restored envd's
    first request is slow (~40 ms: its pages fault back in); made while runsc finishes, it no
    longer delays the /init after (measured 2026-12-03: node creates 523 -> 497 ms p50)."""
    url = f"http://{address}:{ENVD_PORT}/health"
    while True:
        with contextlib.suppress(httpx.TransportError):
            if (await http.get(url, timeout=WAKE_AFTER_S)).is_success:
                return
        await asyncio.sleep(WAKE_POLL_S)


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

"""The CLI's client of the public API: it talks to a vivarium server like any E2B client does.

Where to connect and with which key, first match wins:
- URL: `VIVARIUM_API_URL`, `E2B_API_URL`, else this host's configured API address;
- sandbox traffic: `VIVARIUM_SANDBOX_URL`, `E2B_SANDBOX_URL`, else the configured proxy address;
- key: `VIVARIUM_API_KEY`, `E2B_API_KEY`, else the first key the server saved for root.

With TLS configured (`VIVARIUM_TLS_CERT`), the host's own addresses are reached over HTTPS and
trusted by that very certificate; URLs given in the environment are checked against the system's
CAs (or `SSL_CERT_FILE`), as any client would.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import httpx

from vivarium.cli.envd import Verify, proxy_headers
from vivarium.config import Settings
from vivarium.errors import VivariumError
from vivarium.tls import pinned_client_context


class ApiError(VivariumError):
    """The API refused (its JSON message is ours to show) or could not be reached."""

    code = "api"

    def __init__(self, message: str, hint: str = "", status: int = 0) -> None:
        super().__init__(message, hint)
        self.http_status = status


def _local(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "") else host


@dataclass(frozen=True)
class Endpoints:
    api_url: str
    sandbox_url: str
    api_key: str
    verify: Verify = True

    @classmethod
    def resolve(cls, settings: Settings, api_key: str | None = None) -> Endpoints:
        env = os.environ
        scheme = settings.scheme
        given_api = env.get("VIVARIUM_API_URL") or env.get("E2B_API_URL")
        api_url = given_api or f"{scheme}://{_local(settings.api_host)}:{settings.api_port}"
        sandbox_url = (
            env.get("VIVARIUM_SANDBOX_URL")
            or env.get("E2B_SANDBOX_URL")
            or (f"{scheme}://{_local(settings.proxy_host)}:{settings.proxy_port}")
        )
        verify: Verify = True
        if settings.tls_cert and not given_api:
            verify = pinned_client_context(settings.tls_cert)
        key = api_key or env.get("VIVARIUM_API_KEY") or env.get("E2B_API_KEY") or ""
        if not key:
            try:
                key = settings.admin_key_file.read_text().strip()
            except OSError:
                raise ApiError(
                    "no API key",
                    "set VIVARIUM_API_KEY (or E2B_API_KEY), or run as root on the "
                    "server host, where the first key is saved",
                ) from None
        return cls(api_url.rstrip("/"), sandbox_url.rstrip("/"), key, verify)


class ApiClient:
    def __init__(self, endpoints: Endpoints) -> None:
        self.endpoints = endpoints
        self._http = httpx.Client(base_url=endpoints.api_url, timeout=120,
                                  headers={"X-API-Key": endpoints.api_key},
                                  verify=endpoints.verify)  # fmt: skip
        self.last_next_token: str | None = None  # paging cursor of the last response

    def __enter__(self) -> ApiClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self._http.close()

    def call(self, method: str, path: str, body: dict[str, Any] | None = None,
             params: dict[str, str] | None = None) -> Any:  # fmt: skip
        try:
            response = self._http.request(method, path, json=body, params=params)
        except httpx.HTTPError as exc:
            raise ApiError(
                f"cannot reach the API at {self.endpoints.api_url}: {exc}",
                "is `vivarium serve` running? (or set VIVARIUM_API_URL)",
            ) from None
        self.last_next_token = response.headers.get("x-next-token") or None
        if response.status_code >= 400:
            try:
                message = str(response.json().get("message"))
            except ValueError:
                message = response.text[:300]
            raise ApiError(f"{message} (HTTP {response.status_code})", status=response.status_code)
        return response.json() if response.content else None

    def envd_headers(self, sandbox_id: str) -> dict[str, str]:
        """What the sandbox proxy and envd need: routing headers and the access token."""
        detail = self.call("GET", f"/sandboxes/{sandbox_id}")
        return proxy_headers(detail["sandboxID"], detail.get("envdAccessToken"))

"""A client for the node's Unix-socket API (used by the CLI, tests and the bench)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx

from vivarium.errors import HostNotReady, VivariumError


class NodeError(VivariumError):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.http_status = status


class NodeClient:
    def __init__(self, socket_path: Path, timeout: float = 120.0) -> None:
        self.socket_path = socket_path
        self._http = httpx.Client(
            transport=httpx.HTTPTransport(uds=str(socket_path)),
            base_url="http://node",
            timeout=timeout,
        )

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> NodeClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _call(self, method: str, path: str, body: dict[str, Any] | None = None) -> Any:
        try:
            response = self._http.request(method, path, json=body)
        except httpx.TimeoutException:
            raise HostNotReady(
                f"the vivarium server at {self.socket_path} did not answer {method} {path} in time",
                "it may be overloaded; see its log",
            ) from None
        except httpx.TransportError as exc:
            raise HostNotReady(
                f"cannot reach the vivarium server at {self.socket_path} ({exc!r})",
                "start it with `make run` or `vivarium serve`",
            ) from None
        if response.status_code >= 400:
            try:
                message = str(response.json().get("message", response.text))
            except ValueError:
                message = response.text
            raise NodeError(response.status_code, message)
        return response.json() if response.content else None

    def info(self) -> dict[str, Any]:
        data: dict[str, Any] = self._call("GET", "/node")
        return data

    def create(self, **fields: Any) -> dict[str, Any]:
        body = {k: v for k, v in fields.items() if v is not None}
        data: dict[str, Any] = self._call("POST", "/sandboxes", body)
        return data

    def list_sandboxes(self) -> list[dict[str, Any]]:
        data: list[dict[str, Any]] = self._call("GET", "/sandboxes")
        return data

    def get(self, sandbox_id: str) -> dict[str, Any]:
        data: dict[str, Any] = self._call("GET", f"/sandboxes/{sandbox_id}")
        return data

    def kill(self, sandbox_id: str) -> None:
        self._call("DELETE", f"/sandboxes/{sandbox_id}")

    def set_timeout(self, sandbox_id: str, timeout: int) -> dict[str, Any]:
        data: dict[str, Any] = self._call("POST", f"/sandboxes/{sandbox_id}/timeout",
                                          {"timeout": timeout})  # fmt: skip
        return data

    def exec(self, sandbox_id: str, cmd: list[str], **options: Any) -> dict[str, Any]:
        body = {"cmd": cmd, **{k: v for k, v in options.items() if v is not None}}
        data: dict[str, Any] = self._call("POST", f"/sandboxes/{sandbox_id}/exec", body)
        return data

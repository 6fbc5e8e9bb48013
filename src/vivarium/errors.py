"""Errors that reach a user. Each carries a stable code and, where one exists, what to do."""

from __future__ import annotations


class VivariumError(Exception):
    """Base error: `code` is machine-readable, the message says what happened and what to do."""

    code = "internal"
    http_status = 500
    # The official clients resend a 429, 502, 503 or 504 by themselves unless told not to:
    # False for an error that a retry within seconds cannot fix, or that may repeat an action.
    retry: bool | None = None

    def __init__(self, message: str, hint: str = "") -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __str__(self) -> str:
        return f"{self.message} ({self.hint})" if self.hint else self.message

    def to_json(self) -> dict[str, object]:
        body: dict[str, object] = {"code": self.http_status, "message": str(self)}
        body["error_code"] = self.code
        return body

    def headers(self) -> dict[str, str]:
        return {} if self.retry is None else {"Should-Retry": str(self.retry).lower()}


class ConfigError(VivariumError):
    code = "config"
    http_status = 500


class InvalidArgument(VivariumError):
    code = "invalid_argument"
    http_status = 400


class Unauthenticated(VivariumError):
    code = "unauthenticated"
    http_status = 401


class Forbidden(VivariumError):
    code = "forbidden"
    http_status = 403


class NotFound(VivariumError):
    code = "not_found"
    http_status = 404


class Conflict(VivariumError):
    code = "conflict"
    http_status = 409


class CannotSave(VivariumError):
    """The sandbox is in a state its runtime cannot checkpoint; it keeps running. Not 409: the
    E2B client reads a 409 on pause as "already paused"."""

    code = "cannot_save"
    http_status = 422


class CapacityExhausted(VivariumError):
    code = "resource_exhausted"
    http_status = 429


class NodeFull(CapacityExhausted):
    """This node runs its maximum: in a cluster, the API places the sandbox on another."""

    code = "node_full"


class HostNotReady(VivariumError):
    """The host lacks something (root, runsc, a kernel feature): the hint says how to fix it."""

    code = "host_not_ready"
    http_status = 503
    retry: bool | None = False


class NodeUnavailable(HostNotReady):
    """The node takes no new sandboxes (drained by the operator, or its heartbeat stopped)."""

    code = "node_unavailable"
    retry = None  # another node, or this one back, may take it


class CatalogUnavailable(HostNotReady):
    """The database (VIVARIUM_DATABASE_URL) cannot be reached: nothing was changed."""

    code = "catalog_unavailable"
    retry = None  # it recovers by itself


class InsufficientStorage(HostNotReady):
    """The node's disk cannot take what is asked now (a resume's rebuilt image): retry once
    space is freed."""

    code = "insufficient_storage"


class UpstreamFailed(VivariumError):
    """A cluster's node took a request and failed to answer it (it may have acted on it)."""

    code = "node_failed"
    http_status = 502
    retry = False  # the node may have acted on it: a create sent again could make two


class RuntimeFailure(VivariumError):
    """runsc or a network command failed; the message carries its stderr."""

    code = "runtime"
    http_status = 500

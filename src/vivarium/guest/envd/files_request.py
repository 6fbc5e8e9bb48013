"""What every `/files` request shares: `HTTPError`, which answers with the JSON body envd sends
(`{"code": <status>, "message": ...}`; the SDK maps 400/401/404/507 to its exceptions), the
mapping of Connect error codes onto HTTP statuses, and reading the acting user (`username`) and
the path from the query. Kept below download.py, upload.py and files_headers.py so they can all
raise the same errors without importing the module that routes to them.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from .access import resolve_path
from .auth import User, lookup_user
from .connect import ConnectError
from .state import EnvdState

CHUNK = 256 * 1024

_STATUS = {
    "invalid_argument": 400,
    "failed_precondition": 400,
    "permission_denied": 403,
    "not_found": 404,
    "already_exists": 409,
    "resource_exhausted": 507,
}


class HTTPError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message

    def response(self) -> Response:
        return JSONResponse({"code": self.status, "message": self.message}, self.status)


def from_connect(exc: ConnectError) -> HTTPError:
    return HTTPError(_STATUS.get(exc.code, 500), exc.message)


def query_user(request: Request, state: EnvdState) -> User:
    name = request.query_params.get("username") or state.default_user
    try:
        return lookup_user(name)
    except ConnectError:
        raise HTTPError(401, f"error looking up user '{name}'") from None


def query_path(request: Request, user: User, state: EnvdState, path: str | None = None) -> str:
    try:
        return resolve_path(
            request.query_params.get("path", "") if path is None else path,
            user, state.default_workdir,
        )  # fmt: skip
    except ConnectError as exc:
        raise HTTPError(400, exc.message) from None

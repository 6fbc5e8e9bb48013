"""Who a request acts as: the user from HTTP Basic auth (`user:` with no password, as the E2B
clients send it), else the default user; and the access token check."""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
import pwd
import time
from dataclasses import dataclass

from starlette.requests import Request

from .connect import ConnectError
from .state import EnvdState


@dataclass(frozen=True)
class User:
    name: str
    uid: int
    gid: int
    home: str
    shell: str
    groups: tuple[int, ...]  # every gid the user belongs to, as the kernel should see it


ACCOUNT_FILES = ("/etc/passwd", "/etc/group")
_users: dict[str, User] = {}
_accounts_seen: tuple[tuple[int, int], ...] = ()


def _accounts_version() -> tuple[tuple[int, int], ...]:
    stamps = []
    for path in ACCOUNT_FILES:
        try:
            st = os.stat(path)
            stamps.append((st.st_mtime_ns, st.st_size))
        except OSError:
            stamps.append((0, 0))
    return tuple(stamps)


def lookup_user(name: str) -> User:
    """The account, cached until /etc/passwd or /etc/group change (a lookup reads both files,
    which costs ~1 ms per command inside a sandbox)."""
    global _accounts_seen
    version = _accounts_version()
    if version != _accounts_seen:
        _users.clear()
        _accounts_seen = version
    if name in _users:
        return _users[name]
    try:
        entry = pwd.getpwnam(name)
    except KeyError:
        raise ConnectError("permission_denied", f"user {name!r} does not exist") from None
    try:
        groups = tuple(os.getgrouplist(entry.pw_name, entry.pw_gid))
    except OSError:
        groups = (entry.pw_gid,)
    user = User(entry.pw_name, entry.pw_uid, entry.pw_gid, entry.pw_dir,
                entry.pw_shell or "/bin/sh", groups)  # fmt: skip
    _users[name] = user
    return user


def user_name(request: Request, state: EnvdState) -> str:
    header = request.headers.get("authorization", "")
    if header.lower().startswith("basic "):
        try:
            decoded = base64.b64decode(header[6:].strip()).decode()
        except ValueError:
            raise ConnectError("invalid_argument", "malformed Authorization header") from None
        name = decoded.split(":", 1)[0]
        if name:
            return name
    return state.default_user


def request_user(request: Request, state: EnvdState) -> User:
    return lookup_user(user_name(request, state))


def token_ok(request: Request, state: EnvdState) -> bool:
    if not state.access_token:
        return True
    sent = request.headers.get("x-access-token", "")
    return hmac.compare_digest(sent.encode(), state.access_token.encode())


def file_signature(path: str, operation: str, user: str, token: str, expiration: str) -> str:
    """The v1 signature of pre-signed /files URLs (`download_url()` / `upload_url()`)."""
    raw = f"{path}:{operation}:{user}:{token}" + (f":{expiration}" if expiration else "")
    digest = hashlib.sha256(raw.encode()).digest()
    return "v1_" + base64.b64encode(digest).rstrip(b"=").decode()


def signature_ok(request: Request, state: EnvdState) -> bool:
    """A /files request without the token header may carry a signature made with it instead."""
    if not state.access_token or request.url.path != "/files":
        return False
    query = request.query_params
    sent, expiration = query.get("signature", ""), query.get("signature_expiration", "")
    if expiration and not (expiration.isascii() and expiration.isdigit()):
        return False  # int() would refuse it (`²` is a digit to isdigit)
    if not sent or (expiration and int(expiration[:19]) < time.time()):
        return False
    operation = "read" if request.method == "GET" else "write"
    expected = file_signature(query.get("path", ""), operation, query.get("username", ""),
                              state.access_token, expiration)  # fmt: skip
    return hmac.compare_digest(sent.encode(), expected.encode())

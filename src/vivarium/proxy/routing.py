"""Which sandbox and port a request is for.

The e2b client, given one `sandbox_url`, names the target with two headers on every request;
clients that use E2B's public URL shape (get_host) put it in the host name instead:
`{port}-{sandboxId}.{domain}`, where the domain is `localhost` unless a wildcard DNS name was
configured, and any port after it is not part of the name.
Pre-signed `/files` URLs carry neither: the sandbox is the one whose access token made the
signature (envd checks it again, with its expiry).
"""

from __future__ import annotations

import hmac
import urllib.parse
from collections.abc import Iterable
from dataclasses import dataclass

from vivarium.guest.envd.auth import file_signature

ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_")

ID_HEADER = b"e2b-sandbox-id"
PORT_HEADER = b"e2b-sandbox-port"


@dataclass(frozen=True, slots=True)
class Route:
    sandbox_id: str
    port: int


class RoutingError(Exception):
    """The request names a sandbox, but not in a usable way (answered with 400)."""


def route_request(headers: Iterable[tuple[bytes, bytes]], domain: str | None) -> Route | None:
    """The request's target, or None when it names none (then only `/health` is answered).

    `headers` are h11's: names already lower-case. The headers win over the host name, so a
    client that sends both reaches what its headers say.
    """
    sandbox_id = port = host = None
    for name, value in headers:
        if name == ID_HEADER:
            sandbox_id = value
        elif name == PORT_HEADER:
            port = value
        elif name == b"host":
            host = value
    if sandbox_id is not None or port is not None:
        if not sandbox_id:
            raise RoutingError("Missing E2b-Sandbox-Id header (E2b-Sandbox-Port was sent)")
        if port is None:
            raise RoutingError("Missing E2b-Sandbox-Port header (E2b-Sandbox-Id was sent)")
        return Route(_sandbox_id(sandbox_id), _port(port))
    if domain and host:
        return _route_from_host(host.decode("latin-1"), domain)
    return None


@dataclass(frozen=True, slots=True)
class SignedFiles:
    """A pre-signed `/files` URL (the client's `upload_url()`/`download_url()`): it names no
    sandbox, but its signature was made with one sandbox's access token."""

    path: str
    operation: str  # "read" or "write", as envd signs them
    username: str
    expiration: str
    signature: str

    def made_with(self, token: str) -> bool:
        expected = file_signature(self.path, self.operation, self.username, token,
                                  self.expiration)  # fmt: skip
        return hmac.compare_digest(expected.encode(), self.signature.encode())


def signed_files(method: bytes, target: bytes) -> SignedFiles | None:
    path, _, query = target.decode("latin-1").partition("?")
    if path != "/files":
        return None
    params = dict(urllib.parse.parse_qsl(query, keep_blank_values=True))
    if not params.get("signature"):
        return None
    return SignedFiles(params.get("path", ""), "read" if method == b"GET" else "write",
                       params.get("username", ""), params.get("signature_expiration", ""),
                       params["signature"])  # fmt: skip


def _route_from_host(host: str, domain: str) -> Route | None:
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    suffix = "." + domain.rsplit(":", 1)[0].strip(".").lower()
    if not name.lower().endswith(suffix):
        return None
    label = name[: -len(suffix)]
    port, sep, sandbox_id = label.partition("-")
    if not sep or "." in label:
        raise RoutingError(f"Host {host!r} is not of the form {{port}}-{{sandboxId}}{suffix}")
    return Route(_sandbox_id(sandbox_id.encode("latin-1")), _port(port.encode("latin-1")))


def _sandbox_id(value: bytes) -> str:
    text = value.decode("latin-1").strip()
    if not text or len(text) > 128 or not ID_CHARS.issuperset(text):
        raise RoutingError(f"Invalid sandbox id {text[:128]!r}")
    return text


def _port(value: bytes) -> int:
    text = value.decode("latin-1").strip()
    if not (text.isascii() and text.isdigit() and len(text) <= 5 and 0 < int(text) < 65536):
        raise RoutingError(f"Invalid sandbox port {text[:16]!r}")
    return int(text)

"""The cluster secret: every part of a cluster has it, and a node's API answers only requests
that carry it. It also seeds the sandboxes' envd and traffic tokens, so that any node derives
the same token for a sandbox (a sandbox paused on one node resumes on another with its own)."""

from __future__ import annotations

import hashlib
import hmac
import json

from starlette.types import ASGIApp, Receive, Scope, Send

HEADER = "x-vivarium-cluster-secret"
REFUSED = "x-vivarium-cluster-refused"  # on a node's 401: the secret was missing or wrong


NODE_HEADER = "x-vivarium-node"  # what nodes send only each other; the API never passes it on


def node_credential(secret: str) -> str:
    """What a node proves itself with to another node's routes for nodes (a volume's hand-over):
    the cluster's API adds the cluster secret to what it forwards, never this."""
    return hmac.new(secret.encode(), b"vivarium node to node", hashlib.sha256).hexdigest()


def signing_key(secret: str) -> bytes:
    """What the nodes sign what they store for each other with (node/shelf.py): whoever can
    write to the bucket but lacks the secret cannot hand a node a build or volume to mount."""
    return hmac.new(secret.encode(), b"vivarium shelf signature", hashlib.sha256).digest()


def check_value(secret: str) -> str:
    """What the registry keeps of a node's secret: whether two nodes share one, never it."""
    return hmac.new(secret.encode(), b"vivarium cluster secret check", hashlib.sha256).hexdigest()


def token_seed(secret: str) -> bytes:
    """The seed every node of the cluster derives sandbox tokens from."""
    return hmac.new(secret.encode(), b"vivarium token seed", hashlib.sha256).hexdigest().encode()


class RequireSecret:
    """ASGI middleware of a node's API: without the cluster secret in HEADER, 401 and nothing
    else (which routes exist is nobody else's business either)."""

    def __init__(self, app: ASGIApp, secret: str) -> None:
        self.app = app
        self._secret = secret.encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self.app(scope, receive, send)
            return
        if scope["type"] != "http":  # websockets: none is the cluster's
            await send({"type": "websocket.close", "code": 1008})
            return
        sent = b""
        for name, value in scope["headers"]:
            if name == HEADER.encode():
                sent = value
        if hmac.compare_digest(sent, self._secret):
            await self.app(scope, receive, send)
            return
        message = ("this is a cluster node: send requests to the cluster's API, which carries "
                   "the cluster secret")  # fmt: skip
        body = json.dumps({"code": 401, "message": message}).encode()
        await send({"type": "http.response.start", "status": 401,
                    "headers": [(b"content-type", b"application/json"),
                                (b"content-length", b"%d" % len(body)),
                                (REFUSED.encode(), b"1")]})  # fmt: skip
        await send({"type": "http.response.body", "body": body})

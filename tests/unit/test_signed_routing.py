"""Which sandbox a pre-signed `/files` URL is for (proxy/routing.signed_files): the one whose
access token made the signature, as the official client makes it."""

from __future__ import annotations

import urllib.parse
from collections.abc import Callable

from e2b.sandbox.signature import get_signature

from vivarium.proxy.routing import signed_files

TOKENS = {"ione": "token-one", "itwo": "token-two"}


def _signer(made_with: Callable[[str], bool]) -> str | None:
    return next((sid for sid, token in TOKENS.items() if made_with(token)), None)


def test_a_signed_url_names_the_sandbox_whose_token_signed_it() -> None:
    sig = get_signature("/home/user/a.txt", "read", "user", "token-two", 60)
    query = urllib.parse.urlencode({"path": "/home/user/a.txt", "username": "user",
                                    "signature": sig["signature"],
                                    "signature_expiration": sig["expiration"]})  # fmt: skip
    read = signed_files(b"GET", f"/files?{query}".encode())
    assert read is not None and _signer(read.made_with) == "itwo"
    write = signed_files(b"POST", f"/files?{query}".encode())  # signed to read, not to write
    assert write is not None and _signer(write.made_with) is None
    assert signed_files(b"GET", b"/files?path=/a") is None  # no signature: not this route
    assert signed_files(b"GET", f"/other?{query}".encode()) is None

"""Raw Connect streams, for wire details the official client does not surface."""

from __future__ import annotations

import json
import struct
from collections.abc import Iterator
from typing import Any

import httpx


def envelope(message: dict[str, Any]) -> bytes:
    payload = json.dumps(message).encode()
    return struct.pack(">BI", 0, len(payload)) + payload


def connect_stream(
    url: str, path: str, message: dict[str, Any], headers: dict[str, str] | None = None
) -> Iterator[dict[str, Any]]:
    """Yield a server stream's messages as they arrive; the end-of-stream frame comes last,
    wrapped as {"end_of_stream": ...}."""
    with httpx.Client(timeout=20) as client, client.stream(
        "POST", f"{url}{path}", content=envelope(message),
        headers={"content-type": "application/connect+json", **(headers or {})},
    ) as response:  # fmt: skip
        buffer = b""
        for chunk in response.iter_bytes():
            buffer += chunk
            while len(buffer) >= 5:
                flags, length = struct.unpack(">BI", buffer[:5])
                if len(buffer) < 5 + length:
                    break
                frame = json.loads(buffer[5 : 5 + length])
                buffer = buffer[5 + length :]
                yield {"end_of_stream": frame} if flags & 2 else frame

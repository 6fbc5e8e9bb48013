"""Connect's envelope framing and proto-JSON `bytes`: the wire details that both envd and the
CLI's envd client need. Standard library only, so that host code can share it without pulling in
guest code (and guest code still never imports host code).

An envelope is 1 flag byte, a 4-byte big-endian length and the message.
"""

from __future__ import annotations

import base64
import struct

FLAG_COMPRESSED = 0x01
FLAG_END_STREAM = 0x02
_HEADER = struct.Struct(">BI")


def frame(payload: bytes, flags: int = 0) -> bytes:
    return _HEADER.pack(flags, len(payload)) + payload


class MessageTooLarge(ValueError):
    def __init__(self, length: int) -> None:
        super().__init__(f"message of {length} bytes is too large")
        self.length = length


class Deframer:
    """Splits a byte stream into (flags, payload) envelopes as its chunks arrive."""

    def __init__(self, max_message: int | None = None) -> None:
        self._buffer = bytearray()
        self._max = max_message

    def feed(self, chunk: bytes) -> list[tuple[int, bytes]]:
        self._buffer += chunk
        out: list[tuple[int, bytes]] = []
        while len(self._buffer) >= _HEADER.size:
            flags, length = _HEADER.unpack_from(self._buffer)
            if self._max is not None and length > self._max:
                raise MessageTooLarge(length)
            end = _HEADER.size + length
            if len(self._buffer) < end:
                break
            out.append((flags, bytes(self._buffer[_HEADER.size : end])))
            del self._buffer[:end]
        return out

    @property
    def partial(self) -> bool:
        """Whether the bytes so far end in the middle of an envelope."""
        return bool(self._buffer)


def encode_bytes(data: bytes) -> str:
    return base64.b64encode(data).decode()


def decode_bytes(text: str) -> bytes:
    """Proto JSON `bytes`: standard or URL-safe base64, padding optional. Raises ValueError
    (binascii.Error) for anything else."""
    text = text.replace("-", "+").replace("_", "/")
    return base64.b64decode(text + "=" * (-len(text) % 4), validate=True)

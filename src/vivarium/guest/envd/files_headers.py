"""The headers `/files` acts on: Accept-Encoding (whether a download is gzipped), Content-Encoding
(whether an upload's body is, and the `Decoder` that gunzips it as it streams in) and a multipart
part's Content-Disposition (its form field and file name). Kept apart from the handlers because
each is a small parser of its own, with envd's semantics rather than a library's.
"""

from __future__ import annotations

import contextlib
import re
import urllib.parse
import zlib
from collections.abc import Callable
from typing import Any

from starlette.requests import Request

from .files_request import CHUNK, HTTPError


# Parsed by hand: envd's q-value semantics decide (identity acceptable unless refused with q=0, a
# malformed q counting as 1), and none of the vendored libraries parses Accept-Encoding.
def accept_gzip(header: str) -> bool:
    """Whether to gzip a download, choosing by q-value as envd does (RFC 7231 §5.3.4): identity
    is acceptable unless refused with q=0, and then only gzip (or `*`) can serve."""
    if not header.strip():
        return False
    choices: list[tuple[float, str]] = []
    for item in header.split(","):
        name, _, params = item.partition(";")
        quality = 1.0
        for param in params.split(";"):
            key, _, value = param.strip().partition("=")
            if key.lower() == "q":
                with contextlib.suppress(ValueError):  # a malformed q counts as 1, as in envd
                    quality = float(value)
        choices.append((quality, name.strip().lower()))
    identity_refused = any(name == "identity" and q == 0 for q, name in choices)
    for quality, name in sorted(choices, key=lambda c: -c[0]):
        if quality == 0:
            continue
        if name == "identity":
            return False
        if name == "*":
            return identity_refused
        if name == "gzip":
            return True
    if identity_refused:
        raise HTTPError(406, f"no acceptable encoding in {header!r}; supported: gzip, identity")
    return False


def content_encoding(request: Request) -> bool:
    """Whether the body is gzipped; other encodings are refused."""
    value = request.headers.get("content-encoding", "").split(";")[0].strip().lower()
    if value in ("", "identity"):
        return False
    if value == "gzip":
        return True
    raise HTTPError(400, f"unsupported Content-Encoding: {value}, supported: gzip")


class Decoder:
    """The request body as sent: as is, or gunzipped (several gzip members allowed) with output
    bounded per step so a small bomb cannot balloon memory."""

    def __init__(self, gzip: bool) -> None:
        self.gzip = gzip
        self.inflater = zlib.decompressobj(zlib.MAX_WBITS | 16) if gzip else None
        self.fed = False

    def feed(self, data: bytes, out: Callable[[bytes], Any]) -> None:
        if self.inflater is None:
            out(data)
            return
        try:
            while data:
                self.fed = True
                piece = self.inflater.decompress(data, CHUNK)
                if self.inflater.eof:
                    data = self.inflater.unused_data
                    self.inflater = zlib.decompressobj(zlib.MAX_WBITS | 16)
                    self.fed = False
                else:
                    data = self.inflater.unconsumed_tail
                if piece:
                    out(piece)
        except zlib.error as exc:
            raise HTTPError(400, f"error decompressing request body: {exc}") from None

    def finish(self, out: Callable[[bytes], Any]) -> None:
        if self.inflater is None or not self.fed:
            return
        try:
            while piece := self.inflater.decompress(self.inflater.unconsumed_tail, CHUNK):
                out(piece)
        except zlib.error as exc:
            raise HTTPError(400, f"error decompressing request body: {exc}") from None
        if not self.inflater.eof:
            raise HTTPError(400, "error decompressing request body: truncated gzip stream")


# Parsed by hand rather than with python-multipart's parse_options_header (0.0.20), which gets
# file names wrong for us: its IE6 workaround cuts a name starting with `C:\` or `\\` down to its
# last component (here the name is the destination path, directories and all); it folds
# `filename*` into `filename`, so the HTML5 escapes below could no longer be undone in the plain
# form only (`filename*=utf-8''%2522.txt` would become `".txt`); it undoes only the `\\` and
# `\"` quoted-pairs (`"a\b"` stays `a\b`); and it raises UnicodeEncodeError on a str header
# outside Latin-1.
_PARAM = re.compile(r';\s*([^\s=;]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;]*)')
# httpx and browsers escape `"` and control characters in multipart file names as %XX (the
# HTML5 form encoding); these sequences come back as the characters they stand for.
_HTML5_ESCAPE = re.compile(r"%(22|[01][0-9A-Fa-f])")


def part_filename(disposition: str) -> tuple[str, str | None]:
    """(form field name, file name) from a part's Content-Disposition, keeping the file name's
    directories (it is the full destination path)."""
    params: dict[str, str] = {}
    for key, raw in _PARAM.findall(disposition):
        value = raw.strip()
        if value.startswith('"') and value.endswith('"') and len(value) >= 2:
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        params[key.lower()] = value
    filename = None
    if "filename*" in params:
        _, _, encoded = params["filename*"].partition("''")
        filename = urllib.parse.unquote(encoded, errors="surrogateescape")
    elif "filename" in params:
        filename = _HTML5_ESCAPE.sub(lambda m: chr(int(m[1], 16)), params["filename"])
    return params.get("name", ""), filename

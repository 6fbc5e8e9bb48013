"""GET `/files`: streams a file out as the request's user may read it, gzipped when the client
asks. Never holds the whole file in memory: it is read in chunks from a worker thread (uvicorn's
flow control holds us back when the client is slow), and the response owns the descriptor so it
is closed however the stream ends.
"""

from __future__ import annotations

import os
import stat
import urllib.parse
import zlib
from collections.abc import AsyncIterator

from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from .access import R_OK, Access, blocking, os_error
from .connect import ConnectError
from .files_headers import accept_gzip
from .files_request import CHUNK, HTTPError, from_connect, query_path, query_user
from .state import EnvdState

GZIP_LEVEL = 1  # zlib's fastest: the SDK's httpx asks for gzip on every read by default


def _open_for_read(access: Access, path: str) -> tuple[int, os.stat_result]:
    access.search(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise HTTPError(404, f"path '{path}' does not exist") from None
    except NotADirectoryError:
        raise HTTPError(404, f"path '{path}' does not exist") from None
    except OSError as exc:
        raise from_connect(os_error(exc, path)) from None
    if stat.S_ISDIR(st.st_mode):
        raise HTTPError(400, f"path '{path}' is a directory")
    if stat.S_ISFIFO(st.st_mode) or stat.S_ISSOCK(st.st_mode):
        raise HTTPError(400, f"path '{path}' is not a regular file")  # opening would block
    access.require(path, R_OK, st)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise from_connect(os_error(exc, path)) from None
    return fd, os.fstat(fd)


class FileBody:
    """A download's body. Owns the descriptor: closed when the stream ends, is abandoned, or —
    if the response never started — when this object is collected."""

    def __init__(self, fd: int, size: int | None, gzip: bool) -> None:
        self.fd = fd
        self.size = size
        self.gzip = gzip

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __del__(self) -> None:
        self.close()

    def __aiter__(self) -> AsyncIterator[bytes]:
        return self._gzipped() if self.gzip else self._plain()

    async def _plain(self) -> AsyncIterator[bytes]:
        # With a Content-Length announced, send exactly that much even if the file grows.
        remaining = self.size
        try:
            while remaining is None or remaining > 0:
                want = CHUNK if remaining is None else min(CHUNK, remaining)
                data = await blocking(os.read, self.fd, want)
                if not data:
                    return
                if remaining is not None:
                    remaining -= len(data)
                yield data
        finally:
            self.close()

    async def _gzipped(self) -> AsyncIterator[bytes]:
        compressor = zlib.compressobj(GZIP_LEVEL, zlib.DEFLATED, zlib.MAX_WBITS | 16)

        def step() -> tuple[bytes, bool]:
            # Read and compress in the worker thread: both are too slow for the event loop.
            data = os.read(self.fd, CHUNK)
            return (compressor.compress(data), False) if data else (compressor.flush(), True)

        try:
            while True:
                out, done = await blocking(step)
                if out:
                    yield out
                if done:
                    return
        finally:
            self.close()


async def get(request: Request, state: EnvdState) -> Response:
    try:
        user = query_user(request, state)
        path = query_path(request, user, state)
        gzip = accept_gzip(request.headers.get("accept-encoding", ""))
        fd, st = await blocking(_open_for_read, Access(user), path)
    except HTTPError as exc:
        return exc.response()
    except ConnectError as exc:
        return from_connect(exc).response()
    # attachment: a browser that follows a download link (download_url(), the dashboard) saves
    # the file instead of showing it.
    name = urllib.parse.quote(os.path.basename(path) or "download")
    headers = {
        "Vary": "Accept-Encoding",
        "Content-Disposition": f"attachment; filename*=UTF-8''{name}",
    }
    size: int | None = None
    if gzip:
        headers["Content-Encoding"] = "gzip"
    elif stat.S_ISREG(st.st_mode) and st.st_size > 0:
        # Regular files announce their length; /proc-like files report 0 and are chunked.
        size = st.st_size
        headers["Content-Length"] = str(size)
    return StreamingResponse(FileBody(fd, size, gzip), headers=headers,
                             media_type="application/octet-stream")  # fmt: skip

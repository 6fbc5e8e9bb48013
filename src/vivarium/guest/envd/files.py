"""Plain HTTP `/files`: GET streams a file out, POST streams uploads in.

Both act as the `username` query parameter's user (else the default user) with the permission
checks of filesystem.Access, and never hold a whole file in memory: downloads are read in chunks
from a worker thread (uvicorn's flow control holds us back when the client is slow), uploads are
written chunk by chunk as the request body arrives. An upload goes to a temporary file next to the
target that is renamed into place at the end, so readers never see half a file and a failed
upload leaves the old content alone. Errors are JSON `{"code": <status>, "message": ...}` as envd
sends them; the SDK maps 400/401/404/507 to its exceptions.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import stat
import urllib.parse
import zlib
from collections.abc import AsyncIterator, Callable
from typing import Any

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .auth import User, lookup_user
from .connect import ConnectError, Message
from .filesystem import (
    METADATA_XATTR_PREFIX,
    R_OK,
    W_OK,
    Access,
    blocking,
    make_dirs,
    os_error,
    resolve_path,
    upload_temp_name,
)
from .state import EnvdState

CHUNK = 256 * 1024
GZIP_LEVEL = 1  # zlib's fastest: the SDK's httpx asks for gzip on every read by default
MAX_METADATA_KEY = 255 - len(METADATA_XATTR_PREFIX)  # the kernel's xattr name limit
MAX_METADATA_TOTAL = 4096  # what fits in one ext4 block, as envd enforces
_PRINTABLE = re.compile(r"^[\x20-\x7e]*$")
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)

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


def _from_connect(exc: ConnectError) -> HTTPError:
    return HTTPError(_STATUS.get(exc.code, 500), exc.message)


def _user(request: Request, state: EnvdState) -> User:
    name = request.query_params.get("username") or state.default_user
    try:
        return lookup_user(name)
    except ConnectError:
        raise HTTPError(401, f"error looking up user '{name}'") from None


def _path(request: Request, user: User, state: EnvdState, path: str | None = None) -> str:
    try:
        return resolve_path(
            request.query_params.get("path", "") if path is None else path,
            user, state.default_workdir,
        )  # fmt: skip
    except ConnectError as exc:
        raise HTTPError(400, exc.message) from None


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


# --- download -------------------------------------------------------------------------------------


def _open_for_read(access: Access, path: str) -> tuple[int, os.stat_result]:
    access.search(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise HTTPError(404, f"path '{path}' does not exist") from None
    except NotADirectoryError:
        raise HTTPError(404, f"path '{path}' does not exist") from None
    except OSError as exc:
        raise _from_connect(os_error(exc, path)) from None
    if stat.S_ISDIR(st.st_mode):
        raise HTTPError(400, f"path '{path}' is a directory")
    if stat.S_ISFIFO(st.st_mode) or stat.S_ISSOCK(st.st_mode):
        raise HTTPError(400, f"path '{path}' is not a regular file")  # opening would block
    access.require(path, R_OK, st)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise _from_connect(os_error(exc, path)) from None
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


# --- upload ---------------------------------------------------------------------------------------


class NoSpace(Exception):
    pass


def _validate_metadata(metadata: dict[str, str]) -> None:
    total = 0
    for key, value in metadata.items():
        if not key:
            raise HTTPError(400, "metadata key must not be empty")
        if len(key) > MAX_METADATA_KEY:
            raise HTTPError(400, f"metadata key {key!r} exceeds {MAX_METADATA_KEY} bytes")
        if not _PRINTABLE.match(key) or not _PRINTABLE.match(value):
            raise HTTPError(400, f"metadata {key!r} must be printable US-ASCII")
        total += len(METADATA_XATTR_PREFIX) + len(key) + len(value)
    if total > MAX_METADATA_TOTAL:
        raise HTTPError(400, f"total metadata size {total} exceeds {MAX_METADATA_TOTAL} bytes")


def _metadata(request: Request) -> dict[str, str]:
    metadata = {}
    for raw_key, raw_value in request.headers.raw:
        key = raw_key.decode("latin-1").lower()
        if key.startswith("x-metadata-"):
            metadata[key[len("x-metadata-") :]] = raw_value.decode("latin-1")
    _validate_metadata(metadata)
    return metadata


class Upload:
    """One file being written. Methods block (disk I/O): call them from a worker thread."""

    def __init__(self, access: Access, path: str, metadata: dict[str, str]) -> None:
        self.path = path
        self.metadata = metadata
        self.temp: str | None = None
        self.fd = -1
        self.regular = True
        # Writing to a symlink writes its target, as open(2) would.
        target = os.path.realpath(path) if os.path.islink(path) else path
        self.target = target
        parent = os.path.dirname(target)
        make_dirs(access, parent)
        access.search(target)
        try:
            st: os.stat_result | None = os.stat(target)
        except FileNotFoundError:
            st = None
        except OSError as exc:
            raise os_error(exc, path) from None
        if st is not None and stat.S_ISDIR(st.st_mode):
            raise ConnectError("invalid_argument", f"path is a directory: {path}")
        if st is not None:
            access.require(path, W_OK, st)
        # A device or fifo is written to, never replaced (renaming over /dev/null would turn it
        # into a plain file).
        in_place = st is not None and not stat.S_ISREG(st.st_mode)
        self.regular = not in_place
        try:
            access.require_dir_write(parent)
        except ConnectError:
            if st is None:
                raise
            # The user may write the file but not its directory (so no temp file beside it):
            # overwrite in place, as a plain open(O_TRUNC) would.
            in_place = True
        try:
            if in_place:
                self.fd = os.open(target, os.O_WRONLY | os.O_TRUNC | os.O_CLOEXEC)
                return
            self.temp = os.path.join(parent, upload_temp_name(os.path.basename(target), bool(st)))
            self.fd = os.open(self.temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
            # An overwrite keeps the file's owner and mode; a new file is the user's, 0644 (0666
            # under the usual 022 umask, as envd creates files).
            if st is not None:
                os.fchown(self.fd, st.st_uid, st.st_gid)
                os.fchmod(self.fd, stat.S_IMODE(st.st_mode))
            else:
                os.fchown(self.fd, access.uid, access.gid)
                os.fchmod(self.fd, 0o644)
        except OSError as exc:
            self.abort()
            if exc.errno in _NO_SPACE:
                raise NoSpace(f"not enough disk space available: {exc.strerror}") from None
            raise os_error(exc, path) from None

    def write(self, data: bytes) -> None:
        view = memoryview(data)
        try:
            while view:
                written = os.write(self.fd, view)
                view = view[written:]
        except OSError as exc:
            if exc.errno in _NO_SPACE:
                raise NoSpace("not enough disk space available") from None
            raise os_error(exc, self.path) from None

    def _store_metadata(self) -> bool:
        # Metadata replaces what the file had (an in-place overwrite keeps old xattrs otherwise).
        # Best effort when the filesystem has no user xattrs, as envd does.
        try:
            for name in os.listxattr(self.fd):
                key = name[len(METADATA_XATTR_PREFIX) :]
                if name.startswith(METADATA_XATTR_PREFIX) and key not in self.metadata:
                    os.removexattr(self.fd, name)
            for key, value in self.metadata.items():
                os.setxattr(self.fd, METADATA_XATTR_PREFIX + key, value.encode())
        except OSError as exc:
            if exc.errno in (errno.ENOTSUP, errno.EOPNOTSUPP):
                return False
            if exc.errno in _NO_SPACE or exc.errno == errno.E2BIG:
                raise ConnectError("invalid_argument", f"cannot store metadata: {exc}") from None
            raise os_error(exc, self.path) from None
        return True

    def commit(self) -> Message:
        stored = self.regular and self._store_metadata()
        os.close(self.fd)
        self.fd = -1
        if self.temp is not None:
            try:
                os.rename(self.temp, self.target)
            except OSError as exc:
                if exc.errno not in (errno.EBUSY, errno.EXDEV, errno.EPERM):
                    self.abort()
                    raise os_error(exc, self.path) from None
                # A bind-mounted file (/etc/hosts, /etc/resolv.conf) cannot be replaced: copy
                # the content over it instead.
                self._copy_into_target()
        info: Message = {"name": os.path.basename(self.path), "type": "file", "path": self.path}
        if self.metadata and stored:
            info["metadata"] = dict(self.metadata)
        return info

    def _copy_into_target(self) -> None:
        assert self.temp is not None
        try:
            with open(self.temp, "rb") as src, open(self.target, "r+b") as dst:
                dst.truncate(0)
                while data := src.read(CHUNK):
                    dst.write(data)
        except OSError as exc:
            if exc.errno in _NO_SPACE:
                raise NoSpace("not enough disk space available") from None
            raise os_error(exc, self.path) from None
        finally:
            self.abort()

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        if self.temp is not None:
            with contextlib.suppress(OSError):
                os.unlink(self.temp)
            self.temp = None


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


def _content_encoding(request: Request) -> bool:
    """Whether the body is gzipped; other encodings are refused."""
    value = request.headers.get("content-encoding", "").split(";")[0].strip().lower()
    if value in ("", "identity"):
        return False
    if value == "gzip":
        return True
    raise HTTPError(400, f"unsupported Content-Encoding: {value}, supported: gzip")


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


class MultipartReceiver:
    """Feeds a multipart body through python-multipart's streaming parser, writing every `file`
    part straight to its destination. Runs (and blocks) in worker threads, one chunk at a time."""

    def __init__(self, access: Access, state: EnvdState, request: Request, boundary: bytes,
                 metadata: dict[str, str]) -> None:  # fmt: skip
        self.access = access
        self.state = state
        self.request = request
        self.query_path = request.query_params.get("path") or None
        self.metadata = metadata
        self.results: list[Message] = []
        self.current: Upload | None = None
        self.headers: dict[str, str] = {}
        self.field = bytearray()
        self.value = bytearray()
        self.ended = False
        self.parser = MultipartParser(boundary, {
            "on_part_begin": self._part_begin,
            "on_header_field": self._header_field,
            "on_header_value": self._header_value,
            "on_header_end": self._header_end,
            "on_headers_finished": self._headers_finished,
            "on_part_data": self._part_data,
            "on_part_end": self._part_end,
            "on_end": self._end,
        })  # fmt: skip

    def write(self, data: bytes) -> None:
        self.parser.write(data)

    def _part_begin(self) -> None:
        self.headers = {}

    def _header_field(self, data: bytes, start: int, end: int) -> None:
        self.field += data[start:end]

    def _header_value(self, data: bytes, start: int, end: int) -> None:
        self.value += data[start:end]

    def _header_end(self) -> None:
        key = self.field.decode("latin-1").lower()
        self.headers[key] = self.value.decode("utf-8", "surrogateescape")
        self.field.clear()
        self.value.clear()

    def _headers_finished(self) -> None:
        name, filename = part_filename(self.headers.get("content-disposition", ""))
        if name != "file":
            return  # other form fields are ignored, as envd does
        raw_path = self.query_path or filename
        if not raw_path:
            raise HTTPError(400, "a file part needs a file name (or the path query parameter)")
        path = resolve_path(raw_path, self.access.user, self.state.default_workdir)
        if any(result["path"] == path for result in self.results):
            raise HTTPError(400, f"you cannot upload multiple files to the same path '{path}' "
                                 "in one upload request")  # fmt: skip
        self.current = Upload(self.access, path, self.metadata)

    def _part_data(self, data: bytes, start: int, end: int) -> None:
        if self.current is not None:
            self.current.write(data[start:end])

    def _part_end(self) -> None:
        if self.current is not None:
            upload, self.current = self.current, None
            self.results.append(upload.commit())

    def _end(self) -> None:
        self.ended = True

    def abort(self) -> None:
        if self.current is not None:
            self.current.abort()
            self.current = None


async def _receive(request: Request, decoder: Decoder, out: Callable[[bytes], Any]) -> None:
    def step(chunk: bytes) -> None:
        decoder.feed(chunk, out)

    async for chunk in request.stream():
        if chunk:
            await blocking(step, chunk)
    await blocking(decoder.finish, out)


async def _upload(request: Request, state: EnvdState) -> list[Message]:
    user = _user(request, state)
    access = Access(user)
    decoder = Decoder(_content_encoding(request))
    metadata = _metadata(request)
    content_type = request.headers.get("content-type", "")
    media_type, options = parse_options_header(content_type)
    if media_type == b"application/octet-stream":
        if not request.query_params.get("path"):
            raise HTTPError(400, "path query parameter is required for raw body upload")
        upload = await blocking(Upload, access, _path(request, user, state), metadata)
        try:
            await _receive(request, decoder, upload.write)
            return [await blocking(upload.commit)]
        except BaseException:
            upload.abort()
            raise
    if media_type.startswith(b"multipart/"):
        boundary = options.get(b"boundary")
        if not boundary:
            raise HTTPError(400, "multipart body without a boundary")
        receiver = MultipartReceiver(access, state, request, boundary, metadata)
        try:
            await _receive(request, decoder, receiver.write)
            if not receiver.ended:
                raise HTTPError(400, "multipart body ended before its closing boundary")
        except BaseException:
            receiver.abort()
            raise
        return receiver.results
    raise HTTPError(400, f"unsupported content type: {content_type!r}, expected "
                         "multipart/form-data or application/octet-stream")  # fmt: skip


def routes(state: EnvdState) -> list[Route]:
    async def download(request: Request) -> Response:
        try:
            user = _user(request, state)
            path = _path(request, user, state)
            gzip = accept_gzip(request.headers.get("accept-encoding", ""))
            fd, st = await blocking(_open_for_read, Access(user), path)
        except HTTPError as exc:
            return exc.response()
        except ConnectError as exc:
            return _from_connect(exc).response()
        headers = {"Vary": "Accept-Encoding"}
        size: int | None = None
        if gzip:
            headers["Content-Encoding"] = "gzip"
        elif stat.S_ISREG(st.st_mode) and st.st_size > 0:
            # Regular files announce their length; /proc-like files report 0 and are chunked.
            size = st.st_size
            headers["Content-Length"] = str(size)
        return StreamingResponse(FileBody(fd, size, gzip), headers=headers,
                                 media_type="application/octet-stream")  # fmt: skip

    async def upload(request: Request) -> Response:
        try:
            return JSONResponse(await _upload(request, state))
        except HTTPError as exc:
            return exc.response()
        except ConnectError as exc:
            return _from_connect(exc).response()
        except NoSpace as exc:
            return HTTPError(507, str(exc)).response()
        except ClientDisconnect:
            return Response(status_code=400)  # nobody is listening; the upload was discarded

    return [
        Route("/files", download, methods=["GET"]),
        Route("/files", upload, methods=["POST"]),
    ]

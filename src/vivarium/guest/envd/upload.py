"""POST `/files`: streams uploads in, a raw body to the `path` query parameter or every `file`
part of a multipart body to its file name, as the request's user, with the `X-Metadata-*`
headers stored as the file's metadata. Written chunk by chunk as the request body arrives, each
file goes to a temporary file next to its target that is renamed into place at the end, so
readers never see half a file and a failed upload leaves the old content alone.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import secrets
import stat
from collections.abc import Callable
from typing import Any

from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response

from .access import W_OK, Access, blocking, make_dirs, os_error, resolve_path
from .connect import ConnectError, Message
from .entry_info import METADATA_XATTR_PREFIX
from .files_headers import Decoder, content_encoding, part_filename
from .files_request import CHUNK, HTTPError, from_connect, query_path, query_user
from .state import EnvdState

MAX_METADATA_KEY = 255 - len(METADATA_XATTR_PREFIX)  # the kernel's xattr name limit
MAX_METADATA_TOTAL = 4096  # what fits in one ext4 block, as envd enforces
_PRINTABLE = re.compile(r"^[\x20-\x7e]*\Z")
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)

# Uploads write into `.<name>.<12 hex>.envd-<new|old>` next to the target and rename it into
# place, so readers never see half a file. The naming lives here, with the writer; watch.py
# imports it to hide these names and report the rename as the CREATE (+ WRITE) or WRITE a plain
# write would have produced; new/old says whether the target existed.
UPLOAD_TEMP_RE = re.compile(r"^\.(?P<name>.+)\.[0-9a-f]{12}\.envd-(?P<kind>new|old)\Z")


def _upload_temp_name(name: str, replaces: bool) -> str:
    return f".{name}.{secrets.token_hex(6)}.envd-{'old' if replaces else 'new'}"


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
            self.temp = os.path.join(parent, _upload_temp_name(os.path.basename(target), bool(st)))
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
    user = query_user(request, state)
    access = Access(user)
    decoder = Decoder(content_encoding(request))
    metadata = _metadata(request)
    content_type = request.headers.get("content-type", "")
    media_type, options = parse_options_header(content_type)
    if media_type == b"application/octet-stream":
        if not request.query_params.get("path"):
            raise HTTPError(400, "path query parameter is required for raw body upload")
        upload = await blocking(Upload, access, query_path(request, user, state), metadata)
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


async def post(request: Request, state: EnvdState) -> Response:
    try:
        return JSONResponse(await _upload(request, state))
    except HTTPError as exc:
        return exc.response()
    except ConnectError as exc:
        return from_connect(exc).response()
    except NoSpace as exc:
        return HTTPError(507, str(exc)).response()
    except ClientDisconnect:
        return Response(status_code=400)  # nobody is listening; the upload was discarded

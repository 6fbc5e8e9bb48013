"""The `filesystem.Filesystem` Connect service: Stat, ListDir, MakeDir, Move, Remove, WatchDir and
the polling watchers (CreateWatcher / GetWatcherEvents / RemoveWatcher). Only the service lives
here, each operation checked as the request's user would be: path resolution and permissions are
in access.py, the EntryInfo replies in entry_info.py and the watching machinery in watch.py,
because the HTTP `/files` endpoint shares the first two and the watchers are a subsystem of their
own.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import secrets
import shutil
import stat
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

from starlette.requests import Request
from starlette.routing import Route

from .access import (
    R_OK,
    W_OK,
    X_OK,
    Access,
    blocking,
    make_dirs,
    os_error,
    resolve_path,
)
from .auth import User, request_user
from .connect import (
    ConnectError,
    Message,
    keepalive_interval,
    server_stream,
    string_field,
    unary,
)
from .entry_info import Names, entry_info
from .state import EnvdState
from .watch import MAX_PENDING_EVENTS, PollingWatcher, open_watch

MAX_POLLING_WATCHERS = 1024


def _depth(message: Message) -> int:
    try:
        depth = int(message.get("depth") or 0)
    except (TypeError, ValueError):
        raise ConnectError("invalid_argument", "depth must be an integer") from None
    return depth if depth > 0 else 1


def _list_dir(access: Access, requested: str, depth: int) -> list[Message]:
    access.search(requested)
    try:
        real = os.path.realpath(requested, strict=True)
        st = os.stat(real)
    except OSError as exc:
        raise os_error(exc, requested) from None
    except RuntimeError:  # symlink loop (older Pythons raise this instead of ELOOP)
        raise ConnectError("failed_precondition", f"cyclic symlink at {requested}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise ConnectError("invalid_argument", f"path is not a directory: {requested}")
    access.search(real)
    access.require(requested, R_OK | X_OK, st)
    names = Names()
    entries: list[Message] = []

    # Depth-first in name order, like Go's filepath.WalkDir; symlinked directories are listed but
    # not descended into, and subdirectories the user cannot read are listed but not opened.
    def visit(real_dir: str, shown_dir: str, level: int) -> None:
        try:
            with os.scandir(real_dir) as iterator:
                children = sorted(iterator, key=lambda e: e.name)
        except OSError as exc:
            if level == 1:
                raise os_error(exc, shown_dir) from None
            return
        for child in children:
            shown = os.path.join(shown_dir, child.name)
            try:
                child_st = child.stat(follow_symlinks=False)
                entries.append(entry_info(shown, child_st, real=child.path, names=names))
            except OSError:
                continue  # removed while listing
            if (
                level < depth
                and stat.S_ISDIR(child_st.st_mode)
                and access.allows(child_st, R_OK | X_OK)
            ):
                visit(child.path, shown, level + 1)

    visit(real, requested, 1)
    return entries


def _stat(access: Access, path: str) -> Message:
    access.search(path)
    try:
        return entry_info(path)
    except OSError as exc:
        if exc.errno == errno.ENOTDIR:  # "/file/x" does not exist (so `exists` says False)
            raise ConnectError("not_found", f"file not found: {path}") from None
        raise os_error(exc, path) from None


def _make_dir(access: Access, path: str) -> Message:
    access.search(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        make_dirs(access, path)
        return entry_info(path)
    except OSError as exc:
        raise os_error(exc, path) from None
    if stat.S_ISDIR(st.st_mode):
        raise ConnectError("already_exists", f"directory already exists: {path}")
    raise ConnectError("invalid_argument", f"path already exists but it is not a directory: {path}")


def _copy_keeping_owner(src: str, dst: str) -> None:
    shutil.copy2(src, dst, follow_symlinks=False)
    st = os.lstat(src)
    os.lchown(dst, st.st_uid, st.st_gid)


def _move_across_filesystems(src: str, dst: str) -> None:
    """What `mv` does on EXDEV: copy (keeping owners, modes and times), then delete."""
    st = os.lstat(src)
    if not stat.S_ISDIR(st.st_mode):
        _copy_keeping_owner(src, dst)
        os.unlink(src)
        return
    shutil.copytree(src, dst, symlinks=True, copy_function=_copy_keeping_owner)
    for directory, _, _ in os.walk(src):
        copied = os.path.join(dst, os.path.relpath(directory, src))
        dir_st = os.lstat(directory)
        os.lchown(copied, dir_st.st_uid, dir_st.st_gid)
    shutil.rmtree(src)


def _move(access: Access, source: str, destination: str) -> Message:
    access.search(source)
    try:
        st = os.lstat(source)
    except OSError as exc:
        raise os_error(exc, source) from None
    access.require_unlink(source, st)
    target_dir = os.path.dirname(destination)
    if stat.S_ISDIR(st.st_mode) and os.path.dirname(source) != target_dir:
        access.require(source, W_OK, st)  # its ".." entry changes
    make_dirs(access, target_dir)
    access.require_dir_write(target_dir)
    with contextlib.suppress(FileNotFoundError):  # replacing an entry is removing it
        access.require_unlink(destination, os.lstat(destination))
    try:
        try:
            os.rename(source, destination)
        except OSError as exc:
            if exc.errno != errno.EXDEV:
                raise
            _move_across_filesystems(source, destination)
    except OSError as exc:
        raise os_error(exc, f"{source} -> {destination}") from None
    return entry_info(destination)


def _remove(access: Access, path: str) -> None:
    if path == "/":
        raise ConnectError("invalid_argument", "refusing to remove /")
    access.search(path)
    try:
        st = os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return  # like envd's os.RemoveAll: nothing there is success
    except OSError as exc:
        raise os_error(exc, path) from None
    access.require_unlink(path, st)
    try:
        if stat.S_ISDIR(st.st_mode):
            access.require_tree_removal(path)
            shutil.rmtree(path)
        else:
            os.unlink(path)
    except FileNotFoundError:
        return
    except OSError as exc:
        raise os_error(exc, getattr(exc, "filename", None) or path) from None


def routes(state: EnvdState) -> list[Route]:
    watchers: dict[str, PollingWatcher] = {}

    def context(request: Request) -> tuple[User, Access]:
        user = request_user(request, state)
        return user, Access(user)

    def resolve(user: User, message: Message, key: str = "path") -> str:
        return resolve_path(string_field(message, key), user, state.default_workdir)

    async def stat_(request: Request, message: Message) -> Message:
        user, access = context(request)
        return {"entry": await blocking(_stat, access, resolve(user, message))}

    async def list_dir(request: Request, message: Message) -> Message:
        user, access = context(request)
        entries = await blocking(_list_dir, access, resolve(user, message), _depth(message))
        return {"entries": entries} if entries else {}

    async def make_dir(request: Request, message: Message) -> Message:
        user, access = context(request)
        return {"entry": await blocking(_make_dir, access, resolve(user, message))}

    async def move(request: Request, message: Message) -> Message:
        user, access = context(request)
        source = resolve(user, message, "source")
        destination = resolve(user, message, "destination")
        return {"entry": await blocking(_move, access, source, destination)}

    async def remove(request: Request, message: Message) -> Message:
        user, access = context(request)
        await blocking(_remove, access, resolve(user, message))
        return {}

    async def watch_dir(request: Request, message: Message) -> AsyncIterator[Message]:
        queue: asyncio.Queue[Message] = asyncio.Queue()
        failure: list[str] = []

        def sink(event: Message) -> None:
            if queue.qsize() >= MAX_PENDING_EVENTS:
                fail("watcher error: client is not reading events fast enough")
            elif not failure:
                queue.put_nowait({"filesystem": event})

        def fail(text: str) -> None:
            if not failure:
                failure.append(text)
                queue.put_nowait({})  # wakes the stream up to end it

        watch = await open_watch(request, state, message, sink, fail)
        interval = keepalive_interval(request)
        try:
            yield {"start": {}}
            while True:
                try:
                    event = await asyncio.wait_for(queue.get(), interval)
                except TimeoutError:
                    yield {"keepalive": {}}
                    continue
                if not event:  # the failure marker, queued after every event before it
                    raise ConnectError("internal", failure[0])
                yield event
        finally:
            watch.close()

    async def create_watcher(request: Request, message: Message) -> Message:
        if len(watchers) >= MAX_POLLING_WATCHERS:
            raise ConnectError("resource_exhausted", "too many watchers; remove some first")
        watcher = PollingWatcher()
        watcher.watch = await open_watch(request, state, message, watcher.sink, watcher.fail)
        watcher_id = "w" + secrets.token_hex(8)
        watchers[watcher_id] = watcher
        return {"watcherId": watcher_id}

    def find_watcher(message: Message) -> tuple[str, PollingWatcher]:
        watcher_id = str(message.get("watcherId", message.get("watcher_id", "")))
        watcher = watchers.get(watcher_id)
        if watcher is None:
            raise ConnectError("not_found", f"watcher with id {watcher_id} not found")
        return watcher_id, watcher

    async def get_watcher_events(request: Request, message: Message) -> Message:
        _, watcher = find_watcher(message)
        if watcher.watch is not None and not watcher.error:
            watcher.watch.flush()
        if watcher.error:
            raise ConnectError("internal", watcher.error)
        events, watcher.events = watcher.events, []
        return {"events": events} if events else {}

    async def remove_watcher(request: Request, message: Message) -> Message:
        watcher_id, watcher = find_watcher(message)
        if watcher.watch is not None:
            watcher.watch.close()
        del watchers[watcher_id]
        return {}

    handlers: dict[str, Callable[[Request], Awaitable[Any]]] = {
        "Stat": unary(stat_),
        "ListDir": unary(list_dir),
        "MakeDir": unary(make_dir),
        "Move": unary(move),
        "Remove": unary(remove),
        "WatchDir": server_stream(watch_dir),
        "CreateWatcher": unary(create_watcher),
        "GetWatcherEvents": unary(get_watcher_events),
        "RemoveWatcher": unary(remove_watcher),
    }
    return [
        Route(f"/filesystem.Filesystem/{name}", endpoint, methods=["POST"])
        for name, endpoint in handlers.items()
    ]

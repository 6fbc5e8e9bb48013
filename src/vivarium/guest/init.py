"""PID 1 of every sandbox: start and supervise envd, the sudo broker and the template's
services, reap orphans, stop on SIGTERM.

Guest code: runs inside the sandbox with the template's python3; imports nothing from the host
package and only the standard library.
"""

import array
import contextlib
import grp
import json
import os
import pwd
import resource
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from typing import Any

SUDO_SOCKET = "/run/vivarium/sudo.sock"
SUDO_GROUPS = ("sudo",)
SECURE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
MAX_REQUEST = 1 << 20


def _may_sudo(uid: int) -> bool:
    """Root, or a member of the sudo group (the template puts `user` there)."""
    if uid == 0:
        return True
    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        return False
    for group in SUDO_GROUPS:
        try:
            if name in grp.getgrnam(group).gr_mem:
                return True
        except KeyError:
            continue
    return False


def _receive(conn: socket.socket) -> tuple[dict[str, Any], list[int]]:
    msg, ancdata, _flags, _addr = conn.recvmsg(MAX_REQUEST, socket.CMSG_SPACE(3 * 4))
    fds = array.array("i")
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - (len(data) % fds.itemsize)])
    (length,) = struct.unpack("!I", msg[:4])
    body = msg[4:]
    while len(body) < length:
        chunk = conn.recv(length - len(body))
        if not chunk:
            break
        body += chunk
    return json.loads(body), list(fds)


def _run_as(request: dict[str, Any], fds: list[int]) -> int:
    target = pwd.getpwnam(request.get("user") or "root")
    env = (
        dict(request.get("env") or {})
        if request.get("preserve_env")
        else {
            k: v for k, v in (request.get("env") or {}).items() if k in ("TERM", "LANG", "LC_ALL")
        }
    )
    env.update(
        HOME=target.pw_dir,
        USER=target.pw_name,
        LOGNAME=target.pw_name,
        SHELL=target.pw_shell,
        PATH=SECURE_PATH,
    )
    argv = list(request.get("argv") or [])
    if request.get("login"):
        argv = [target.pw_shell, "-l"] + (["-c", " ".join(argv)] if argv else [])
    elif request.get("shell"):
        argv = [target.pw_shell] + (["-c", " ".join(argv)] if argv else [])
    cwd = target.pw_dir if request.get("login") else request.get("cwd") or "/"
    if not os.path.isdir(cwd):
        cwd = "/"
    try:
        proc = subprocess.Popen(
            argv,
            stdin=fds[0],
            stdout=fds[1],
            stderr=fds[2],
            cwd=cwd,
            env=env,
            user=target.pw_uid,
            group=target.pw_gid,
            extra_groups=[],
            close_fds=True,
        )
    except FileNotFoundError:
        os.write(fds[2], f"sudo: {argv[0]}: command not found\n".encode())
        return 1
    except OSError as exc:
        os.write(fds[2], f"sudo: {argv[0]}: {exc.strerror}\n".encode())
        return 1
    return proc.wait()


def _serve_one(conn: socket.socket) -> None:
    fds: list[int] = []
    try:
        creds = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
        _pid, uid, _gid = struct.unpack("3i", creds)
        request, fds = _receive(conn)
        if len(fds) < 3:
            code = 1
        elif not _may_sudo(uid):
            os.write(fds[2], b"sudo: you are not allowed to use sudo in this sandbox\n")
            code = 1
        else:
            code = _run_as(request, fds)
        conn.sendall(struct.pack("!i", code if code >= 0 else 128 - code))
    except (OSError, ValueError, KeyError):
        pass
    finally:
        for fd in fds:
            os.close(fd)
        conn.close()


def _sudo_broker() -> None:
    os.makedirs(os.path.dirname(SUDO_SOCKET), exist_ok=True)
    if os.path.exists(SUDO_SOCKET):
        os.unlink(SUDO_SOCKET)
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(SUDO_SOCKET)
    os.chmod(SUDO_SOCKET, 0o666)  # who may use it is decided per connection (SO_PEERCRED)
    server.listen(64)
    while True:
        conn, _ = server.accept()
        threading.Thread(target=_serve_one, args=(conn,), daemon=True).start()


GUEST_LIB = "/opt/vivarium/lib"
RESTART_BACKOFF_S = 1.0
# Programs the template runs beside envd (written by the template build; empty in `base`).
SERVICES_FILE = "/opt/vivarium/services.json"
ENVD = {"name": "envd", "module": "envd", "user": "root", "args": ["--identity"]}
USER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _load_services() -> list[dict[str, Any]]:
    """envd, then the template's own services."""
    try:
        with open(SERVICES_FILE) as f:
            return [ENVD, *json.load(f)]
    except FileNotFoundError:
        return [ENVD]


def _start_service(service: dict[str, Any]) -> int:
    """Fork and exec a guest service as its user, with a private runtime directory
    (/run/vivarium/NAME) and a clean environment. `python3 -I`: the user's PYTHONPATH,
    site-packages and current directory never reach our code."""
    user = pwd.getpwnam(service["user"])
    run_dir = f"/run/vivarium/{service['name']}"
    os.makedirs(run_dir, mode=0o700, exist_ok=True)
    os.chown(run_dir, user.pw_uid, user.pw_gid)
    argv = [
        sys.executable, "-I", "-c",
        f"import sys, runpy; sys.path.insert(0, {GUEST_LIB!r}); "
        f"runpy.run_module({service['module']!r}, run_name='__main__', alter_sys=True)",
        *service.get("args", []),
    ]  # fmt: skip
    env = {"HOME": user.pw_dir, "USER": user.pw_name, "LOGNAME": user.pw_name,
           "PATH": USER_PATH, "LANG": "C.UTF-8", "VIVARIUM_RUN_DIR": run_dir}  # fmt: skip
    pid = os.fork()
    if pid == 0:
        try:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_DFL)
            os.setsid()
            os.initgroups(user.pw_name, user.pw_gid)
            os.setgid(user.pw_gid)
            os.setuid(user.pw_uid)
            os.chdir(user.pw_dir)
            os.execve(argv[0], argv, env)
        finally:
            os._exit(127)
    return pid


def _start_broker() -> int:
    """Fork the broker before any thread exists; its children are its own to wait for."""
    pid = os.fork()
    if pid == 0:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        try:
            _sudo_broker()
        finally:
            os._exit(1)
    return pid


MIN_VICTIM_KB = 16 << 10  # below this a process is no culprit: leave it alone


def _say(line: str) -> None:
    """A line in the sandbox's log (the console), best effort."""
    with contextlib.suppress(OSError):
        os.write(1, f"{line}\n".encode())


def _live_processes() -> list[tuple[int, int, int, int]]:
    """(pid, uid, process group, session) of every process but zombies."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            uid = os.stat(f"/proc/{entry}").st_uid
            with open(f"/proc/{entry}/stat") as f:
                state, _ppid, pgrp, sid = f.read().rsplit(")", 1)[1].split()[:4]
        except (OSError, ValueError):
            continue  # gone meanwhile
        if state not in ("Z", "X"):
            found.append((int(entry), uid, int(pgrp), int(sid)))
    return found


# Sessions no OOM kill may touch: init's (with the sudo broker) and envd's (with its spawner),
# without which the sandbox cannot be reached. Every command envd starts has a session of its own.
_protected_sessions = {1}


def _resident(pid: int) -> tuple[int, str]:
    """(resident KiB, name) of a process; (0, "") if it is gone."""
    try:
        with open(f"/proc/{pid}/status") as f:
            fields = dict(line.split(":", 1) for line in f if ":" in line)
        return int(fields.get("VmRSS", "0 kB").split()[0]), fields.get("Name", "?").strip()
    except (OSError, ValueError):
        return 0, ""


def _memory_by_group() -> dict[int, tuple[int, int, str]]:
    """Per process group outside the protected sessions: resident KiB, processes, a name (its
    leader's, when alive)."""
    groups: dict[int, tuple[int, int, str]] = {}
    for pid, _uid, pgrp, sid in _live_processes():
        if sid in _protected_sessions:
            continue
        rss, name = _resident(pid)
        kib, count, leader = groups.get(pgrp, (0, 0, name))
        groups[pgrp] = (kib + rss, count + 1, name if pid == pgrp else leader)
    return groups


def _out_of_memory(*_: object) -> None:
    """The host says the sandbox is past its memory (SIGUSR1): kill the process group using the
    most (a command, with whatever it started), as a kernel's OOM killer kills the largest
    process, so the rest of the sandbox lives on. A whole group, since the memory may be spread
    over many processes (a forking loop). Logged to the console: the sandbox's log."""
    try:
        groups = _memory_by_group()
        pgid = max(groups, key=lambda group: groups[group][0], default=0)
        kib, count, name = groups.get(pgid, (0, 0, ""))
        if kib < MIN_VICTIM_KB:
            return
        os.killpg(pgid, signal.SIGKILL)
        _say(f"vivarium: out of memory: killed process group {pgid} ({name}, {count} "
             f"process(es)), {kib >> 10} MiB resident")  # fmt: skip
    except Exception as exc:  # a signal handler of PID 1 must never raise
        _say(f"vivarium: out-of-memory kill failed: {exc!r}")


# A user at the process limit (RLIMIT_NPROC, set by the host) this long is running a fork bomb:
# the sandbox crawls, since the bomb's processes retry fork() without end. Its session (every
# command envd starts has one) is killed, as the OOM killer kills the largest process.
PROCESS_CHECK_S = 1.0
FORK_BOMB_AFTER_S = 5.0
FORK_BOMB_SHARE = 0.95
KILL_PASSES = 3  # a process forked while its group was being killed is caught by the next pass
_at_limit_since: dict[int, float] = {}


def _kill_session(uid: int, sid: int) -> int:
    """SIGKILL every process group of `uid` in session `sid`; each killpg is atomic, so a fork
    racing with it cannot leave a survivor in that group. Returns the processes signalled."""
    groups: dict[int, int] = {}
    for _pid, owner, pgrp, session in _live_processes():
        if owner == uid and session == sid:
            groups[pgrp] = groups.get(pgrp, 0) + 1
    for pgid in groups:
        with contextlib.suppress(OSError):
            os.killpg(pgid, signal.SIGKILL)
    return sum(groups.values())


def _check_processes(*_: object) -> None:
    try:
        _contain_fork_bomb()
    except Exception as exc:  # a signal handler of PID 1 must never raise
        _say(f"vivarium: process check failed: {exc!r}")
    # Armed again only now: a check slower than the period must not run back to back, which
    # would keep the main loop from reaping what it killed.
    signal.setitimer(signal.ITIMER_REAL, PROCESS_CHECK_S)


def _contain_fork_bomb() -> None:
    limit = resource.getrlimit(resource.RLIMIT_NPROC)[0]
    if limit == resource.RLIM_INFINITY or len(os.listdir("/proc")) < FORK_BOMB_SHARE * limit:
        _at_limit_since.clear()
        return  # the common case, every second in every sandbox: one directory read
    processes = _live_processes()  # zombies being reaped do not count
    counts: dict[int, int] = {}
    for _pid, uid, _pgrp, _sid in processes:
        counts[uid] = counts.get(uid, 0) + 1
    now = time.monotonic()
    for uid in [u for u in _at_limit_since if counts.get(u, 0) < FORK_BOMB_SHARE * limit]:
        del _at_limit_since[uid]
    for uid, count in counts.items():
        if uid == 0 or count < FORK_BOMB_SHARE * limit:
            continue
        if now - _at_limit_since.setdefault(uid, now) < FORK_BOMB_AFTER_S:
            continue
        sessions: dict[int, int] = {}
        for _pid, owner, _pgrp, sid in processes:
            if owner == uid:
                sessions[sid] = sessions.get(sid, 0) + 1
        sid = max(sessions, key=sessions.__getitem__)
        killed = sum(_kill_session(uid, sid) for _ in range(KILL_PASSES))
        del _at_limit_since[uid]
        _say(f"vivarium: process limit: uid {uid} ran {count} processes, the limit is {limit}; "
             f"killed session {sid} ({killed} processes)")  # fmt: skip


def main() -> None:
    signal.signal(signal.SIGUSR1, _out_of_memory)
    signal.signal(signal.SIGALRM, _check_processes)
    signal.setitimer(signal.ITIMER_REAL, PROCESS_CHECK_S)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGINT, lambda *_: sys.exit(0))
    broker = _start_broker()
    services = {_start_service(spec): spec for spec in _load_services()}
    _protected_sessions.update(pid for pid, spec in services.items() if spec is ENVD)
    while True:  # reap every orphan; restart envd, the broker or a service if one dies
        try:
            pid, _status = os.waitpid(-1, 0)
        except ChildProcessError:
            time.sleep(1)
            continue
        except InterruptedError:
            continue
        if pid == broker:
            time.sleep(RESTART_BACKOFF_S)
            broker = _start_broker()
        elif pid in services:
            time.sleep(RESTART_BACKOFF_S)
            spec = services.pop(pid)
            pid = _start_service(spec)
            services[pid] = spec
            if spec is ENVD:
                _protected_sessions.add(pid)


if __name__ == "__main__":
    main()

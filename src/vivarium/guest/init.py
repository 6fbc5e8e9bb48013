"""PID 1 of every sandbox: start and supervise envd, the sudo broker and the template's
services, reap orphans, stop on SIGTERM.

Guest code: runs inside the sandbox with the template's python3; imports nothing from the host
package and only the standard library.
"""

import array
import grp
import json
import os
import pwd
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

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


def _receive(conn: socket.socket) -> tuple[dict, list[int]]:
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


def _run_as(request: dict, fds: list[int]) -> int:
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
ENVD = {"name": "envd", "module": "envd", "user": "root"}
USER_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _load_services() -> list:
    """envd, then the template's own services."""
    try:
        with open(SERVICES_FILE) as f:
            return [ENVD, *json.load(f)]
    except FileNotFoundError:
        return [ENVD]


def _start_service(service: dict) -> int:
    """Fork and exec a guest service as its user, with a private runtime directory
    (/run/vivarium/NAME) and a clean environment. `python3 -I`: the user's PYTHONPATH,
    site-packages and current directory never reach our code."""
    user = pwd.getpwnam(service["user"])
    run_dir = f"/run/vivarium/{service['name']}"
    os.makedirs(run_dir, mode=0o700, exist_ok=True)
    os.chown(run_dir, user.pw_uid, user.pw_gid)
    argv = [
        "/usr/bin/python3", "-I", "-c",
        f"import sys, runpy; sys.path.insert(0, {GUEST_LIB!r}); "
        f"runpy.run_module({service['module']!r}, run_name='__main__', alter_sys=True)",
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


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGINT, lambda *_: sys.exit(0))
    broker = _start_broker()
    services = {_start_service(spec): spec for spec in _load_services()}
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
            services[_start_service(spec)] = spec


if __name__ == "__main__":
    main()

"""`sudo` for runsc releases that force NO_NEW_PRIVS on every process (setuid cannot work there).

Installed as /usr/bin/sudo in such templates. It hands the command, its environment, working
directory and this process's stdin/stdout/stderr to the sandbox's root init (guest/init.c, whose
header describes the request) over a Unix socket; init checks our uid (SO_PEERCRED), runs the
command as the target user and returns the exit code.

Guest code: standard library only, never imports host code.
"""

import array
import os
import socket
import struct
import sys
from typing import Any

SOCKET_PATH = "/run/vivarium/sudo.sock"
USAGE = "usage: sudo [-n] [-E] [-H] [-i | -s] [-u user] [--] command [args...]"


def parse(argv: list[str]) -> dict[str, Any]:
    request = {"user": "root", "login": False, "shell": False, "preserve_env": False}
    i = 0
    while i < len(argv) and argv[i].startswith("-") and argv[i] != "-":
        flag = argv[i]
        if flag == "--":
            i += 1
            break
        if flag in ("-u", "--user"):
            if i + 1 >= len(argv):
                sys.exit(USAGE)
            request["user"] = argv[i + 1]
            i += 2
            continue
        if flag.startswith("-u") and len(flag) > 2:
            request["user"] = flag[2:]
        elif flag in ("-i", "--login"):
            request["login"] = True
        elif flag in ("-s", "--shell"):
            request["shell"] = True
        elif flag in ("-E", "--preserve-env"):
            request["preserve_env"] = True
        elif flag in ("-n", "-H", "-S", "-k", "--non-interactive", "--set-home"):
            pass  # nothing to prompt for: sudo is passwordless here
        elif flag in ("-V", "--version"):
            print("vivarium sudo broker")
            sys.exit(0)
        else:
            sys.exit(f"sudo: unsupported option {flag}\n{USAGE}")
        i += 1
    request["argv"] = argv[i:]
    if not request["argv"] and not (request["login"] or request["shell"]):
        sys.exit(USAGE)
    request["cwd"] = os.getcwd()
    request["env"] = dict(os.environ)
    return request


def encode(request: dict[str, Any]) -> bytes:
    """The request as init reads it: a length, then NUL-terminated strings."""
    mode = "login" if request["login"] else "shell" if request["shell"] else "command"
    fields = [request["user"], mode, "1" if request["preserve_env"] else "0", request["cwd"],
              str(len(request["argv"])), *request["argv"],
              *(f"{k}={v}" for k, v in request["env"].items())]  # fmt: skip
    body = b"".join(os.fsencode(field) + b"\0" for field in fields)
    return struct.pack("!I", len(body)) + body


def main() -> None:
    request = parse(sys.argv[1:])
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(SOCKET_PATH)
    except OSError as exc:
        sys.exit(f"sudo: cannot reach the sandbox init ({exc})")
    payload = encode(request)
    fds = array.array("i", [0, 1, 2])
    # The fds ride on the length's 4 bytes, which init reads first; the rest follows.
    sock.sendmsg([payload[:4]], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, fds.tobytes())])
    sock.sendall(payload[4:])
    status = b""
    while len(status) < 4:
        chunk = sock.recv(4 - len(status))
        if not chunk:
            sys.exit("sudo: the sandbox init closed the connection")
        status += chunk
    code = struct.unpack("!i", status)[0]
    sys.exit(code)


if __name__ == "__main__":
    main()

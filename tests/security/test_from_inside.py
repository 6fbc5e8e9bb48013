"""From inside a sandbox, as its root: the escape primitives gVisor's threat model lists fail,
and nothing of the host is reachable (its processes, its files, the node socket, the cloud
metadata address). The metadata service is a test host in a namespace of its own."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator

import httpx
import pytest
from e2b import CommandExitException, Sandbox

from tests.integration.support import Server, outside_host, sdk_options

META_NS, META_IF = "vy-meta", "vymeta0"
META_GATEWAY, METADATA = "169.254.169.253", "169.254.169.254"

# Each is a Python snippet run as root inside the sandbox: it prints "refused <errno>" when the
# primitive fails, "ALLOWED" when it works. A broken probe exits non-zero and fails the test.
PROBE = """
import ctypes, errno, os, socket, sys
libc = ctypes.CDLL(None, use_errno=True)
def syscall(nr, *args):
    if libc.syscall(nr, *args) == -1:
        print("refused", errno.errorcode[ctypes.get_errno()])
    else:
        print("ALLOWED")
def sock(*args):
    try:
        socket.socket(*args)
    except OSError as exc:
        print("refused", errno.errorcode[exc.errno])
    else:
        print("ALLOWED")
"""
ESCAPES = {
    "raw IP socket": "sock(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)",
    "packet socket": "sock(socket.AF_PACKET, socket.SOCK_RAW)",
    "mount": "syscall(165, b'none', b'/mnt', b'tmpfs', 0, None)",
    "kernel module (init_module)": "syscall(175, None, 0, b'')",
    "kernel module (finit_module)": "syscall(313, 0, b'', 0)",
    "kexec_load": "syscall(246, 0, 0, None, 0)",
    "reboot": "syscall(169, 0xfee1dead, 672274793, 0x4321fedc, None)",
    "bpf": "syscall(321, 0, None, 0)",
    "perf_event_open": "syscall(298, None, 0, -1, -1, 0)",
    "iopl (port I/O)": "syscall(172, 3)",
    "a host block device": "found = [d for d in os.listdir('/dev') if d.startswith(('sd', 'vd', "
    "'nvme', 'mem', 'kmem', 'port'))]; print('ALLOWED', found) if found else print('refused')",
}


@pytest.fixture(scope="module")
def metadata_host() -> Iterator[str]:
    web = [sys.executable, "-m", "http.server", "80", "--bind", METADATA]
    with outside_host(META_NS, META_IF, META_GATEWAY, [METADATA], 30, web):
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                httpx.get(f"http://{METADATA}/", timeout=1)
                break
            except httpx.HTTPError:
                time.sleep(0.1)
        yield METADATA


@pytest.fixture(scope="module")
def sbx(server: Server) -> Iterator[Sandbox]:
    sandbox = Sandbox.create(timeout=600, **sdk_options(server))  # type: ignore[arg-type]
    yield sandbox
    sandbox.kill()


def _fails(sbx: Sandbox, script: str) -> bool:
    try:
        sbx.commands.run(script, user="root", timeout=30)
    except CommandExitException:
        return True
    return False


@pytest.mark.parametrize("name", sorted(ESCAPES))
def test_an_escape_primitive_fails_as_root_inside(sbx: Sandbox, name: str) -> None:
    sbx.files.write("/tmp/probe.py", PROBE + ESCAPES[name] + "\n")
    result = sbx.commands.run("python3 /tmp/probe.py", user="root", timeout=30)
    assert result.stdout.startswith("refused"), (name, result.stdout)
    # The same sandbox still works: what failed was refused, not fatal.
    assert sbx.commands.run("echo alive", user="root").stdout == "alive\n"


def test_the_host_processes_files_and_node_socket_are_not_there(
    sbx: Sandbox, server: Server
) -> None:
    assert server.proc is not None
    host_pid = server.proc.pid
    assert _fails(sbx, f"kill -0 {host_pid}")  # not in its PID namespace
    assert _fails(sbx, f"python3 -c 'import os; os.kill({host_pid}, 0)'")
    assert _fails(sbx, f"test -e {server.socket}")
    assert _fails(sbx, f"test -e {server.state_dir}")
    # A process listing inside shows only the sandbox's own.
    inside = sbx.commands.run("ps -eo pid= | wc -l", user="root").stdout
    assert int(inside) < 50
    assert str(os.getpid()) not in sbx.commands.run("ps -eo pid=", user="root").stdout.split()


def test_the_metadata_address_is_unreachable(sbx: Sandbox, metadata_host: str) -> None:
    assert httpx.get(f"http://{metadata_host}/", timeout=5).status_code == 200  # it is up
    curl = f"curl -s -m 3 -o /dev/null -w '%{{http_code}}' http://{metadata_host}/ || true"
    code = sbx.commands.run(curl)
    assert code.stdout.strip() == "000"

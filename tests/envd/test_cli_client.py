"""The CLI's envd client (`vivarium.cli.envd`) against a real envd on this host: `run` for
`vivarium sandbox exec`, `terminal` for `vivarium sandbox connect` (in a child process on a real
pseudo-terminal, so raw mode and SIGWINCH are the real thing)."""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import pty
import select
import struct
import subprocess
import sys
import termios
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tests.envd.conftest import REPO, _free_port, run_envd
from vivarium.cli.envd import EnvdError, proxy_headers, run

pytestmark = pytest.mark.timeout(120)

ROUTING = proxy_headers("isb0123456789abcdef")


class Capture:
    """Output callbacks that keep what arrived, chunk by chunk."""

    def __init__(self, on_stdout: Callable[[], object] = lambda: None) -> None:
        self.stdout = bytearray()
        self.stderr = bytearray()
        self.stdout_chunks: list[bytes] = []
        self._on_stdout = on_stdout

    def out(self, data: bytes) -> None:
        self.stdout += data
        self.stdout_chunks.append(data)
        self._on_stdout()

    def err(self, data: bytes) -> None:
        self.stderr += data


def _run(url: str, argv: list[str] | str, **kwargs: object) -> tuple[int, Capture]:
    seen = Capture()
    kwargs.setdefault("user", "root")  # the host has no `user` account
    code = run(url, {}, argv, on_stdout=seen.out, on_stderr=seen.err, **kwargs)  # type: ignore[arg-type]
    return code, seen


# --- run -----------------------------------------------------------------------------------------


def test_string_command_streams_stdout_and_stderr_as_they_come(
    envd_url: str, tmp_path: Path
) -> None:
    # The command holds `b` until the client has received `a`: it only ends if output is handed
    # over as it comes (a buffering client would wait out the timeout instead).
    gate = tmp_path / "seen-a"
    seen = Capture(on_stdout=gate.touch)
    script = f"echo a; echo oops >&2; while [ ! -e {gate} ]; do sleep 0.05; done; echo b"
    code = run(envd_url, {}, script, user="root", on_stdout=seen.out, on_stderr=seen.err,
               timeout=20)  # fmt: skip
    assert code == 0
    assert bytes(seen.stdout) == b"a\nb\n"
    assert bytes(seen.stderr) == b"oops\n"
    assert seen.stdout_chunks[0] == b"a\n"


def test_argv_list_runs_without_a_shell(envd_url: str) -> None:
    code, seen = _run(envd_url, ["printf", "%s|", "a b", "$HOME", "*"])
    assert code == 0
    assert bytes(seen.stdout) == b"a b|$HOME|*|"


def test_routing_and_unused_token_headers_are_harmless(envd_url: str) -> None:
    seen = Capture()
    assert ROUTING == {"E2b-Sandbox-Id": "isb0123456789abcdef", "E2b-Sandbox-Port": "49983"}
    headers = {**ROUTING, "X-Access-Token": "unused"}  # envd without a token ignores it
    assert run(envd_url, headers, "echo routed", user="root", on_stdout=seen.out) == 0
    assert bytes(seen.stdout) == b"routed\n"


def test_stdin_bytes_are_fed_then_closed(envd_url: str) -> None:
    code, seen = _run(envd_url, "wc -c", stdin=b"x" * (1024 * 1024))
    assert code == 0
    assert seen.stdout.strip() == b"1048576"


def test_stdin_file_round_trips_while_output_streams(envd_url: str) -> None:
    # cat writes back as it reads: this only finishes if input and output flow at once.
    data = os.urandom(1024 * 1024)
    code, seen = _run(envd_url, ["cat"], stdin=io.BytesIO(data))
    assert code == 0
    assert bytes(seen.stdout) == data


def test_without_stdin_the_process_reads_eof(envd_url: str) -> None:
    code, seen = _run(envd_url, "cat; echo done", timeout=60)
    assert code == 0
    assert bytes(seen.stdout) == b"done\n"


def test_exit_codes(envd_url: str) -> None:
    assert _run(envd_url, "exit 7")[0] == 7
    assert _run(envd_url, ["false"])[0] == 1
    assert _run(envd_url, "kill -TERM $$")[0] == 128 + 15  # killed by a signal: as a shell says


def test_unknown_command_is_an_invalid_argument(envd_url: str) -> None:
    with pytest.raises(EnvdError) as caught:
        _run(envd_url, ["/no/such/command"])
    assert caught.value.code == "invalid_argument"
    assert "/no/such/command" in caught.value.message
    assert str(caught.value).startswith("envd: invalid_argument: ")


def test_bad_cwd_is_an_error(envd_url: str) -> None:
    with pytest.raises(EnvdError) as caught:
        _run(envd_url, "pwd", cwd="/no/such/dir")
    assert caught.value.code == "invalid_argument"


def test_user_cwd_and_envs(envd_url: str) -> None:
    # nobody's home (the default cwd) does not exist
    assert bytes(_run(envd_url, ["whoami"], user="nobody", cwd="/")[1].stdout) == b"nobody\n"
    assert bytes(_run(envd_url, ["whoami"])[1].stdout) == b"root\n"
    code, seen = _run(envd_url, 'echo "$PWD|$FOO"', cwd="/tmp", envs={"FOO": "bar baz"})
    assert code == 0
    assert bytes(seen.stdout) == b"/tmp|bar baz\n"


def test_timeout_kills_the_command(envd_url: str) -> None:
    # The command outlives this test's own timeout: only envd's deadline lets the test pass.
    with pytest.raises(EnvdError) as caught:
        _run(envd_url, "sleep 300", timeout=0.5)
    assert caught.value.code == "deadline_exceeded"


def test_default_sinks_are_this_process_stdout_and_stderr(
    envd_url: str, capfd: pytest.CaptureFixture[str]
) -> None:
    assert run(envd_url, {}, "echo to-out; echo to-err >&2", user="root") == 0
    out, err = capfd.readouterr()
    assert out == "to-out\n"
    assert err == "to-err\n"


def test_unreachable_envd_is_unavailable() -> None:
    with pytest.raises(EnvdError) as caught:
        run(f"http://127.0.0.1:{_free_port()}", ROUTING, "true", user="root")
    assert caught.value.code == "unavailable"


def test_access_token_header() -> None:
    with run_envd() as url:
        assert httpx.post(f"{url}/init", json={"accessToken": "tok"}).status_code == 204
        with pytest.raises(EnvdError) as caught:
            run(url, ROUTING, "true", user="root")
        assert caught.value.code == "unauthenticated"
        seen = Capture()
        headers = proxy_headers("isb0123456789abcdef", "tok")
        assert headers == {**ROUTING, "X-Access-Token": "tok"}
        assert run(url, headers, "echo in", user="root", stdin=b"x", on_stdout=seen.out) == 0
        assert bytes(seen.stdout) == b"in\n"


# --- terminal ------------------------------------------------------------------------------------

CHILD = """
import sys, termios
from vivarium.cli.envd import terminal
code = terminal({url!r}, {headers!r}, user="root")
if sys.stdin.isatty():
    canonical = bool(termios.tcgetattr(0)[3] & termios.ICANON)
    sys.stdout.write(f"\\r\\nrestored={{canonical}}\\r\\n")
    sys.stdout.flush()
sys.exit(code)
"""


def _child_code(url: str) -> str:
    return CHILD.format(url=url, headers=ROUTING)


def _set_size(fd: int, rows: int, cols: int) -> None:
    fcntl.ioctl(fd, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))


class Terminal:
    """The client running in a child process whose controlling terminal is a fresh PTY."""

    def __init__(self, url: str, rows: int, cols: int) -> None:
        self.pid, self.master = pty.fork()
        if self.pid == 0:  # the child: nothing but exec
            try:
                os.chdir(REPO)
                os.execv(sys.executable, [sys.executable, "-c", _child_code(url)])
            finally:
                os._exit(127)
        _set_size(self.master, rows, cols)  # long before the child's Python reads it
        self.output = bytearray()

    def type(self, text: str) -> None:
        os.write(self.master, text.encode())

    def expect(self, needle: bytes, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while needle not in self.output:
            left = deadline - time.monotonic()
            assert left > 0, f"{needle!r} not in {bytes(self.output)!r}"
            ready, _, _ = select.select([self.master], [], [], left)
            if ready:
                try:
                    chunk = os.read(self.master, 65536)
                except OSError:  # EIO: the child is gone
                    chunk = b""
                assert chunk, f"the child ended before {needle!r}: {bytes(self.output)!r}"
                self.output += chunk

    def wait(self, timeout: float = 10) -> int:
        deadline = time.monotonic() + timeout
        while True:
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                return os.waitstatus_to_exitcode(status)
            assert time.monotonic() < deadline, "the child did not exit"
            with_data, _, _ = select.select([self.master], [], [], 0.05)
            if with_data:
                with contextlib.suppress(OSError):  # EIO: the child is gone
                    self.output += os.read(self.master, 65536)

    def close(self) -> None:
        try:
            os.kill(self.pid, 9)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass
        os.close(self.master)


@pytest.fixture
def term(envd_url: str) -> Iterator[Terminal]:
    session = Terminal(envd_url, 30, 100)
    try:
        yield session
    finally:
        session.close()


def test_terminal_on_a_pty(term: Terminal) -> None:
    term.type("stty size; echo hi-$((1+2))\n")
    term.expect(b"hi-3")
    assert b"30 100" in term.output  # the remote PTY started at the local size
    # The local terminal is raw: no local line editing, signals or echo.
    assert not termios.tcgetattr(term.master)[3] & (termios.ICANON | termios.ISIG | termios.ECHO)

    # Ctrl-C reaches the remote foreground command instead of stopping the client.
    term.type("echo started-$((7*7)); sleep 20\n")
    term.expect(b"started-49")
    time.sleep(0.2)
    term.type("\x03")
    term.type("echo after-$((2*3))\n")
    term.expect(b"after-6")

    # The kernel sends the client SIGWINCH when its terminal's size changes.
    # The resize travels on its own request, so ask until the shell sees it.
    _set_size(term.master, 40, 120)
    for _ in range(100):
        term.type("stty size\n")
        with contextlib.suppress(AssertionError):
            term.expect(b"40 120", timeout=0.3)
            break
    term.expect(b"40 120", timeout=0)

    term.type("exit 3\n")
    assert term.wait() == 3
    assert b"restored=True" in term.output


def test_terminal_with_pipes(envd_url: str) -> None:
    child = subprocess.run(
        [sys.executable, "-c", _child_code(envd_url)],
        input=b"echo hi-$((1+2))\nexit 3\n",
        capture_output=True,
        cwd=REPO,
        timeout=15,
    )
    assert child.returncode == 3, child.stderr.decode()
    assert b"hi-3" in child.stdout


def test_terminal_ends_at_end_of_input(envd_url: str) -> None:
    # Without a TTY, the end of local input is Ctrl-D for the remote shell.
    child = subprocess.run(
        [sys.executable, "-c", _child_code(envd_url)],
        input=b"echo last-$((4+5))\n",
        capture_output=True,
        cwd=REPO,
        timeout=15,
    )
    assert child.returncode == 0, child.stderr.decode()
    assert b"last-9" in child.stdout

"""The guest sudo client's option parsing (the broker itself is exercised in real sandboxes)."""

from __future__ import annotations

import pytest

from vivarium.guest import sudo


def test_plain_command() -> None:
    request = sudo.parse(["apt-get", "install", "-y", "x"])
    assert request["argv"] == ["apt-get", "install", "-y", "x"]
    assert request["user"] == "root" and not request["login"]


def test_options_before_command_only() -> None:
    request = sudo.parse(["-n", "-E", "-u", "user", "--", "ls", "-la"])
    assert request["user"] == "user" and request["preserve_env"]
    assert request["argv"] == ["ls", "-la"]
    assert sudo.parse(["-uuser", "id"])["user"] == "user"


def test_login_shell_without_command() -> None:
    request = sudo.parse(["-i"])
    assert request["login"] and request["argv"] == []


@pytest.mark.parametrize("argv", [[], ["-n"], ["-u"], ["--bogus", "ls"]])
def test_usage_errors(argv: list[str]) -> None:
    with pytest.raises(SystemExit):
        sudo.parse(argv)


def test_request_encoding_is_what_init_reads() -> None:
    """A length, then NUL-terminated fields: user, mode, preserve_env, cwd, argc, argv, env."""
    request = sudo.parse(["-i", "-u", "user", "ls", "-la"])
    request["cwd"], request["env"] = "/tmp", {"TERM": "xterm", "A": "b=c"}
    wire = sudo.encode(request)
    length = int.from_bytes(wire[:4], "big")
    assert length == len(wire) - 4
    fields = wire[4:].split(b"\0")
    assert fields[-1] == b""
    assert fields[:-1] == [b"user", b"login", b"0", b"/tmp", b"2", b"ls", b"-la",
                           b"TERM=xterm", b"A=b=c"]  # fmt: skip

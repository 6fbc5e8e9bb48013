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

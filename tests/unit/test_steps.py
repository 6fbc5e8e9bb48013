import logging

import pytest

from vivarium.node import steps as steps_module
from vivarium.node.steps import Steps


def test_a_slow_start_is_logged_step_by_step(monkeypatch: pytest.MonkeyPatch,
                                             caplog: pytest.LogCaptureFixture) -> None:  # fmt: skip
    clock = iter([100.0, 100.5, 112.5, 113.0])
    monkeypatch.setattr(steps_module.time, "monotonic", lambda: next(clock))
    steps = Steps("create from 'base'")
    steps.done("network slot")
    steps.done("runsc restore")
    with caplog.at_level(logging.WARNING, logger="vivarium.node.steps"):
        steps.report("of x done")
    assert caplog.messages == [
        "create from 'base' of x done after 13.0s: network slot 0.5s, runsc restore 12.0s"
    ]


def test_a_quick_start_is_not_logged(caplog: pytest.LogCaptureFixture) -> None:
    steps = Steps("create")
    steps.done("runsc restore")
    with caplog.at_level(logging.WARNING, logger="vivarium.node.steps"):
        steps.report()
    assert caplog.messages == []

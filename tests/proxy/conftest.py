from collections.abc import Iterator

import pytest


@pytest.fixture(autouse=True)
def no_errors_logged(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """Fail on error log lines: a proxy bug often shows only as one (a task exception nobody
    retrieved, an exception in a connection handler)."""
    yield
    errors = [
        record.getMessage()
        for record in caplog.get_records("call")
        if record.levelno >= 40 and record.name.startswith(("asyncio", "vivarium"))
    ]
    assert not errors, errors

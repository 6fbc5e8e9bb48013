"""Settings for the whole suite, applied before any test module imports the `e2b` client, and
the fake internet that the egress tests share."""

import os
from collections.abc import Iterator

import pytest

from tests import fakenet

# Tests talk to sandboxes at their slot addresses, which are reused by later sandboxes. The
# client pools keep-alive connections per address for 300 s by default; a pooled connection to a
# sandbox that was killed meets a reset when the next sandbox on that address is tested. Real
# clients talk to one proxy address and are not affected. (E2B_KEEPALIVE_EXPIRY is the client's
# documented setting, read when `e2b.api` is imported.)
os.environ.setdefault("E2B_KEEPALIVE_EXPIRY", "0.2")


@pytest.fixture(scope="session")
def internet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The fake internet (tests/fakenet.py), up for the session, and the settings a server needs
    to reach it: its addresses opened, its DNS server, its servers' certificate trusted."""
    with fakenet.fake_internet(tmp_path_factory.mktemp("fakenet")) as cert:
        yield {
            "egress_allow": fakenet.OPENED,
            "egress_dns": fakenet.DNS,
            "egress_ca_file": str(cert),
        }


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failed test's report ends with what the servers it used logged meanwhile."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.failed:
        from tests.integration.support import server_logs_since

        for name, tail in server_logs_since(call.start):
            report.sections.append((f"log of test server {name}", tail))


def pytest_sessionfinish(session: pytest.Session) -> None:
    from tests.integration.support import remove_state_dirs  # imports the client: not earlier

    remove_state_dirs()

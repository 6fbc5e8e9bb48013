"""The web dashboard in a real headless Chromium, against the compat server, beside the official
client: what one does in the page, the other sees, and the other way round."""

from __future__ import annotations

import hashlib
import os
import re
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from e2b import BuildException, Sandbox, Template
from e2b.exceptions import NotFoundException

from tests.browser import Browser
from tests.compat.conftest import Compat

UPLOAD_MB = 48  # more than the server could hold unnoticed: it must stream


@pytest.fixture(scope="module")
def chromium() -> Iterator[Browser]:
    b = Browser()
    try:
        yield b
    finally:
        b.close()


@pytest.fixture
def browser(chromium: Browser, compat: Compat) -> Iterator[Browser]:
    """The page, checked after each test: it talked only to the API and sandboxes' envd through
    the proxy, and its content security policy refused nothing."""
    chromium("requests")
    chromium("console_errors")
    yield chromium
    hosts = {urllib.parse.urlsplit(url).netloc for url in chromium("requests")}
    api = urllib.parse.urlsplit(compat.api_url).netloc
    strays = {h for h in hosts if h != api and not re.fullmatch(r"49983-\w+\.localhost:4110", h)}
    assert not strays, strays
    refused = [e for e in chromium("console_errors") if "Content Security Policy" in e]
    assert not refused, refused


def _submit_key(b: Browser, compat: Compat, key: str, hash_: str) -> None:
    b("goto", url=f"{compat.api_url}/dashboard/{hash_}")
    if b("count", selector="text=Sign out"):
        b("click", selector="text=Sign out")
    b("fill", selector="input[name=key]", value=key)
    b("press", key="Enter")


def _sign_in(b: Browser, compat: Compat, key: str, hash_: str = "#/sandboxes") -> None:
    _submit_key(b, compat, key, hash_)
    b("wait_text", selector="header", text="Sign out")


def _rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_the_dashboard_is_served_with_a_policy_and_envd_answers_browsers(compat: Compat) -> None:
    page = httpx.get(f"{compat.api_url}/dashboard/")
    assert page.status_code == 200 and '<div id="app">' in page.text
    policy = page.headers["content-security-policy"]
    assert "connect-src 'self' http://*.localhost:4110" in policy, policy
    assert "frame-ancestors 'none'" in policy
    # A browser's preflight to envd through the proxy (E2B's envd allows any origin too).
    with Sandbox.create(timeout=120) as sandbox:
        preflight = httpx.options(
            f"{compat.sandbox_url}/process.Process/Start",
            headers={"E2b-Sandbox-Id": sandbox.sandbox_id, "E2b-Sandbox-Port": "49983",
                     "Origin": compat.api_url, "Access-Control-Request-Method": "POST",
                     "Access-Control-Request-Headers": "x-access-token,content-type"},
        )  # fmt: skip
        assert preflight.status_code == 200, preflight.text
        assert preflight.headers["access-control-allow-origin"] == "*"
        assert "x-access-token" in preflight.headers["access-control-allow-headers"].lower()
        # ... and a request without the token is still refused, now readable by the page.
        refused = httpx.post(
            f"{compat.sandbox_url}/filesystem.Filesystem/ListDir", json={"path": "/"},
            headers={"E2b-Sandbox-Id": sandbox.sandbox_id, "E2b-Sandbox-Port": "49983",
                     "Origin": compat.api_url},
        )  # fmt: skip
        assert refused.status_code == 401
        assert refused.headers["access-control-allow-origin"] == "*"


def test_a_wrong_key_is_refused_and_shows_nothing(compat: Compat, browser: Browser) -> None:
    _submit_key(browser, compat, "e2b_" + "0" * 40, "#/sandboxes")
    message = browser("wait_text", selector="[role=alert]", text="refused")
    assert "vivarium keys create" in message
    assert browser("count", selector="table") == 0 and browser("count", selector="header") == 0
    # The API behind it refuses a request without a key, or with a wrong one.
    for headers in ({}, {"X-API-Key": "e2b_" + "0" * 40}):
        response = httpx.get(f"{compat.api_url}/v2/sandboxes", headers=headers)
        assert response.status_code == 401 and response.json()["code"] == 401


def test_sign_in_terminal_files_and_lifecycle_buttons(compat: Compat, browser: Browser,
                                                      tmp_path: Path) -> None:  # fmt: skip
    sandbox = Sandbox.create(timeout=600, metadata={"lesson": "dashboard"})
    sid = sandbox.sandbox_id
    try:
        _sign_in(browser, compat, compat.api_key)
        row = f'tr[data-sandbox="{sid}"]'
        assert "running" in browser("wait_text", selector=row, text="running")
        browser("fill", selector="[aria-label='Metadata filter']", value="lesson=dashboard")
        browser("press", key="Enter")
        browser("wait_text", selector=row, text="lesson=dashboard")
        browser("wait_text", selector=row, text="MiB")  # its memory, from the latest sample
        browser.screenshot("sandboxes")
        browser("click", selector=f"{row} a")
        browser.screenshot("sandbox")

        # The terminal: a login shell of the sandbox's user, in a PTY.
        browser("terminal_wait", text="$", timeout=30000)
        _enter(browser, "echo hello | tee /home/user/from-terminal.txt")
        assert "\nhello" in browser("terminal_wait", text="\nhello")
        _enter(browser, "python3")
        browser("terminal_wait", text=">>> ")
        _enter(browser, "print(6 * 7)")
        browser("terminal_wait", text="\n42")
        browser.screenshot("terminal")
        _enter(browser, "exit()")
        assert sandbox.files.read("/home/user/from-terminal.txt") == "hello\n"
        _full_screen_programs_and_resize(browser, sandbox)

        # Files: what the terminal wrote, a folder made and deleted, a large upload that streams.
        browser("click", selector="button[role=tab]:has-text('Files')")
        browser("wait_text", selector='tr[data-entry="from-terminal.txt"]', text="6 B")
        browser("click", selector='a[data-name="from-terminal.txt"]')
        assert browser("wait_text", selector="[data-test=file-text]", text="hello") == "hello\n"
        saved = tmp_path / "downloaded"
        button = 'tr[data-entry="from-terminal.txt"] button:has-text("Download")'
        name = browser("download", selector=button, path=str(saved))
        assert name == "from-terminal.txt" and saved.read_text() == "hello\n"
        browser("fill", selector="[aria-label='New folder name']", value="made-in-browser")
        browser("click", selector="text=Create folder")
        browser("wait_text", selector='tr[data-entry="made-in-browser"]', text="made-in-browser")
        assert sandbox.files.exists("/home/user/made-in-browser")
        browser("click", selector='tr[data-entry="made-in-browser"] button:has-text("Delete")')
        _until(lambda: not sandbox.files.exists("/home/user/made-in-browser"))

        upload = tmp_path / "big.bin"
        upload.write_bytes(os.urandom(UPLOAD_MB << 20))
        pid = compat.server.proc.pid if compat.server.proc else 0
        baseline, peak, done = _rss_kib(pid), [0], threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], _rss_kib(pid))
                time.sleep(0.05)

        sampler = threading.Thread(target=sample)
        sampler.start()
        try:
            browser("upload", selector="input[type=file]", files=[str(upload)])
            browser("wait_text", selector="[data-test=upload-progress]", text="uploaded",
                    timeout=180_000)  # fmt: skip
        finally:
            done.set()
            sampler.join()
        browser("wait_text", selector='tr[data-entry="big.bin"]', text=f"{UPLOAD_MB}.0 MiB")
        got = sandbox.files.read("/home/user/big.bin", format="bytes")
        assert hashlib.sha256(got).digest() == hashlib.sha256(upload.read_bytes()).digest()
        grew_mib = (peak[0] - baseline) / 1024
        print(f"the server grew {grew_mib:.1f} MiB during a {UPLOAD_MB} MiB upload")
        assert grew_mib < UPLOAD_MB / 3, f"the server grew {grew_mib:.0f} MiB during the upload"

        browser("click", selector="button[role=tab]:has-text('Metrics')")
        browser("wait_text", selector="[data-test=charts]", text="Memory")
        assert browser("count", selector="text=No samples yet") == 0  # the charts have data
        browser.screenshot("metrics")
        browser("click", selector="button[role=tab]:has-text('Logs & events')")
        browser("wait_text", selector="[data-test=events]", text="created")

        # A snapshot the client took is listed, and deleted from the page.
        snapshot = sandbox.create_snapshot(name="dashboard-lesson")
        browser("goto", url=f"{compat.api_url}/dashboard/#/snapshots")
        snap_row = f'tr[data-snapshot="{snapshot.snapshot_id}"]'
        browser("wait_text", selector=snap_row, text="dashboard-lesson")
        browser("click", selector=f"{snap_row} button:has-text('Delete')")
        browser("wait_text", selector="[data-test=snapshots]", text="No snapshots")
        assert Sandbox.list_snapshots(name="dashboard-lesson").next_items() == []
        browser("goto", url=f"{compat.api_url}/dashboard/#/sandboxes/{sid}")

        # The buttons, each seen by the official client.
        browser("click", selector="[data-action=pause]")
        browser("wait_text", selector="h1", text="paused", timeout=60_000)
        assert _state(sid) == "paused"
        browser("click", selector="[data-action=resume]")
        browser("wait_text", selector="h1", text="running", timeout=60_000)
        assert _state(sid) == "running"
        resumed = Sandbox.connect(sid)
        assert resumed.commands.run("cat /home/user/from-terminal.txt").stdout == "hello\n"
        browser("click", selector="[data-action=kill]")
        browser("wait_text", selector="main", text="killed", timeout=60_000)
        with pytest.raises(NotFoundException):
            Sandbox.get_info(sid)
    finally:
        _kill(sid)


def test_a_terminal_says_when_its_sandbox_is_paused_or_killed(compat: Compat,
                                                             browser: Browser) -> None:  # fmt: skip
    sandbox = Sandbox.create(timeout=600)
    sid = sandbox.sandbox_id
    try:
        _sign_in(browser, compat, compat.api_key, f"#/sandboxes/{sid}")
        browser("terminal_wait", text="$", timeout=30000)
        assert sandbox.pause()
        status = browser("wait_text", selector="[data-test=terminal-status]", text="paused",
                         timeout=60_000)  # fmt: skip
        assert "Resume" in status
        Sandbox.connect(sid, timeout=600)
        browser("goto", url=f"{compat.api_url}/dashboard/#/sandboxes")
        browser("goto", url=f"{compat.api_url}/dashboard/#/sandboxes/{sid}")
        browser("terminal_wait", text="$", timeout=30000)
        Sandbox.kill(sid)
        browser("wait_text", selector="main", text="killed", timeout=60_000)
    finally:
        _kill(sid)


def test_another_teams_sandbox_and_keys(compat: Compat, browser: Browser) -> None:
    other_key = compat.new_team("dashboard-other", max_sandboxes=2)
    mine = Sandbox.create(timeout=300)
    try:
        _sign_in(browser, compat, other_key, f"#/sandboxes/{mine.sandbox_id}")
        browser("wait_text", selector="main", text="not one of your team's")
        assert browser("count", selector="[data-test=terminal]") == 0
        browser("goto", url=f"{compat.api_url}/dashboard/#/sandboxes")
        browser("wait_text", selector="[data-test=sandboxes]", text="No sandboxes")
        assert mine.sandbox_id not in browser("text", selector="main")

        # Keys: one made in the page works with the official client; revoked, it is refused.
        browser("goto", url=f"{compat.api_url}/dashboard/#/keys")
        browser("fill", selector="[aria-label='Key name']", value="from-the-page")
        browser("click", selector="text=Create key")
        new_key = browser("wait_text", selector="[data-test=new-key]", text="e2b_").strip()
        assert Sandbox.list(api_key=new_key).next_items() == []
        browser.screenshot("keys")
        browser("click", selector='tr[data-key="from-the-page"] button:has-text("Revoke")')
        _until(lambda: httpx.get(f"{compat.api_url}/api-keys",
                                 headers={"X-API-Key": new_key}).status_code == 401)  # fmt: skip
        keys = httpx.get(f"{compat.api_url}/api-keys", headers={"X-API-Key": other_key}).json()
        own = next(k for k in keys if k["name"] == "default")
        refused = httpx.delete(f"{compat.api_url}/api-keys/{own['id']}",
                               headers={"X-API-Key": other_key})  # fmt: skip
        assert refused.status_code == 400 and "revoke itself" in refused.json()["message"]
        unknown = httpx.delete(f"{compat.api_url}/api-keys/{own['id']}",
                               headers={"X-API-Key": compat.api_key})  # fmt: skip
        assert unknown.status_code == 404  # another team's key is not ours to revoke

        # Create from a template, with the page's button.
        browser("goto", url=f"{compat.api_url}/dashboard/#/sandboxes")
        browser("select", selector="[aria-label=Template]", value="base")
        browser("click", selector="text=Create sandbox")
        title = browser("wait_text", selector="h1", text="running", timeout=60_000)
        made = title.split()[0]
        assert [s.sandbox_id for s in Sandbox.list(api_key=other_key).next_items()] == [made]
        Sandbox.kill(made, api_key=other_key)
    finally:
        _kill(mine.sandbox_id)


def test_a_template_build_shows_its_status_and_log(compat: Compat, browser: Browser) -> None:
    name = f"dash-broken-{uuid.uuid4().hex[:6]}"
    with pytest.raises(BuildException):
        Template.build(Template().from_base_image().run_cmd("echo dash-reason; exit 3"), name)
    with compat.admin() as http:
        detail = http.get(f"/templates/{name}").json()
        assert [b["status"] for b in detail["builds"]] == ["error"], detail
        try:
            _sign_in(browser, compat, compat.api_key, "#/templates")
            browser("wait_text", selector="[data-test=templates]", text="code-interpreter-v1")
            browser.screenshot("templates")
            browser("click", selector=f"a:has-text('{name}')")
            browser("wait_text", selector="main", text="The build failed")
            browser("wait_text", selector="[data-test=build-log]", text="dash-reason")
            browser.screenshot("template-build")
        finally:
            http.delete(f"/templates/{name}")


def test_latest_metrics_of_many_sandboxes(compat: Compat) -> None:
    other_key = compat.new_team("dashboard-metrics", max_sandboxes=1)
    with (
        Sandbox.create(timeout=120) as mine,
        Sandbox.create(timeout=120, api_key=other_key) as theirs,
        compat.admin() as http,
    ):
        ids = f"{mine.sandbox_id},{theirs.sandbox_id},nosuchsandbox"
        body: dict[str, Any] = {}

        def sampled() -> bool:  # by the node's sampler, every few seconds
            body.update(http.get("/sandboxes/metrics", params={"sandbox_ids": ids}).json())
            return bool(body["sandboxes"])

        _until(sampled)
        assert set(body["sandboxes"]) == {mine.sandbox_id}  # another team's is left out
        sample = body["sandboxes"][mine.sandbox_id]
        assert sample["memTotal"] > sample["memUsed"] > 0 and sample["cpuCount"] >= 1
        for bad in ("", ",".join(["x"] * 101)):
            refused = http.get("/sandboxes/metrics", params={"sandbox_ids": bad})
            assert refused.status_code == 400 and "sandbox_ids" in refused.json()["message"]


def _full_screen_programs_and_resize(browser: Browser, sandbox: Sandbox) -> None:
    """top and vim draw and quit; a narrower window is a narrower PTY."""
    _enter(browser, "top -d 1")
    browser("terminal_wait", text="load average")
    browser("type", text="q")
    # Keys typed before top has quit would be flushed with its input: wait for the shell.
    _until(lambda: "load average" not in browser("text", selector=".xterm-rows"))
    _enter(browser, "vim /home/user/from-vim.txt")
    browser("terminal_wait", text='from-vim.txt" [New]')
    browser("type", text="iwritten in vim")
    browser("press", key="Escape")
    _enter(browser, ":wq")
    _until(lambda: sandbox.files.exists("/home/user/from-vim.txt")
           and sandbox.files.read("/home/user/from-vim.txt") == "written in vim\n")  # fmt: skip
    wide = _columns(browser, "wide")
    browser("viewport", width=900, height=860)
    time.sleep(1)  # the page debounces resizes
    narrow = _columns(browser, "narrow")
    assert 0 < narrow < wide, (narrow, wide)
    browser("viewport", width=1360, height=860)


def _columns(browser: Browser, mark: str) -> int:
    """The PTY's width, as `tput cols` in the shell says it."""
    _enter(browser, f"echo {mark}-cols=$(tput cols)")
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        found = re.findall(rf"{mark}-cols=(\d+)", browser("text", selector=".xterm-rows"))
        if found:
            return int(found[-1])
        time.sleep(0.1)
    raise AssertionError(f"tput cols printed nothing: {browser('text', selector='.xterm-rows')}")


def _enter(browser: Browser, line: str) -> None:
    """Types a line into the terminal, as a user would."""
    browser("type", text=line)
    browser("press", key="Enter")


def _state(sandbox_id: str) -> str:
    return str(Sandbox.get_info(sandbox_id).state.value)


def _until(check: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def _kill(sandbox_id: str) -> None:
    Sandbox.kill(sandbox_id)  # False if it is gone already

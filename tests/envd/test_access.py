"""The access token: once /init set one, requests need it, or a valid file-URL signature."""

from __future__ import annotations

import time
from collections.abc import Iterator

import httpx
import pytest

from tests.envd.conftest import run_envd
from vivarium.guest.envd.auth import file_signature

TOKEN = "secret-token"


@pytest.fixture()
def secured() -> Iterator[httpx.Client]:
    with run_envd() as url, httpx.Client(base_url=url, timeout=10) as http:
        assert (
            http.post("/init", json={"accessToken": TOKEN, "envVars": {"A": "1"}}).status_code
            == 204
        )
        yield http


def test_requests_need_the_token(secured: httpx.Client) -> None:
    assert secured.get("/health").status_code == 204  # liveness stays open
    assert secured.get("/envs").status_code == 401
    assert secured.get("/envs", headers={"X-Access-Token": "wrong"}).status_code == 401
    envs = secured.get("/envs", headers={"X-Access-Token": TOKEN})
    assert envs.status_code == 200 and envs.json()["A"] == "1"
    rpc = secured.post(
        "/filesystem.Filesystem/Stat", json={"path": "/"}, headers={"Connect-Protocol-Version": "1"}
    )
    assert rpc.status_code == 401


def test_signed_file_urls(secured: httpx.Client, tmp_path: object) -> None:
    path = f"{tmp_path}/signed.txt"
    write_sig = file_signature(path, "write", "root", TOKEN, "")
    upload = secured.post(
        "/files",
        params={"path": path, "username": "root", "signature": write_sig},
        content=b"hello",
        headers={"Content-Type": "application/octet-stream"},
    )
    assert upload.status_code == 200, upload.text
    expiry = str(int(time.time()) + 60)
    read_sig = file_signature(path, "read", "root", TOKEN, expiry)
    download = secured.get(
        "/files",
        params={
            "path": path,
            "username": "root",
            "signature": read_sig,
            "signature_expiration": expiry,
        },
    )
    assert download.status_code == 200 and download.content == b"hello"
    # A write signature does not read, an expired one does not work, a forged one neither.
    assert (
        secured.get(
            "/files", params={"path": path, "username": "root", "signature": write_sig}
        ).status_code
        == 401
    )
    old = str(int(time.time()) - 1)
    stale = file_signature(path, "read", "root", TOKEN, old)
    assert (
        secured.get(
            "/files",
            params={
                "path": path,
                "username": "root",
                "signature": stale,
                "signature_expiration": old,
            },
        ).status_code
        == 401
    )
    assert secured.get("/files", params={"path": path, "signature": "v1_forged"}).status_code == 401

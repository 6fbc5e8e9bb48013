"""The access token: once /init set one, requests need it, or a valid file-URL signature."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest
from e2b.sandbox.signature import Signature, get_signature

from tests.envd.conftest import run_envd

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
    # Signed the way the official client signs its upload and download URLs.
    path = f"{tmp_path}/signed.txt"
    write_sig = get_signature(path, "write", "root", TOKEN)["signature"]
    upload = secured.post(
        "/files",
        params={"path": path, "username": "root", "signature": write_sig},
        content=b"hello",
        headers={"Content-Type": "application/octet-stream"},
    )
    assert upload.status_code == 200, upload.text
    read = get_signature(path, "read", "root", TOKEN, expiration_in_seconds=60)
    download = secured.get("/files", params=_signed(path, read))
    assert download.status_code == 200 and download.content == b"hello"
    # A write signature does not read, an expired one does not work, a forged one neither.
    as_read = {"path": path, "username": "root", "signature": write_sig}
    assert secured.get("/files", params=as_read).status_code == 401
    stale = get_signature(path, "read", "root", TOKEN, expiration_in_seconds=-1)
    assert secured.get("/files", params=_signed(path, stale)).status_code == 401
    assert secured.get("/files", params={"path": path, "signature": "v1_forged"}).status_code == 401


def _signed(path: str, signature: Signature) -> dict[str, str]:
    return {
        "path": path,
        "username": "root",
        "signature": signature["signature"],
        "signature_expiration": str(signature["expiration"]),
    }

"""TLS on the API and the proxy, with a certificate authority this test makes itself: the
official client over https:// to both, the CLI, and a renewed certificate taking effect without
a restart."""

from __future__ import annotations

import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.support import VIVARIUM, Server, make_server, running_server

API_PORT = 3126  # proxy on API_PORT + 1000
NAMES = "subjectAltName=DNS:localhost,IP:127.0.0.1,DNS:*.sandbox.test"


def openssl(*args: str) -> None:
    subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)


def make_ca(directory: Path) -> Path:
    openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-keyout", str(directory / "ca.key"), "-out", str(directory / "ca.pem"), "-days", "2",
            "-subj", "/CN=vivarium test CA")  # fmt: skip
    return directory / "ca.pem"


def issue(directory: Path, name: str, common_name: str) -> tuple[Path, Path]:
    """A server certificate for 127.0.0.1 and *.sandbox.test, signed by the test CA."""
    key, csr, cert = (directory / f"{name}.{ext}" for ext in ("key", "csr", "pem"))
    ext = directory / "ext.cnf"
    ext.write_text(f"{NAMES}\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n")
    openssl("req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout",
            str(key), "-out", str(csr), "-subj", f"/CN={common_name}")  # fmt: skip
    openssl("x509", "-req", "-in", str(csr), "-CA", str(directory / "ca.pem"), "-CAkey",
            str(directory / "ca.key"), "-CAcreateserial", "-out", str(cert), "-days", "2",
            "-extfile", str(ext))  # fmt: skip
    return cert, key


def served_common_name(port: int, ca: Path) -> str:
    context = ssl.create_default_context(cafile=str(ca))
    with socket.create_connection(("127.0.0.1", port), timeout=10) as raw, \
            context.wrap_socket(raw, server_hostname="127.0.0.1") as tls:  # fmt: skip
        subject = dict(item[0] for item in tls.getpeercert()["subject"])
    return str(subject["commonName"])


# The official client, in a process of its own: its connection pools are per process and read
# the trusted CAs (SSL_CERT_FILE) when first made.
CLIENT = """
import sys
from e2b import Sandbox
api_url, sandbox_url, key = sys.argv[1:4]
sbx = Sandbox.create(api_key=key, api_url=api_url, sandbox_url=sandbox_url, timeout=120)
try:
    sbx.files.write("/home/user/over-tls.txt", "sealed")
    out = sbx.commands.run("cat /home/user/over-tls.txt; echo; echo $((6 * 7))")
    print(out.stdout.split())
finally:
    sbx.kill()
"""


def official_client(srv: Server, ca: Path | None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("E2B_", "SSL_CERT"))}
    if ca is not None:
        env["SSL_CERT_FILE"] = str(ca)
    key = (srv.state_dir / "admin.key").read_text().strip()
    return subprocess.run(
        [sys.executable, "-c", CLIENT, f"https://127.0.0.1:{API_PORT}",
         f"https://127.0.0.1:{API_PORT + 1000}", key],
        env=env, capture_output=True, text=True, timeout=180,
    )  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    directory = tmp_path_factory.mktemp("pki")
    make_ca(directory)
    issue(directory, "server", "first")
    return directory


@pytest.fixture(scope="module")
def server(pki: Path) -> Iterator[Server]:
    with running_server("tls", "vj", "10.248.3.0/24", API_PORT, proxy_domain="sandbox.test",
                        tls_cert=str(pki / "server.pem"),
                        tls_key=str(pki / "server.key")) as srv:  # fmt: skip
        yield srv


def test_the_official_client_works_over_https_to_the_api_and_through_the_proxy(
    server: Server, pki: Path
) -> None:
    result = official_client(server, pki / "ca.pem")
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "['sealed', '42']"


def test_a_wildcard_certificate_serves_the_proxys_sandbox_hosts(server: Server, pki: Path) -> None:
    """`<port>-<id>.<domain>` over TLS: the name is checked against the wildcard, then routed."""
    key = (server.state_dir / "admin.key").read_text().strip()
    trust = ssl.create_default_context(cafile=str(pki / "ca.pem"))
    api = httpx.Client(base_url=f"https://127.0.0.1:{API_PORT}", verify=trust,
                       headers={"X-API-Key": key})  # fmt: skip
    with api:
        created = api.post("/v2/sandboxes", json={"templateID": "base", "timeout": 120})
        assert created.status_code == 201, created.text
        sandbox_id = created.json()["sandboxID"]
        try:
            host = f"49983-{sandbox_id}.sandbox.test"
            context = ssl.create_default_context(cafile=str(pki / "ca.pem"))
            with socket.create_connection(("127.0.0.1", API_PORT + 1000), timeout=10) as raw, \
                    context.wrap_socket(raw, server_hostname=host) as tls:  # fmt: skip
                tls.sendall(f"GET /health HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
                assert tls.recv(100).startswith(b"HTTP/1.1 204")  # envd's own answer
        finally:
            api.delete(f"/sandboxes/{sandbox_id}")


def test_a_client_that_does_not_trust_the_certificate_is_refused(server: Server) -> None:
    result = official_client(server, None)
    assert result.returncode != 0
    assert "certificate" in result.stderr.lower()


def test_plain_http_gets_no_answer_from_a_tls_listener(server: Server) -> None:
    for port in (API_PORT, API_PORT + 1000):
        with socket.create_connection(("127.0.0.1", port), timeout=10) as raw:
            raw.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
            raw.settimeout(10)
            assert not raw.recv(100).startswith(b"HTTP/1.1 200")


def test_the_cli_reaches_its_own_server_over_tls(server: Server) -> None:
    given = ("VIVARIUM_API_URL", "VIVARIUM_SANDBOX_URL", "VIVARIUM_API_KEY")
    env_free = {k: v for k, v in server.env.items() if not k.startswith("E2B_") and k not in given}
    result = subprocess.run([VIVARIUM, "sandbox", "list"], env=env_free, capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stderr


def test_a_renewed_certificate_is_served_without_a_restart(server: Server, pki: Path) -> None:
    assert served_common_name(API_PORT, pki / "ca.pem") == "first"
    # A renewal written half-way (a new key that does not match the certificate) is not used.
    issue(pki, "next", "second")
    (pki / "server.key").write_bytes((pki / "next.key").read_bytes())
    time.sleep(6)
    assert served_common_name(API_PORT, pki / "ca.pem") == "first"
    (pki / "server.pem").write_bytes((pki / "next.pem").read_bytes())
    deadline = time.monotonic() + 15
    while time.monotonic() < deadline:
        if served_common_name(API_PORT + 1000, pki / "ca.pem") == "second":
            break
        time.sleep(0.5)
    assert served_common_name(API_PORT + 1000, pki / "ca.pem") == "second"
    assert served_common_name(API_PORT, pki / "ca.pem") == "second"
    assert "not reloaded" in server.log_tail(200) and "reloaded" in server.log_tail(200)


def test_a_certificate_that_does_not_load_stops_the_start(tmp_path: Path) -> None:
    srv = make_server("badtls", "vbt", "10.248.4.0/24", API_PORT + 1,
                      tls_cert=str(tmp_path / "missing.pem"),
                      tls_key=str(tmp_path / "missing.key"))  # fmt: skip
    result = subprocess.run([VIVARIUM, "serve"], env=srv.env, capture_output=True, text=True,
                            timeout=60)  # fmt: skip
    assert result.returncode != 0
    assert "cannot use TLS certificate" in result.stderr and "VIVARIUM_TLS_CERT" in result.stderr
    assert not (srv.state_dir / "sandboxes").exists()

"""The deployment's egress CA: the egress proxy presents certificates it signs to sandboxes whose
rules inject headers into HTTPS requests (network/egress.py), and every sandbox trusts it (envd
`/init` caBundle). Its key stays in the state directory, readable by root only, and never
enters a sandbox; a sandbox gets the certificate alone.

Leaf certificates are made on first use per host name and kept in memory, one key for all.
"""

from __future__ import annotations

import datetime
import ssl
import tempfile
import threading
from collections import OrderedDict
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from vivarium.errors import ConfigError
from vivarium.statedir import write_private

CA_DAYS = 3650
LEAF_DAYS = 30
MAX_LEAVES = 1024  # server contexts kept; the least recently used go first


class EgressCA:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        key_path, cert_path = directory / "ca.key", directory / "ca.crt"
        if key_path.exists() and cert_path.exists():
            key = serialization.load_pem_private_key(key_path.read_bytes(), None)
            if not isinstance(key, ec.EllipticCurvePrivateKey):
                raise ConfigError(f"{key_path} is not the EC key vivarium made",
                                  "remove the egress-ca directory: a new CA is made")  # fmt: skip
            self._key = key
            self._cert = x509.load_pem_x509_certificate(cert_path.read_bytes())
        else:
            self._key, self._cert = _new_ca()
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            write_private(key_path, _key_pem(self._key).decode())
            write_private(cert_path, self.cert_pem)
        self._leaf_key = ec.generate_private_key(ec.SECP256R1())
        self._contexts: OrderedDict[str, ssl.SSLContext] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def cert_pem(self) -> str:
        return self._cert.public_bytes(serialization.Encoding.PEM).decode()

    def server_context(self, name: str) -> ssl.SSLContext:
        """A TLS server context presenting a certificate for `name` signed by the CA."""
        with self._lock:
            context = self._contexts.get(name)
            if context is not None:
                self._contexts.move_to_end(name)
                return context
        context = self._make_context(name)
        with self._lock:
            self._contexts[name] = context
            while len(self._contexts) > MAX_LEAVES:
                self._contexts.popitem(last=False)
        return context

    def _make_context(self, name: str) -> ssl.SSLContext:
        now = datetime.datetime.now(datetime.UTC)
        cert = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(self._cert.subject)
            .public_key(self._leaf_key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=LEAF_DAYS))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(  # strict verifiers (Python 3.13's default) want it
                x509.AuthorityKeyIdentifier.from_issuer_public_key(self._key.public_key()),
                critical=False,
            )
            .add_extension(
                x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
            )
            .sign(self._key, hashes.SHA256())
        )
        context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        context.set_alpn_protocols(["http/1.1"])  # the proxy speaks HTTP/1.1 on both sides
        # ssl loads a chain from files only: a private temporary file, gone at once.
        with tempfile.NamedTemporaryFile("wb", dir=self.directory) as chain:
            chain.write(_key_pem(self._leaf_key))
            chain.write(cert.public_bytes(serialization.Encoding.PEM))
            chain.flush()
            context.load_cert_chain(chain.name)
        return context


def _new_ca() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "vivarium egress CA")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=CA_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )  # fmt: skip
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )  # fmt: skip

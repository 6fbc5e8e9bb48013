"""Trust in the deployment's egress CA (the host's network/egress_ca.py), installed at `/init`
from its `caBundle`: the egress proxy presents certificates it signs for hosts whose requests
it adds headers to. The sandbox gets the certificate only; the key stays on the host.

Where programs look for trust: the system bundle (OpenSSL, curl, Python's ssl, Debian's pip),
certifi's own bundles, and the variables Node.js, requests and httpx read for processes envd
starts. Installing twice changes nothing, and costs one small read.
"""

from __future__ import annotations

import glob
import os

CA_FILE = "/usr/local/share/ca-certificates/vivarium-egress.crt"
SYSTEM_BUNDLE = "/etc/ssl/certs/ca-certificates.crt"
CERTIFI_BUNDLES = ("/usr/lib/python3/dist-packages/certifi/cacert.pem",
                   "/usr/local/lib/python3*/*-packages/certifi/cacert.pem")  # fmt: skip
ENV = {"NODE_EXTRA_CA_CERTS": CA_FILE, "REQUESTS_CA_BUNDLE": SYSTEM_BUNDLE,
       "SSL_CERT_FILE": SYSTEM_BUNDLE}  # fmt: skip


def install(pem: str) -> dict[str, str]:
    """Trust `pem`; returns the variables that point programs at it."""
    pem = pem.strip() + "\n"
    if not pem.startswith("-----BEGIN CERTIFICATE-----"):
        raise ValueError("caBundle must be PEM certificates")
    try:
        with open(CA_FILE) as f:
            if f.read() == pem:  # installed already (a resume, a fork): no bundle to read
                return dict(ENV)
    except OSError:
        pass
    bundles = [SYSTEM_BUNDLE, *(p for pattern in CERTIFI_BUNDLES for p in glob.glob(pattern))]
    for bundle in bundles:
        path = os.path.realpath(bundle)
        try:
            with open(path) as f:
                if pem in f.read():
                    continue
            with open(path, "a") as f:
                f.write("\n" + pem)
        except OSError:  # a bundle that is not there, or read-only: the others still count
            continue
    # Last: its presence says the bundles have it too.
    os.makedirs(os.path.dirname(CA_FILE), exist_ok=True)
    with open(CA_FILE, "w") as f:
        f.write(pem)
    return dict(ENV)

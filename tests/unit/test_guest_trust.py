"""envd's install of the egress CA (guest/envd/trust.py), on files of a temporary root."""

from __future__ import annotations

from pathlib import Path

import pytest

from vivarium.guest.envd import trust

PEM = "-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"


def test_the_ca_is_added_once_to_every_bundle_and_programs_are_pointed_at_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    system, certifi = tmp_path / "ca-certificates.crt", tmp_path / "certifi" / "cacert.pem"
    certifi.parent.mkdir()
    system.write_text("SYSTEM\n")
    certifi.write_text("CERTIFI\n")
    monkeypatch.setattr(trust, "CA_FILE", str(tmp_path / "local" / "vivarium-egress.crt"))
    monkeypatch.setattr(trust, "SYSTEM_BUNDLE", str(system))
    monkeypatch.setattr(trust, "CERTIFI_BUNDLES", (str(tmp_path / "*" / "cacert.pem"),))
    for _ in range(2):
        env = trust.install(PEM)
    assert system.read_text().count(PEM) == 1 and system.read_text().startswith("SYSTEM\n")
    assert certifi.read_text().count(PEM) == 1
    assert (tmp_path / "local" / "vivarium-egress.crt").read_text() == PEM
    assert set(env) == {"NODE_EXTRA_CA_CERTS", "REQUESTS_CA_BUNDLE", "SSL_CERT_FILE"}
    with pytest.raises(ValueError, match="PEM"):
        trust.install("not a certificate")

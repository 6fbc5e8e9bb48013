"""TLS for the listeners that clients on other machines use: the API and the sandbox proxy.

One certificate and key (`VIVARIUM_TLS_CERT`, `VIVARIUM_TLS_KEY`) serve both; a wildcard
certificate for `*.<VIVARIUM_PROXY_DOMAIN>` also covers the proxy's `<port>-<id>.<domain>`
hosts. The files are read again when they change (a renewal needs no restart): a new pair is
tried on a context of its own first, so a half-written renewal never replaces a working one.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from pathlib import Path

from vivarium.errors import ConfigError

log = logging.getLogger(__name__)

RELOAD_POLL_S = 5.0


def server_context() -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    return context


class ReloadingContext:
    def __init__(self, cert: Path, key: Path) -> None:
        self.cert = cert
        self.key = key
        self.context = server_context()
        self._stamp: tuple[int, ...] | None = None
        try:
            self.reload()
        except (OSError, ssl.SSLError) as exc:
            raise ConfigError(
                f"cannot use TLS certificate {cert} with key {key}: {exc}",
                "set VIVARIUM_TLS_CERT and VIVARIUM_TLS_KEY to a PEM certificate (chain) and its "
                "private key, readable by root",
            ) from None

    def _files_stamp(self) -> tuple[int, ...]:
        cert, key = self.cert.stat(), self.key.stat()
        return (cert.st_mtime_ns, cert.st_size, cert.st_ino, key.st_mtime_ns, key.st_size,
                key.st_ino)  # fmt: skip

    def reload(self) -> bool:
        """Load the pair if it changed since the last load; True if it was loaded."""
        stamp = self._files_stamp()
        if stamp == self._stamp:
            return False
        server_context().load_cert_chain(self.cert, self.key)  # raises if they do not match
        self.context.load_cert_chain(self.cert, self.key)  # new handshakes use the new pair
        self._stamp = stamp
        return True

    async def watch(self) -> None:
        while True:
            await asyncio.sleep(RELOAD_POLL_S)
            try:
                if await asyncio.to_thread(self.reload):
                    log.info("TLS certificate %s reloaded", self.cert)
            except (OSError, ssl.SSLError) as exc:
                log.warning("TLS certificate %s not reloaded (%s); the previous one stays in use",
                            self.cert, exc)  # fmt: skip


def pinned_client_context(cert: Path) -> ssl.SSLContext:
    """For the local CLI talking to this host's own listeners at 127.0.0.1: trust exactly the
    configured certificate (whatever names it carries), nothing else."""
    context = ssl.create_default_context(cafile=str(cert))
    context.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN  # a CA-issued leaf as its own anchor
    context.check_hostname = False
    return context

"""API keys in E2B's format (`e2b_` + 40 hex characters). Only their SHA-256 is stored: a key
has 160 random bits, so a fast hash is enough (no dictionary to guess from)."""

from __future__ import annotations

import hashlib
import hmac
import secrets

PREFIX = "e2b_"
SHOWN = 8  # characters after the prefix that listings show


def new_key() -> str:
    return PREFIX + secrets.token_hex(20)


def key_hash(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def shown_prefix(key: str) -> str:
    return key[: len(PREFIX) + SHOWN]


def envd_token(seed: bytes, sandbox_id: str) -> str:
    """The sandbox's envd access token: derived, so it never needs storing in the catalog."""
    return hmac.new(seed, f"envd:{sandbox_id}".encode(), hashlib.sha256).hexdigest()


def volume_token(seed: bytes, volume_id: str) -> str:
    """The bearer token of a volume's content API: derived like envd's, never stored."""
    return hmac.new(seed, f"volume:{volume_id}".encode(), hashlib.sha256).hexdigest()


def traffic_token(seed: bytes, sandbox_id: str) -> str:
    """What a sandbox without public traffic demands on its ports (e2b-traffic-access-token)."""
    return hmac.new(seed, f"traffic:{sandbox_id}".encode(), hashlib.sha256).hexdigest()


def upload_token(seed: bytes, template_id: str, files_hash: str, expires: int) -> str:
    """The signature of a template's file-upload URL (the client PUTs there with no API key),
    good until `expires` (unix seconds)."""
    message = f"upload:{template_id}:{files_hash}:{expires}".encode()
    return hmac.new(seed, message, hashlib.sha256).hexdigest()

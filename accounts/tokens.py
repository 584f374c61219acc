"""API token format and digests.

Key: ``lsl_<prefix>_<secret>``. The prefix is a unique, indexed lookup value;
the secret is verified with an HMAC keyed by SECRET_KEY and compared in
constant time, so a database leak does not reveal usable tokens.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass

from django.conf import settings

KEY_PREFIX = "lsl"
PREFIX_BYTES = 6  # 12 hex chars
SECRET_BYTES = 32


@dataclass(frozen=True)
class NewKey:
    key: str
    prefix: str
    digest: str


def digest_secret(secret: str) -> str:
    return hmac.new(settings.SECRET_KEY.encode(), secret.encode(), hashlib.sha256).hexdigest()


def generate_key() -> NewKey:
    prefix = secrets.token_hex(PREFIX_BYTES)
    secret = secrets.token_urlsafe(SECRET_BYTES)
    return NewKey(key=f"{KEY_PREFIX}_{prefix}_{secret}", prefix=prefix, digest=digest_secret(secret))


def split_key(key: str) -> tuple[str, str] | None:
    """Return (prefix, secret) or None when `key` is not shaped like an LSL token."""
    parts = key.split("_", 2)
    if len(parts) != 3 or parts[0] != KEY_PREFIX or len(parts[1]) != PREFIX_BYTES * 2 or not parts[2]:
        return None
    return parts[1], parts[2]


def secret_matches(secret: str, digest: str) -> bool:
    return hmac.compare_digest(digest_secret(secret), digest)

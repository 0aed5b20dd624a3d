"""Opaque secrets (codes, access and refresh tokens), their digests, and PKCE.

Each secret is 256 random bits behind a prefix that says what it is, so a token
pasted in the wrong place (or found in a leak scanner) is recognisable; relayd
keeps only its SHA-256 digest. A grant is bound to its relay key through a
fingerprint of the key's digest, never the digest itself: the grant store then
holds nothing that would authenticate as the key.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
from typing import Final

from relayd.config import RelayKey

__all__ = [
    "ACCESS_PREFIX",
    "CODE_PREFIX",
    "REFRESH_PREFIX",
    "digest",
    "is_access_token",
    "key_print",
    "new_secret",
    "pkce_matches",
    "valid_challenge",
    "valid_verifier",
]

ACCESS_PREFIX: Final = "rlyat_"
REFRESH_PREFIX: Final = "rlyrt_"
CODE_PREFIX: Final = "rlyac_"

# RFC 7636 §4.1: 43 to 128 unreserved characters; §4.2: S256 is base64url (no
# padding) of a SHA-256, which is always 43 characters.
_VERIFIER: Final = re.compile(r"[A-Za-z0-9._~-]{43,128}")
_CHALLENGE: Final = re.compile(r"[A-Za-z0-9_-]{43}")


def new_secret(prefix: str) -> str:
    return prefix + secrets.token_urlsafe(32)  # 256 bits


def digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8", "surrogateescape")).digest()


def is_access_token(secret: str) -> bool:
    return secret.startswith(ACCESS_PREFIX)


def key_print(key: RelayKey) -> str:
    """Which relay key (and which secret of it) a grant was made with."""
    return hashlib.sha256(b"relayd oauth grant\0" + key.digest).hexdigest()[:32]


def valid_challenge(challenge: str) -> bool:
    return _CHALLENGE.fullmatch(challenge) is not None


def valid_verifier(verifier: str) -> bool:
    return _VERIFIER.fullmatch(verifier) is not None


def pkce_matches(verifier: str, challenge: str) -> bool:
    """RFC 7636 §4.6, S256: BASE64URL(SHA256(verifier)) == challenge."""
    if not valid_verifier(verifier):
        return False
    computed = base64.urlsafe_b64encode(hashlib.sha256(verifier.encode("ascii")).digest())
    return hmac.compare_digest(computed.rstrip(b"=").decode("ascii"), challenge)

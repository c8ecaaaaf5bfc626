"""API keys and the admin token: hashed once at startup, compared in constant time.

Keys are kept only as SHA-256 digests, so a memory dump or a log line never shows one, and every
presented key is compared against every known digest with hmac.compare_digest (no early exit that
would time how many leading bytes matched). A session's owner is the digest of the key that created it:
Redis never stores a key either.
"""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Sequence

from app.errors import Unauthorized

ANONYMOUS = "anonymous"


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8")).digest()


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, or None when absent or another scheme."""
    if not authorization:
        return None
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


class ApiKeyAuth:
    """Maps a presented API key to an owner id; open (everyone is "anonymous") when no keys are set."""

    def __init__(self, api_keys: Sequence[str]) -> None:
        self._digests = [_digest(key) for key in api_keys]

    @property
    def is_open(self) -> bool:
        return not self._digests

    def owner(self, presented: str | None) -> str:
        """The owner id for this key; Unauthorized (401) when keys are required and this is not one."""
        if self.is_open:
            return ANONYMOUS
        if not presented:
            raise Unauthorized()
        digest = _digest(presented)
        matched = False
        for known in self._digests:
            matched |= hmac.compare_digest(known, digest)
        if not matched:
            raise Unauthorized("invalid API key: send one of the keys in the server's API_KEYS")
        return "key-" + digest.hex()[:32]


class AdminAuth:
    """Guards /admin/metrics and /admin/info; open when ADMIN_TOKEN is unset (development)."""

    def __init__(self, token: str | None) -> None:
        self._digest = _digest(token) if token else None

    @property
    def is_open(self) -> bool:
        return self._digest is None

    def check(self, presented: str | None) -> None:
        if self._digest is None:
            return
        if not presented or not hmac.compare_digest(self._digest, _digest(presented)):
            raise Unauthorized("missing or invalid admin token: send 'Authorization: Bearer <ADMIN_TOKEN>'")

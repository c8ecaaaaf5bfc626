"""A session's owner id is stored in Redis, so its form is a promise across versions: "key-" and the
first 128 bits (32 hex digits) of the key's SHA-256. Any other form would orphan every stored session on
upgrade (its owner check would refuse the very key that created it). Refusals name the setting to fix."""

from __future__ import annotations

import hashlib

import pytest

from app.auth import AdminAuth, ApiKeyAuth
from app.errors import Unauthorized


def stored_form(key: str) -> str:
    return "key-" + hashlib.sha256(key.encode("utf-8")).hexdigest()[:32]


@pytest.mark.parametrize("key", ["alpha-secret", "clé-secrète"])  # non-ASCII keys hash as UTF-8
def test_the_owner_id_is_the_keys_digest_in_the_stored_form(key: str) -> None:
    assert ApiKeyAuth([key]).owner(key) == stored_form(key)


def test_refusals_name_the_setting_to_fix() -> None:
    with pytest.raises(Unauthorized) as wrong_key:
        ApiKeyAuth(["alpha-secret"]).owner("bravo-secret")
    assert "API_KEYS" in str(wrong_key.value)
    with pytest.raises(Unauthorized) as wrong_token:
        AdminAuth("admin-token").check("not-it")
    assert "Authorization: Bearer <ADMIN_TOKEN>" in str(wrong_token.value)

"""API keys and the admin token: owners derive from key digests; wrong or missing credentials are 401."""

from __future__ import annotations

import pytest

from app.auth import ANONYMOUS, AdminAuth, ApiKeyAuth, bearer_token
from app.errors import Unauthorized


def test_bearer_header_parsing() -> None:
    assert bearer_token("Bearer abc") == "abc"
    assert bearer_token("bearer   abc  ") == "abc"
    assert bearer_token("Basic abc") is None
    assert bearer_token("Bearer ") is None
    assert bearer_token(None) is None


def test_open_api_makes_everyone_anonymous() -> None:
    auth = ApiKeyAuth([])
    assert auth.is_open
    assert auth.owner(None) == auth.owner("anything") == ANONYMOUS


def test_each_key_is_its_own_owner_and_others_are_refused() -> None:
    auth = ApiKeyAuth(["key-one", "key-two"])
    one, two = auth.owner("key-one"), auth.owner("key-two")
    assert one != two and one == auth.owner("key-one")
    assert "key-one" not in one  # the owner id is a digest: Redis never sees a key
    with pytest.raises(Unauthorized) as missing:
        auth.owner(None)
    assert missing.value.status == 401 and missing.value.headers["WWW-Authenticate"] == "Bearer"
    with pytest.raises(Unauthorized, match="invalid API key"):
        auth.owner("key-three")


def test_admin_token() -> None:
    AdminAuth(None).check(None)  # open when unset
    admin = AdminAuth("root-token")
    admin.check("root-token")
    for presented in (None, "", "root-token ", "wrong"):
        with pytest.raises(Unauthorized, match="admin token"):
            admin.check(presented)

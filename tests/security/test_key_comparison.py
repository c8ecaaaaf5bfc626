"""API keys are compared in constant time (SECURITY.md): every presented key is compared, with
hmac.compare_digest, against every known digest, whichever of them matches, so the time taken tells neither
which key matched nor how many leading bytes did.

Timing itself is not measured (it would be a wall-clock assert on a shared machine); the promise is
checked by counting the real compare_digest calls, which an early exit or a `==` changes.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable

import pytest

from app import auth
from app.auth import AdminAuth, ApiKeyAuth
from app.errors import Unauthorized

KEYS = [f"key-{i}-secret" for i in range(5)]


def counting_compare_digest(monkeypatch: pytest.MonkeyPatch) -> list[tuple[bytes, bytes]]:
    """Record each call of app.auth's compare_digest; the real function still decides."""
    calls: list[tuple[bytes, bytes]] = []
    real: Callable[[bytes, bytes], bool] = hmac.compare_digest

    def recording(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", recording)
    return calls


@pytest.mark.parametrize("presented", [KEYS[0], KEYS[2], KEYS[-1], "not-a-key"])
def test_every_known_key_is_compared_whichever_matches(
    monkeypatch: pytest.MonkeyPatch, presented: str
) -> None:
    keys = ApiKeyAuth(KEYS)
    calls = counting_compare_digest(monkeypatch)
    if presented in KEYS:
        keys.owner(presented)
    else:
        with pytest.raises(Unauthorized):
            keys.owner(presented)
    assert len(calls) == len(KEYS)
    assert {known for known, _ in calls} | {given for _, given in calls} >= set(keys._digests)


@pytest.mark.parametrize("presented", ["the-admin-token", "a-wrong-token"])
def test_the_admin_token_is_compared_with_compare_digest(
    monkeypatch: pytest.MonkeyPatch, presented: str
) -> None:
    admin = AdminAuth("the-admin-token")
    calls = counting_compare_digest(monkeypatch)
    if presented == "the-admin-token":
        admin.check(presented)
    else:
        with pytest.raises(Unauthorized):
            admin.check(presented)
    assert len(calls) == 1

"""Per-key rate limit: a key over its budget of turns, new sessions and history reads gets 429
`rate_limited` with Retry-After, over REST and the websocket alike (where invalid frames spend it as
invalid REST bodies do); other keys, deletes and bad credentials spend nothing of it; two replicas share
one budget (it lives in Redis); with the API open, each client address has its own, and a client cannot
choose its address with X-Forwarded-For unless it is a trusted proxy; the budget refills at the
configured rate."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator

import httpx
import pytest
import redis
from redis.asyncio import Redis

from app.metrics import Metrics
from app.ratelimit import RateLimited, RateLimiter
from tests.support import (
    TEST_REDIS_URL,
    LiveServerFactory,
    delete_prefix,
    frame,
    new_prefix,
    open_ws,
    quiet_params,
    require_redis,
    send,
)

LIMIT = 3  # per minute: a burst of 3, then one every 20 s, so a test never sees a refill by accident
KEY_A = {"Authorization": "Bearer key-a"}
KEY_B = {"Authorization": "Bearer key-b"}


@pytest.fixture(scope="module")
def replicas(live_server: LiveServerFactory) -> Iterator[tuple[str, str]]:
    """Two servers with API keys on one key prefix, like two replicas."""
    common = {
        "api_keys": ["key-a", "key-b", "key-c"],
        "rate_limit_per_minute": LIMIT,
        "redis_key_prefix": new_prefix(),
    }
    with live_server(**common) as one, live_server(**common) as two:
        yield one.url, two.url


def stored_messages(session_id: str) -> list[dict[str, str]]:
    """A session's messages read from Redis, not through the (metered) API."""
    client = redis.Redis.from_url(TEST_REDIS_URL)
    try:
        keys = [k for k in client.scan_iter(match=f"*chat:{{{session_id}}}:msgs")]
        assert len(keys) == 1
        return [json.loads(m) for m in client.lrange(keys[0], 0, -1)]
    finally:
        client.close()


def assert_rate_limited(response: httpx.Response) -> None:
    assert response.status_code == 429, response.text
    assert response.json()["error"]["code"] == "rate_limited"
    assert 1 <= int(response.headers["Retry-After"]) <= 60 // LIMIT


def test_a_key_over_its_budget_gets_429_and_others_do_not(replicas: tuple[str, str]) -> None:
    one, two = replicas
    with httpx.Client(base_url=one, timeout=None) as http:
        for _ in range(3):  # bad credentials are a 401 and spend nothing
            assert http.post("/v1/sessions", headers={"Authorization": "Bearer nope"}).status_code == 401
        session_id = http.post("/v1/sessions", headers=KEY_A).json()["session_id"]
        turn = http.post(
            f"/v1/sessions/{session_id}/messages", json={"content": "hi", **quiet_params()}, headers=KEY_A
        )
        assert turn.status_code == 200
        # The third request of the budget goes to the other replica: the budget is shared.
        assert httpx.post(f"{two}/v1/sessions", headers=KEY_A).status_code == 201

        assert_rate_limited(http.post("/v1/sessions", headers=KEY_A))
        assert_rate_limited(httpx.post(f"{two}/v1/sessions", headers=KEY_A))
        refused = http.post(
            f"/v1/sessions/{session_id}/messages", json={"content": "again", **quiet_params()}, headers=KEY_A
        )
        assert_rate_limited(refused)
        # History reads are metered too (their cost grows with the conversation); deletes are not, and
        # other keys have their own budget.
        for read in (f"/v1/sessions/{session_id}", f"/v1/sessions/{session_id}/messages", "/v1/sessions"):
            assert_rate_limited(http.get(read, headers=KEY_A))
        assert http.post("/v1/sessions", headers=KEY_B).status_code == 201
        assert http.delete(f"/v1/sessions/{session_id}", headers=KEY_A).status_code == 204


def test_websocket_messages_spend_the_same_budget(replicas: tuple[str, str]) -> None:
    one, _ = replicas
    key_c = {"Authorization": "Bearer key-c"}
    with httpx.Client(base_url=one, headers=key_c, timeout=None) as http:
        session_id = http.post("/v1/sessions").json()["session_id"]
        with open_ws(one, session_id, key_c) as ws:
            send(ws, type="message", content="hello", **quiet_params())
            while (event := frame(ws))["type"] != "done":
                assert event["type"] in ("start", "token"), event
            # Invalid frames spend the budget as invalid REST bodies do: not a free way to keep it busy.
            # (The budget of 3: the new session, "hello", and this.)
            send(ws, type="message", content="", **quiet_params())
            assert frame(ws)["error"]["code"] == "invalid_request"
            send(ws, type="message", content="one too many", **quiet_params())
            error = frame(ws)
            assert error["type"] == "error" and error["error"]["code"] == "rate_limited", error
            assert 1 <= error["retry_after"] <= 60 // LIMIT
            send(ws, type="cancel")  # cancels are free, and idle ones get no answer
            ws.send("not json either")
            assert frame(ws)["error"]["code"] == "rate_limited"
        stored = stored_messages(session_id)
        assert [m["content"] for m in stored][::2] == ["hello"]


def test_an_open_api_limits_each_client_address(live_server: LiveServerFactory) -> None:
    """Without API keys everyone is "anonymous": the budget is per address, not one for all."""
    with live_server(rate_limit_per_minute=2) as live:
        url = live.url
        here = httpx.Client(base_url=url)
        there = httpx.Client(base_url=url, transport=httpx.HTTPTransport(local_address="127.0.0.2"))
        with here, there:
            assert [here.post("/v1/sessions").status_code for _ in range(3)] == [201, 201, 429]
            assert there.post("/v1/sessions").status_code == 201


def test_forwarded_headers_buy_nothing_unless_the_proxy_is_trusted(live_server: LiveServerFactory) -> None:
    """Rotating X-Forwarded-For from loopback (uvicorn alone trusts loopback's forwarded headers) must not
    give a client a fresh budget per request; from an address in TRUSTED_PROXY_IPS, it names the client."""

    def statuses(url: str) -> list[int]:
        with httpx.Client(base_url=url) as http:
            return [
                http.post("/v1/sessions", headers={"X-Forwarded-For": f"203.0.113.{i}"}).status_code
                for i in range(3)
            ]

    with live_server(rate_limit_per_minute=2) as live:
        assert statuses(live.url) == [201, 201, 429]
    with live_server(rate_limit_per_minute=2, trusted_proxy_ips=["127.0.0.1"]) as live:
        assert statuses(live.url) == [201, 201, 201]  # three clients behind a trusted proxy


def test_the_budget_refills_at_the_configured_rate() -> None:
    """At 120 per minute (one every 500 ms) a burst of at least 120 passes before a refusal, and a wait
    lets one more through, not two: the GCRA script against a real Redis, without the HTTP around it."""
    require_redis()
    per_minute = 120
    prefix = new_prefix()

    async def main() -> None:
        client = Redis.from_url(TEST_REDIS_URL)
        limiter = RateLimiter(client, prefix=prefix, per_minute=per_minute, retry_after=1, metrics=Metrics())
        try:
            allowed = 0
            while True:
                try:
                    await limiter.check("burst")
                    allowed += 1
                except RateLimited as refused:
                    assert refused.headers["Retry-After"] == "1"  # <= 500 ms, rounded up to a second
                    break
            assert allowed >= per_minute  # the burst, plus whatever refilled while it was sent
            await limiter.check("someone-else")  # an untouched caller has its whole budget
            while True:
                try:
                    await limiter.check("burst")
                    break
                except RateLimited:
                    await asyncio.sleep(0.002)
            with pytest.raises(RateLimited):  # one slot refilled, and it is spent
                await limiter.check("burst")
            assert await client.pttl(limiter.key("burst")) > 0  # the budget's key expires by itself
        finally:
            await client.aclose()

    try:
        asyncio.run(main())
    finally:
        delete_prefix(prefix)


def test_a_negative_limit_is_refused_with_the_fix() -> None:
    with pytest.raises(ValueError, match="0 turns the limit off"):
        RateLimiter(Redis(), prefix="x:", per_minute=-1, retry_after=1, metrics=Metrics())

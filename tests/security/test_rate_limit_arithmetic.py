"""The GCRA budget's arithmetic at 2 per minute (one request every 30 s): a burst of 2 passes, the third is
refused with Retry-After 30 s (less the time the three requests took), not 15 or 60.

At the 120 per minute of test_rate_limit.py Retry-After rounds up to 1 s whatever the interval, so a limiter
that refilled twice as fast would pass there; here the interval shows in the number. The script runs
against a real Redis, without the HTTP around it.
"""

from __future__ import annotations

import asyncio
import math
import time

import pytest
from redis.asyncio import Redis

from app.errors import StoreUnavailable
from app.metrics import Metrics
from app.ratelimit import RateLimited, RateLimiter
from tests.support import TEST_REDIS_URL, free_port


def test_retry_after_is_the_interval_at_two_per_minute(redis_prefix: str) -> None:
    async def main() -> tuple[RateLimited, float]:
        client = Redis.from_url(TEST_REDIS_URL)
        limiter = RateLimiter(client, prefix=redis_prefix, per_minute=2, retry_after=1, metrics=Metrics())
        try:
            started = time.monotonic()
            await limiter.check("caller")
            await limiter.check("caller")
            with pytest.raises(RateLimited) as refused:
                await limiter.check("caller")
            took = time.monotonic() - started
            # The budget's key lives until its theoretical arrival time: 60 s, less the time taken.
            ttl_ms = await client.pttl(f"{redis_prefix}ratelimit:caller")  # under the app's prefix
            assert 60_000 - math.ceil(took * 1000) - 1 <= ttl_ms <= 60_000
            return refused.value, took
        finally:
            await client.aclose()

    refused, took = asyncio.run(main())
    retry_after = int(refused.headers["Retry-After"])
    # Redis's clock advanced by at most `took` between the first request and the refusal.
    assert 30 - math.ceil(took) <= retry_after <= 30
    message = f"over its rate limit of 2 turns and new sessions per minute: retry after {retry_after} s"
    assert message in refused.message


def test_zero_turns_the_limit_off_without_touching_redis() -> None:
    """RATE_LIMIT_PER_MINUTE=0 is a valid setting (no limit), and then no request waits on Redis: the
    limiter here points at a port where nothing listens."""
    limiter = RateLimiter(
        Redis(port=free_port()), prefix="x:", per_minute=0, retry_after=1, metrics=Metrics()
    )
    assert not limiter.enabled
    asyncio.run(limiter.check("anyone"))


def test_redis_down_is_store_unavailable_with_retry_after_and_counted() -> None:
    metrics = Metrics()
    down = Redis(port=free_port(), socket_connect_timeout=1)  # nothing listens there
    limiter = RateLimiter(down, prefix="x:", per_minute=5, retry_after=7, metrics=metrics)
    with pytest.raises(StoreUnavailable) as unavailable:
        asyncio.run(limiter.check("anyone"))
    assert unavailable.value.headers == {"Retry-After": "7"}
    assert "store is unavailable (ConnectionError)" in unavailable.value.message
    errors = metrics.registry.get_sample_value(
        "reformer_chat_redis_errors_total", {"operation": "rate_limit"}
    )
    assert errors == 1

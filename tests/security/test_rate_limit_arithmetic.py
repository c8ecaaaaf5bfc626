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

from app.metrics import Metrics
from app.ratelimit import RateLimited, RateLimiter
from tests.support import TEST_REDIS_URL


def test_retry_after_is_the_interval_at_two_per_minute(redis_prefix: str) -> None:
    async def main() -> tuple[int, float]:
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
            ttl_ms = await client.pttl(limiter.key("caller"))
            assert 60_000 - math.ceil(took * 1000) - 1 <= ttl_ms <= 60_000
            return int(refused.value.headers["Retry-After"]), took
        finally:
            await client.aclose()

    retry_after, took = asyncio.run(main())
    # Redis's clock advanced by at most `took` between the first request and the refusal.
    assert 30 - math.ceil(took) <= retry_after <= 30

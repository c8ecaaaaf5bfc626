"""More concurrent turns than the engine runs and queues: the rest get 429 `overloaded` with Retry-After.

Waves of simultaneous turns hit a server that runs 2 replies and queues 2. In every wave exactly 4 are
taken and all others are refused at once, nothing refused is stored, the gauges never pass the limits,
and the process neither dies nor grows: its resident memory after the last wave is within a small
margin of what it was after the first (a refused request leaves nothing behind).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx

from model.tokenizer import ChatTokenizer
from tests.support import (
    AppProcess,
    RedisServer,
    app_env,
    endless_params,
    metric,
    new_prefix,
    poll_until,
    quiet_params,
)

RUNNING, WAITING = 2, 2
CONCURRENT = 24
WAVES = 4
MAX_TOKENS = 4000
ADMIN = {"Authorization": "Bearer admin"}
# Allocator noise, lazily built caches and a grown socket backlog fit in this; a leak per refused
# request (3 x 20 of them after the first wave, each carrying a prompt and a decode state) does not.
RSS_MARGIN_BYTES = 16 * 1024 * 1024


def gauges(http: httpx.Client) -> tuple[float, float]:
    url = str(http.base_url).rstrip("/")
    return (
        metric(url, "reformer_chat_num_requests_running", ADMIN),
        metric(url, "reformer_chat_num_requests_waiting", ADMIN),
    )


async def wave(url: str, sessions: list[str], tokenizer: ChatTokenizer) -> list[httpx.Response]:
    """Send one endless turn per session at once; return the refused ones once all but the accepted are
    answered, then hang up on the accepted (their replies are cancelled)."""
    body = {"content": "Everyone at once!", **endless_params(tokenizer, MAX_TOKENS)}
    async with httpx.AsyncClient(base_url=url, timeout=None) as http:
        turns = [asyncio.create_task(http.post(f"/v1/sessions/{s}/messages", json=body)) for s in sessions]
        deadline = time.monotonic() + 120
        while sum(task.done() for task in turns) < len(turns) - RUNNING - WAITING:
            assert time.monotonic() < deadline, "the refused turns were not all answered within 120 s"
            await asyncio.sleep(0.01)
        refused = [task.result() for task in turns if task.done()]
        for task in turns:
            task.cancel()
        await asyncio.gather(*turns, return_exceptions=True)
    return refused


def test_overload_is_429_with_retry_after_and_memory_stays_bounded(
    tiny_checkpoint: Path, tokenizer: ChatTokenizer, tmp_path: Path
) -> None:
    with RedisServer(tmp_path / "redis", aof=False) as redis_server:
        env = app_env(
            tiny_checkpoint,
            redis_server.url,
            new_prefix(),
            max_new_tokens=MAX_TOKENS,
            max_running_requests=RUNNING,
            max_waiting_requests=WAITING,
            max_requests_per_key=RUNNING + WAITING,  # one client sends every wave: no fair-share cut
            admin_token="admin",
            retry_after_seconds=2,
        )
        with AppProcess(tmp_path / "app", "app", env) as app, httpx.Client(base_url=app.url) as http:
            rss = []
            for _ in range(WAVES):
                sessions = [http.post("/v1/sessions").json()["session_id"] for _ in range(CONCURRENT)]
                refused = asyncio.run(wave(app.url, sessions, tokenizer))
                assert len(refused) == CONCURRENT - RUNNING - WAITING
                for response in refused:
                    assert response.status_code == 429, response.text
                    assert response.json()["error"]["code"] == "overloaded"
                    assert response.headers["Retry-After"] == "2"
                running, waiting = gauges(http)
                assert running <= RUNNING and waiting <= WAITING
                # The hung-up replies are cancelled and stored.
                poll_until(lambda: gauges(http) == (0, 0), "the hung-up replies leaving the engine")
                stored = [len(http.get(f"/v1/sessions/{s}").json()["messages"]) for s in sessions]
                assert sorted(stored) == [0] * len(refused) + [2] * (RUNNING + WAITING)
                rss.append(app.rss())
            assert app.alive and http.get("/admin/health").status_code == 200
            assert rss[-1] - rss[0] < RSS_MARGIN_BYTES, [f"{r / 2**20:.1f} MiB" for r in rss]
            ok = http.post(f"/v1/sessions/{sessions[0]}/messages", json={"content": "hi", **quiet_params()})
            assert ok.status_code == 200, ok.text

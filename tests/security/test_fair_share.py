"""Fair share of the engine: one key's burst is that key's 429, never everyone's; a stateless prompt over
MAX_PROMPT_TOKENS is refused before any model work.

A server runs 2 replies and queues 4 (6 slots), at most 2 per key. Key A opens 6 endless streams at
once: 2 are taken, 4 get 429 `overloaded` with Retry-After; key B is then served at once.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from model.tokenizer import ChatTokenizer
from tests.support import endless_params, make_settings, require_redis, serving

KEY_A = {"Authorization": "Bearer key-a"}
KEY_B = {"Authorization": "Bearer key-b"}
PER_KEY = 2
MAX_PROMPT_TOKENS = 64


@pytest.fixture(scope="module")
def base_url(tiny_checkpoint: Path) -> Iterator[str]:
    require_redis()
    settings = make_settings(
        tiny_checkpoint,
        api_keys=["key-a", "key-b"],
        max_new_tokens=4000,
        max_running_requests=2,
        max_waiting_requests=4,
        max_requests_per_key=PER_KEY,
        max_prompt_tokens=MAX_PROMPT_TOKENS,
        rate_limit_per_minute=0,
    )
    with serving(settings) as url:
        yield url


def prefill_tokens(base_url: str) -> float:
    text = httpx.get(f"{base_url}/admin/metrics").text
    match = re.search(r"^reformer_chat_prefill_tokens_total (\S+)$", text, re.MULTILINE)
    assert match is not None
    return float(match.group(1))


def completion(model: str, content: str, **fields: object) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": content}], **fields}


def test_one_key_flooding_leaves_another_key_served(base_url: str, tokenizer: ChatTokenizer) -> None:
    model = httpx.get(f"{base_url}/v1/models", headers=KEY_A).json()["data"][0]["id"]
    endless = completion(model, "Talk forever.", stream=True, **endless_params(tokenizer, 4000))

    async def main() -> None:
        async with httpx.AsyncClient(base_url=base_url, timeout=None) as http:
            streams = [
                http.stream("POST", "/v1/chat/completions", json=endless, headers=KEY_A) for _ in range(6)
            ]
            opened = await asyncio.gather(*(s.__aenter__() for s in streams))
            try:
                statuses = sorted(r.status_code for r in opened)
                assert statuses == [200] * PER_KEY + [429] * (6 - PER_KEY), statuses
                refused = next(r for r in opened if r.status_code == 429)
                await refused.aread()
                assert refused.json()["error"]["code"] == "overloaded"
                assert int(refused.headers["Retry-After"]) >= 1
                # Key A's streams are still running; key B is served all the same.
                other = await http.post(
                    "/v1/chat/completions",
                    json=completion(model, "Hello?", temperature=0, max_tokens=4),
                    headers=KEY_B,
                )
                assert other.status_code == 200, other.text
            finally:
                for stream in streams:  # hang up: their generations are cancelled
                    await stream.__aexit__(None, None, None)

    asyncio.run(main())


def test_a_stateless_prompt_over_the_token_limit_is_refused_before_work(
    base_url: str, tokenizer: ChatTokenizer
) -> None:
    model = httpx.get(f"{base_url}/v1/models", headers=KEY_A).json()["data"][0]["id"]
    long = "word " * 75  # under MAX_MESSAGE_CHARS, over 64 tokens
    assert len(tokenizer.encode(long)) > MAX_PROMPT_TOKENS
    fed_before = prefill_tokens(base_url)
    response = httpx.post(
        f"{base_url}/v1/chat/completions", json=completion(model, long, max_tokens=4), headers=KEY_A
    )
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "context_length_exceeded" and error["param"] == "messages"
    assert str(MAX_PROMPT_TOKENS) in error["message"]
    assert prefill_tokens(base_url) == fed_before  # the engine never saw it
    short = httpx.post(
        f"{base_url}/v1/chat/completions",
        json=completion(model, "word " * 5, max_tokens=4, temperature=0),
        headers=KEY_A,
    )
    assert short.status_code == 200


def test_an_unstored_response_over_the_token_limit_is_refused_before_work(
    base_url: str, tokenizer: ChatTokenizer
) -> None:
    """The Responses API with store=false feeds everything to a fresh state, like a chat completion."""
    model = httpx.get(f"{base_url}/v1/models", headers=KEY_A).json()["data"][0]["id"]
    text = "word " * 75  # under MAX_MESSAGE_CHARS, over 64 tokens
    assert len(tokenizer.encode(text)) > MAX_PROMPT_TOKENS
    fed_before = prefill_tokens(base_url)
    response = httpx.post(
        f"{base_url}/v1/responses",
        json={"model": model, "input": text, "store": False, "max_output_tokens": 4},
        headers=KEY_A,
    )
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "context_length_exceeded"
    assert prefill_tokens(base_url) == fed_before

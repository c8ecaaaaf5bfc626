"""The official `openai` SDK (sync, async, streaming) against a live server: what existing clients see."""

from __future__ import annotations

import asyncio
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from openai import AsyncOpenAI, OpenAI

from tests.support import LiveServerFactory

KEY = "sdk-key"
MAX_TOKENS = 64
GREEDY = {"temperature": 0, "max_tokens": 12}
HELLO = [{"role": "user", "content": "Hello there!"}]


@pytest.fixture(scope="module")
def base_url(live_server: LiveServerFactory) -> Iterator[str]:
    with live_server(api_keys=[KEY, "other-key"], max_new_tokens=MAX_TOKENS) as live:
        yield live.url


@pytest.fixture(scope="module")
def client(base_url: str) -> Iterator[OpenAI]:
    # max_retries=0: the SDK retries 409/429/5xx by itself, which would hide what the server answered.
    with OpenAI(base_url=f"{base_url}/v1", api_key=KEY, max_retries=0) as sdk:
        yield sdk


@pytest.fixture(scope="module")
def model_id(client: OpenAI) -> str:
    return client.models.list().data[0].id


@pytest.fixture
def http(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {KEY}"}, timeout=None) as h:
        yield h


def metric(http: httpx.Client, series: str) -> float:
    text = http.get("/admin/metrics").text
    match = re.search(rf"^{re.escape(series)} (\S+)$", text, flags=re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def test_models_list_and_retrieve_the_loaded_checkpoint(client: OpenAI, tiny_checkpoint: Path) -> None:
    models = client.models.list().data
    assert [m.id for m in models] == [tiny_checkpoint.name]
    assert models[0].object == "model" and models[0].owned_by == "reformer-chat"
    assert client.models.retrieve(tiny_checkpoint.name).id == tiny_checkpoint.name
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_a_completion_has_the_openai_shape(client: OpenAI, model_id: str) -> None:
    completion = client.chat.completions.create(model=model_id, messages=HELLO, **GREEDY)
    assert completion.object == "chat.completion" and completion.id.startswith("chatcmpl-")
    assert completion.model == model_id
    [choice] = completion.choices
    assert choice.index == 0 and choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    usage = completion.usage
    assert usage is not None and usage.prompt_tokens > 0
    assert 0 <= usage.completion_tokens <= 12
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    # Greedy decoding on a fresh state: the same request gives the same reply.
    again = client.chat.completions.create(model=model_id, messages=HELLO, **GREEDY)
    assert again.choices[0].message.content == choice.message.content
    assert again.id != completion.id


def test_streaming_chunks_add_up_to_the_same_reply(client: OpenAI, model_id: str) -> None:
    whole = client.chat.completions.create(model=model_id, messages=HELLO, **GREEDY)
    stream = client.chat.completions.create(
        model=model_id, messages=HELLO, stream=True, stream_options={"include_usage": True}, **GREEDY
    )
    chunks = list(stream)
    assert {c.id for c in chunks} == {chunks[0].id} and {c.created for c in chunks} == {chunks[0].created}
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage == whole.usage


def test_async_client_streams_and_completes_concurrently(base_url: str, model_id: str) -> None:
    async def main() -> tuple[str, str]:
        async with AsyncOpenAI(base_url=f"{base_url}/v1", api_key=KEY, max_retries=0) as sdk:

            async def streamed() -> str:
                stream = await sdk.chat.completions.create(
                    model=model_id, messages=HELLO, stream=True, **GREEDY
                )
                return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

            async def whole() -> str:
                completion = await sdk.chat.completions.create(model=model_id, messages=HELLO, **GREEDY)
                return completion.choices[0].message.content or ""

            return await asyncio.gather(streamed(), whole())

    streamed_text, whole_text = asyncio.run(main())
    assert streamed_text == whole_text


def test_seeded_sampling_is_reproducible(client: OpenAI, model_id: str) -> None:
    def reply(seed: int) -> str | None:
        params = {"temperature": 1.0, "top_p": 0.9, "seed": seed, "max_completion_tokens": 16}
        return (
            client.chat.completions.create(model=model_id, messages=HELLO, **params)
            .choices[0]
            .message.content
        )

    assert reply(7) == reply(7)


def test_a_stop_string_ends_the_reply_before_it(client: OpenAI, model_id: str) -> None:
    full = client.chat.completions.create(model=model_id, messages=HELLO, **GREEDY).choices[0].message.content
    assert full and len(full) >= 2
    stop = full[1:3] if len(full) >= 3 else full[1]
    cut = client.chat.completions.create(model=model_id, messages=HELLO, stop=[stop], **GREEDY).choices[0]
    assert cut.finish_reason == "stop"
    assert cut.message.content == full[: full.index(stop)]


def test_system_and_history_messages_change_the_prompt(client: OpenAI, model_id: str) -> None:
    plain = client.chat.completions.create(model=model_id, messages=HELLO, **GREEDY)
    with_history = client.chat.completions.create(
        model=model_id,
        messages=[
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Hi"},
            {"role": "assistant", "content": "Hello."},
            *HELLO,
        ],
        **GREEDY,
    )
    assert plain.usage is not None and with_history.usage is not None
    assert with_history.usage.prompt_tokens > plain.usage.prompt_tokens


def test_session_mode_stores_turns_and_reuses_the_cached_state(
    client: OpenAI, model_id: str, http: httpx.Client
) -> None:
    session_id = http.post("/v1/sessions").json()["session_id"]
    headers = {"X-Session-Id": session_id}
    first = client.chat.completions.create(model=model_id, messages=HELLO, extra_headers=headers, **GREEDY)
    # The first turn of a session is the same prompt as a stateless request with that one message.
    stateless = client.chat.completions.create(model=model_id, messages=HELLO, **GREEDY)
    assert first.choices[0].message.content == stateless.choices[0].message.content
    hits = metric(http, "reformer_chat_state_cache_hits_total")
    prefill = metric(http, "reformer_chat_prefill_tokens_total")
    # Only the new user message is sent: the server holds the rest.
    second = client.chat.completions.with_raw_response.create(
        model=model_id, messages=[{"role": "user", "content": "And then?"}], extra_headers=headers, **GREEDY
    )
    assert second.headers["x-session-id"] == session_id
    usage = second.parse().usage
    assert usage is not None
    assert metric(http, "reformer_chat_state_cache_hits_total") == hits + 1
    # The cached state was reused: the new turn was fed, plus at most the two stored tokens the state had
    # not seen (the reply's last token when it ran to max_tokens, and end-of-turn), never the history.
    fed = metric(http, "reformer_chat_prefill_tokens_total") - prefill
    assert usage.prompt_tokens <= fed <= usage.prompt_tokens + 2
    messages = http.get(f"/v1/sessions/{session_id}").json()["messages"]
    assert [(m["role"], m["content"]) for m in messages] == [
        ("user", "Hello there!"),
        ("assistant", first.choices[0].message.content),
        ("user", "And then?"),
        ("assistant", second.parse().choices[0].message.content),
    ]


def test_session_mode_streams_and_stores_the_streamed_text(
    client: OpenAI, model_id: str, http: httpx.Client
) -> None:
    session_id = http.post("/v1/sessions").json()["session_id"]
    stream = client.chat.completions.create(
        model=model_id, messages=HELLO, stream=True, extra_headers={"X-Session-Id": session_id}, **GREEDY
    )
    text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    messages = http.get(f"/v1/sessions/{session_id}").json()["messages"]
    assert messages[-1]["content"] == text and messages[-1]["role"] == "assistant"


def test_session_mode_refusals(client: OpenAI, model_id: str, http: httpx.Client, base_url: str) -> None:
    session_id = http.post("/v1/sessions").json()["session_id"]
    ends_with_assistant = [*HELLO, {"role": "assistant", "content": "Hi."}]
    with pytest.raises(openai.BadRequestError) as bad:
        client.chat.completions.create(
            model=model_id, messages=ends_with_assistant, extra_headers={"X-Session-Id": session_id}
        )
    assert bad.value.param == "messages"  # type: ignore[attr-defined]
    # Another key's session looks like no session at all.
    with (
        OpenAI(base_url=f"{base_url}/v1", api_key="other-key", max_retries=0) as other,
        pytest.raises(openai.NotFoundError) as missing,
    ):
        other.chat.completions.create(
            model=model_id, messages=HELLO, extra_headers={"X-Session-Id": session_id}
        )
    assert missing.value.code == "session_not_found"
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model=model_id, messages=HELLO, extra_headers={"X-Session-Id": "no"})
    assert http.get(f"/v1/sessions/{session_id}").json()["messages"] == []


def test_sdk_errors_carry_openai_fields(client: OpenAI, model_id: str, base_url: str) -> None:
    with (
        OpenAI(base_url=f"{base_url}/v1", api_key="wrong", max_retries=0) as wrong,
        pytest.raises(openai.AuthenticationError) as unauthorized,
    ):
        wrong.models.list()
    assert unauthorized.value.code == "invalid_api_key"
    with pytest.raises(openai.BadRequestError) as many:
        client.chat.completions.create(model=model_id, messages=HELLO, n=2)
    assert many.value.param == "n" and "n=2" in many.value.message  # type: ignore[attr-defined]
    with pytest.raises(openai.BadRequestError) as long:
        client.chat.completions.create(model=model_id, messages=HELLO, max_tokens=MAX_TOKENS + 1)
    assert long.value.param == "max_tokens" and "MAX_NEW_TOKENS" in long.value.message  # type: ignore[attr-defined]
    with pytest.raises(openai.BadRequestError) as tools:
        client.chat.completions.create(
            model=model_id,
            messages=HELLO,
            tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}],
        )
    assert tools.value.param == "tools"  # type: ignore[attr-defined]
    with pytest.raises(openai.BadRequestError) as penalty:
        client.chat.completions.create(model=model_id, messages=HELLO, frequency_penalty=0.5)
    assert "repetition_penalty" in penalty.value.message
    with pytest.raises(openai.NotFoundError) as unknown:
        client.chat.completions.create(model="gpt-4o", messages=HELLO)
    assert unknown.value.code == "model_not_found"
    # Off values of unsupported settings, and our own knobs through extra_body, are fine.
    ok = client.chat.completions.create(
        model=model_id,
        messages=HELLO,
        frequency_penalty=0,
        n=1,
        user="someone",
        extra_body={"top_k": 5, "repetition_penalty": 1.2},
        **GREEDY,
    )
    assert ok.choices[0].finish_reason in ("stop", "length")

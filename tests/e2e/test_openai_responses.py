"""OpenAI's Responses API through the official `openai` SDK, unchanged, against a live server: turns on
conversations and response chains, streamed events in OpenAI's order, stored responses, and errors."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from openai import OpenAI

from tests.support import make_settings, require_redis, serving

KEY, OTHER = "resp-key", "other-resp-key"
GREEDY = {"temperature": 0, "max_output_tokens": 10}


@pytest.fixture(scope="module")
def base_url(tiny_checkpoint: Path) -> Iterator[str]:
    require_redis()
    with serving(make_settings(tiny_checkpoint, api_keys=[KEY, OTHER])) as url:
        yield url


@pytest.fixture(scope="module")
def client(base_url: str) -> Iterator[OpenAI]:
    with OpenAI(base_url=f"{base_url}/v1", api_key=KEY, max_retries=0) as sdk:
        yield sdk


@pytest.fixture(scope="module")
def other(base_url: str) -> Iterator[OpenAI]:
    with OpenAI(base_url=f"{base_url}/v1", api_key=OTHER, max_retries=0) as sdk:
        yield sdk


@pytest.fixture(scope="module")
def model(client: OpenAI) -> str:
    return client.models.list().data[0].id


def test_a_response_on_a_conversation_is_stored_as_its_items(client: OpenAI, model: str) -> None:
    conv = client.conversations.create(items=[{"role": "user", "content": "Hello there"}])
    first = client.responses.create(model=model, conversation=conv.id, input="How are you?", **GREEDY)
    assert first.object == "response" and first.status in ("completed", "incomplete")
    assert first.conversation is not None and first.conversation.id == conv.id
    [message] = first.output
    assert message.type == "message" and message.role == "assistant"
    usage = first.usage
    assert usage is not None and usage.output_tokens > 0
    assert usage.total_tokens == usage.input_tokens + usage.output_tokens
    items = client.conversations.items.list(conv.id, order="asc").data
    assert [(i.role, i.content[0].text) for i in items] == [
        ("user", "Hello there"),
        ("user", "How are you?"),
        ("assistant", first.output_text),
    ]
    assert items[-1].id == message.id
    # The next turn starts from the cached decode state: the context so far is cached (all but the last
    # reply token and end-of-turn, which the state never fed), not re-fed.
    second = client.responses.create(model=model, conversation=conv.id, input="And then?", **GREEDY)
    assert second.usage is not None
    assert second.usage.input_tokens_details.cached_tokens >= usage.total_tokens - 1
    assert client.responses.retrieve(second.id).output_text == second.output_text


def test_previous_response_id_continues_and_branches(client: OpenAI, model: str) -> None:
    first = client.responses.create(model=model, input="Tell me a story", instructions="Be kind.", **GREEDY)
    second = client.responses.create(model=model, previous_response_id=first.id, input="More", **GREEDY)
    assert second.previous_response_id == first.id and second.id != first.id
    assert second.usage is not None and second.usage.input_tokens_details.cached_tokens > 0
    # Branching from the first response again: the same context, so the same greedy reply as `second`,
    # and a history that does not contain `second`'s turn.
    branch = client.responses.create(model=model, previous_response_id=first.id, input="More", **GREEDY)
    assert branch.id != second.id and branch.output_text == second.output_text
    # store=false: answered from the same context, nothing stored.
    dry = client.responses.create(
        model=model, previous_response_id=first.id, input="More", store=False, **GREEDY
    )
    assert dry.output_text == second.output_text
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(dry.id)
    assert client.responses.retrieve(first.id).output_text == first.output_text
    client.responses.delete(first.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(first.id)


def test_streamed_events_come_in_order_and_join_to_the_stored_reply(client: OpenAI, model: str) -> None:
    conv = client.conversations.create()
    stream = client.responses.create(model=model, conversation=conv.id, input="Hi!", stream=True, **GREEDY)
    events = list(stream)
    kinds = [e.type for e in events]
    deltas = kinds.count("response.output_text.delta")
    final = "response.completed" if kinds[-1] == "response.completed" else "response.incomplete"
    assert kinds == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * deltas,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        final,
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    done = events[-1].response  # type: ignore[union-attr]
    assert done.output_text == text == events[-4].text  # type: ignore[union-attr]
    assert done.usage is not None and done.usage.output_tokens > 0
    assert events[2].item.id == done.output[0].id  # type: ignore[union-attr]
    stored = client.conversations.items.list(conv.id).data[0]
    assert stored.role == "assistant" and stored.content[0].text == text and stored.id == done.output[0].id
    assert client.responses.retrieve(done.id).output_text == text


def test_errors_are_parsed_by_the_sdk(client: OpenAI, other: OpenAI, model: str) -> None:
    conv = client.conversations.create()
    mine = client.responses.create(model=model, input="Hi", **GREEDY)
    with pytest.raises(openai.NotFoundError):
        other.responses.create(model=model, conversation=conv.id, input="Hi", **GREEDY)
    with pytest.raises(openai.NotFoundError) as error:
        other.responses.create(model=model, previous_response_id=mine.id, input="Hi", **GREEDY)
    assert error.value.param == "previous_response_id"  # type: ignore[attr-defined]
    with pytest.raises(openai.NotFoundError):
        other.responses.retrieve(mine.id)
    unsupported = [
        ({"tools": [{"type": "function", "name": "f", "parameters": {}}]}, "tools"),
        ({"reasoning": {"effort": "low"}}, "reasoning"),
        ({"background": True}, "background"),
        (
            {"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x"}]}]},
            "input[0].content[0]",
        ),
        ({"max_output_tokens": 100_000}, "max_output_tokens"),
        ({"conversation": conv.id, "store": False}, "store"),
    ]
    for extra, param in unsupported:
        kwargs = {"model": model, "input": "Hi", **extra}
        with pytest.raises(openai.BadRequestError) as bad:
            client.responses.create(**kwargs)  # type: ignore[call-overload]
        assert bad.value.param == param, extra  # type: ignore[attr-defined]
    assert client.conversations.items.list(conv.id).data == []

"""OpenAI's Conversations API through the official `openai` SDK, unchanged, against a live server: the
conversations are our sessions (same records, same owners), as REST sees them."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import openai
import pytest
from openai import OpenAI

from tests.support import make_settings, require_redis, serving

KEY, OTHER = "conv-key", "other-conv-key"


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


def texts(items: list) -> list[tuple[str, str]]:
    return [(item.role, item.content[0].text) for item in items]


def test_create_retrieve_update_delete(client: OpenAI, base_url: str) -> None:
    conv = client.conversations.create(
        items=[
            {"type": "message", "role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "input_text", "text": "Hi there"}]},
        ],
        metadata={"topic": "greetings"},
    )
    assert conv.id.startswith("conv_") and conv.object == "conversation"
    assert conv.metadata == {"topic": "greetings"} and conv.created_at > 1_700_000_000
    got = client.conversations.retrieve(conv.id)
    assert (got.id, got.created_at, got.metadata) == (conv.id, conv.created_at, conv.metadata)
    updated = client.conversations.update(conv.id, metadata={"topic": "tests", "n": "2"})
    assert updated.metadata == {"topic": "tests", "n": "2"}
    assert client.conversations.retrieve(conv.id).metadata == {"topic": "tests", "n": "2"}
    items = client.conversations.items.list(conv.id, order="asc").data
    assert texts(items) == [("system", "Be brief."), ("user", "Hi there")]
    assert items[0].type == "message" and items[0].id.startswith("msg_") and items[0].status == "completed"
    # The same conversation is a session on our REST surface, with its token ids stored.
    session_id = conv.id.removeprefix("conv_")
    with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {KEY}"}) as http:
        session = http.get(f"/v1/sessions/{session_id}").json()
    assert [(m["role"], m["content"]) for m in session["messages"]] == texts(items)
    assert session["context_tokens"] > 0
    deleted = client.conversations.delete(conv.id)
    assert (deleted.id, deleted.deleted, deleted.object) == (conv.id, True, "conversation.deleted")
    with pytest.raises(openai.NotFoundError):
        client.conversations.retrieve(conv.id)


def test_items_page_across_several_pages_each_once(client: OpenAI) -> None:
    conv = client.conversations.create()
    sent = [f"message {i}" for i in range(23)]
    for start in range(0, len(sent), 10):
        created = client.conversations.items.create(
            conv.id, items=[{"role": "user", "content": t} for t in sent[start : start + 10]]
        )
        assert [i.content[0].text for i in created.data] == sent[start : start + 10]
    first = client.conversations.items.list(conv.id, limit=5, order="asc")
    assert first.has_more and first.first_id == first.data[0].id and first.last_id == first.data[-1].id
    # The SDK's auto-pagination follows after=last_id while has_more: every item exactly once, in order.
    walked = [item.content[0].text for item in client.conversations.items.list(conv.id, limit=5, order="asc")]
    assert walked == sent
    newest_first = [i.content[0].text for i in client.conversations.items.list(conv.id, limit=4)]
    assert newest_first == sent[::-1]
    last_page = client.conversations.items.list(conv.id, limit=5, order="asc", after=first.data[-1].id)
    assert last_page.data[0].content[0].text == sent[5]


def test_items_retrieve_and_delete(client: OpenAI) -> None:
    conv = client.conversations.create(
        items=[{"role": "user", "content": t} for t in ("one", "two", "three")]
    )
    items = client.conversations.items.list(conv.id, order="asc").data
    middle = client.conversations.items.retrieve(items[1].id, conversation_id=conv.id)
    assert middle.id == items[1].id and middle.content[0].text == "two"
    after_delete = client.conversations.items.delete(items[1].id, conversation_id=conv.id)
    assert after_delete.id == conv.id
    remaining = client.conversations.items.list(conv.id, order="asc").data
    assert [(i.id, i.content[0].text) for i in remaining] == [(items[0].id, "one"), (items[2].id, "three")]
    with pytest.raises(openai.NotFoundError):
        client.conversations.items.retrieve(items[1].id, conversation_id=conv.id)
    with pytest.raises(openai.NotFoundError):
        client.conversations.items.delete(items[1].id, conversation_id=conv.id)


def test_another_keys_conversation_is_not_found(client: OpenAI, other: OpenAI) -> None:
    conv = client.conversations.create(items=[{"role": "user", "content": "mine"}])
    item = client.conversations.items.list(conv.id).data[0]
    calls = [
        lambda: other.conversations.retrieve(conv.id),
        lambda: other.conversations.update(conv.id, metadata={"x": "y"}),
        lambda: other.conversations.delete(conv.id),
        lambda: other.conversations.items.list(conv.id),
        lambda: other.conversations.items.create(conv.id, items=[{"role": "user", "content": "theirs"}]),
        lambda: other.conversations.items.retrieve(item.id, conversation_id=conv.id),
        lambda: other.conversations.items.delete(item.id, conversation_id=conv.id),
    ]
    for call in calls:
        with pytest.raises(openai.NotFoundError) as error:
            call()
        assert error.value.body["type"] == "invalid_request_error"  # type: ignore[index]
    # Nothing the other key tried changed anything.
    assert client.conversations.retrieve(conv.id).metadata == {}
    assert texts(client.conversations.items.list(conv.id).data) == [("user", "mine")]


def test_unsupported_items_are_a_400_naming_them(client: OpenAI) -> None:
    conv = client.conversations.create()
    bad = [
        ([{"type": "function_call_output", "call_id": "c", "output": "x"}], "items[0].type"),
        (
            [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}],
            "items[0].content[0]",
        ),
        ([{"role": "user", "content": "ok"}, {"role": "tool", "content": "x"}], "items[1].role"),
    ]
    for items, param in bad:
        with pytest.raises(openai.BadRequestError) as error:
            client.conversations.items.create(conv.id, items=items)  # type: ignore[arg-type]
        assert error.value.param == param  # type: ignore[attr-defined]
    with pytest.raises(openai.BadRequestError) as error:
        client.conversations.create(metadata={"k": "v" * 600})
    assert error.value.param == "metadata"  # type: ignore[attr-defined]
    assert client.conversations.items.list(conv.id).data == []

"""Rewind: after deleting items, regenerating or editing the last message, the next greedy reply is the
one a fresh conversation fed only the remaining history gives: the decode state never remembers removed
text, on the replica that cut it or on another one that had the conversation's state cached."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.config import Settings
from model.tokenizer import ChatTokenizer
from tests.support import endless_params, make_settings, require_redis, running_server, serving

KEY = {"Authorization": "Bearer rewind-key"}


@pytest.fixture(scope="module")
def settings(tiny_checkpoint: Path) -> Settings:
    require_redis()
    return make_settings(tiny_checkpoint, api_keys=["rewind-key"], max_new_tokens=64)


@pytest.fixture(scope="module")
def base_url(settings: Settings) -> Iterator[str]:
    with serving(settings) as url:
        yield url


@pytest.fixture(scope="module")
def replica(settings: Settings) -> Iterator[str]:
    """A second server on the same Redis and key prefix: another replica of the same deployment."""
    with running_server(settings) as url:
        yield url


@pytest.fixture
def http(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, headers=KEY, timeout=None) as client:
        yield client


@pytest.fixture(scope="module")
def params(tokenizer: ChatTokenizer) -> dict[str, Any]:
    """Greedy replies of 12 tokens (no early end-of-turn): long enough to carry their context's mark."""
    return endless_params(tokenizer, 12)


def new_session(http: httpx.Client) -> str:
    return http.post("/v1/sessions").json()["session_id"]


def say(http: httpx.Client, sid: str, content: str, params: dict[str, Any], route: str = "messages") -> str:
    response = http.post(f"/v1/sessions/{sid}/{route}", json={"content": content, **params})
    assert response.status_code == 200, response.text
    return response.json()["message"]["content"]


def fresh(http: httpx.Client, contents: list[str], params: dict[str, Any]) -> list[str]:
    sid = new_session(http)
    return [say(http, sid, c, params) for c in contents]


def history(http: httpx.Client, sid: str) -> list[tuple[str, str]]:
    return [(m["role"], m["content"]) for m in http.get(f"/v1/sessions/{sid}").json()["messages"]]


def test_regenerate_answers_as_if_the_old_reply_was_never_there(http: httpx.Client, params: dict) -> None:
    sid = new_session(http)
    first = say(http, sid, "Hello there", params)
    second = say(http, sid, "What do you like?", params)
    response = http.post(f"/v1/sessions/{sid}/regenerate", json=params)
    assert response.status_code == 200, response.text
    again = response.json()["message"]["content"]
    assert again == second == fresh(http, ["Hello there", "What do you like?"], params)[1]
    assert history(http, sid) == [
        ("user", "Hello there"),
        ("assistant", first),
        ("user", "What do you like?"),
        ("assistant", again),
    ]
    # The next turn equals a fresh conversation's too (the regenerated state is consistent).
    assert (
        say(http, sid, "Why?", params) == fresh(http, ["Hello there", "What do you like?", "Why?"], params)[2]
    )


def test_edit_last_answers_from_the_edited_history(http: httpx.Client, params: dict) -> None:
    sid = new_session(http)
    first = say(http, sid, "Hello there", params)
    say(http, sid, "Tell me about cats", params)
    edited = say(http, sid, "Tell me about the weather today", params, route="edit")
    expected = fresh(http, ["Hello there", "Tell me about the weather today", "Go on"], params)
    assert edited == expected[1]
    assert history(http, sid) == [
        ("user", "Hello there"),
        ("assistant", first),
        ("user", "Tell me about the weather today"),
        ("assistant", edited),
    ]
    assert say(http, sid, "Go on", params) == expected[2]


def test_deleting_items_forgets_them(http: httpx.Client, base_url: str, params: dict) -> None:
    sid = new_session(http)
    say(http, sid, "Hello there", params)
    say(http, sid, "Tell me about cats", params)
    items = http.get(f"/v1/conversations/conv_{sid}/items").json()["data"]  # newest first
    for item in items[:2]:
        assert http.delete(f"/v1/conversations/conv_{sid}/items/{item['id']}").status_code == 200
    expected = fresh(http, ["Hello there", "Tell me about the weather today"], params)[1]
    assert say(http, sid, "Tell me about the weather today", params) == expected


def test_another_replicas_cached_state_is_not_reused_after_a_cut(
    http: httpx.Client, replica: str, params: dict
) -> None:
    sid = new_session(http)
    say(http, sid, "Hello there", params)
    say(http, sid, "Cats", params)  # this server now caches the state that saw "Cats" and its reply
    with httpx.Client(base_url=replica, headers=KEY, timeout=None) as other:
        # The other replica cuts "Cats" and its reply and adds a longer turn: the stored history is now
        # longer than the state cached here, which saw the removed text.
        say(other, sid, "Tell me all about the weather today", params, route="edit")
    expected = fresh(http, ["Hello there", "Tell me all about the weather today", "Go on"], params)[2]
    assert say(http, sid, "Go on", params) == expected


def test_regenerate_without_a_reply_is_refused_and_changes_nothing(http: httpx.Client, params: dict) -> None:
    sid = new_session(http)
    response = http.post(f"/v1/sessions/{sid}/regenerate", json=params)
    assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_request"
    assert http.post(f"/v1/sessions/{sid}/edit", json={"content": "x", **params}).status_code == 422
    assert history(http, sid) == []

"""What the model remembers is what the user was shown: the stored token ids of a reply decode to exactly
its stored text, when a stop string cuts it inside a token too; the next turn is the same from the warm
decode state as from one rebuilt out of the stored ids; and tokens that carry no text (padding, unknown)
are never generated, however a request biases them.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import redis

from app.config import Settings
from model.tokenizer import ChatTokenizer
from tests.support import TEST_REDIS_URL, make_settings, require_redis, serving

GREEDY = {"temperature": 0, "max_tokens": 24}
PROMPT = "Tell me about the weather today."


@pytest.fixture(scope="module")
def settings(tiny_checkpoint: Path) -> Settings:
    require_redis()
    return make_settings(tiny_checkpoint, rate_limit_per_minute=0)


@pytest.fixture(scope="module")
def servers(settings: Settings) -> Iterator[tuple[str, str]]:
    """Two servers on one key prefix: the second has never seen a session, so it rebuilds its state."""
    with serving(settings) as warm, serving(settings) as cold:
        yield warm, cold


def stored_ids(settings: Settings, session_id: str) -> list[int]:
    client = redis.Redis.from_url(TEST_REDIS_URL)
    try:
        data = client.get(f"{settings.redis_key_prefix}chat:{{{session_id}}}:ids") or b""
    finally:
        client.close()
    return np.frombuffer(data, dtype="<u4").tolist()


def last_reply_ids(ids: list[int], tokenizer: ChatTokenizer) -> list[int]:
    """The ids between the last assistant prefix and the end-of-turn that closes it."""
    start = len(ids) - 1 - ids[::-1].index(tokenizer.assistant_id)
    assert ids[-1] == tokenizer.end_id
    return ids[start + 1 : -1]


def turn(url: str, session_id: str, **fields: object) -> str:
    response = httpx.post(
        f"{url}/v1/sessions/{session_id}/messages", json={"content": PROMPT, **GREEDY, **fields}, timeout=None
    )
    assert response.status_code == 200, response.text
    return response.json()["message"]["content"]


def new_session(url: str) -> str:
    return httpx.post(f"{url}/v1/sessions").json()["session_id"]


def boundary_stop(ids: list[int], tokenizer: ChatTokenizer) -> str:
    """A two-character stop string made of one generated token's last character and the next token's
    first, occurring nowhere earlier: the reply is cut inside a token, and the decode state has already
    seen that whole token (it has seen all but the one that completed the stop string)."""
    text = ""
    for k in range(len(ids) - 1):
        piece, following = tokenizer.decode([ids[k]]), tokenizer.decode([ids[k + 1]])
        if len(piece) >= 2 and following and piece.isascii() and following.isascii():
            stop = piece[-1] + following[0]
            if stop not in text + piece:
                return stop
        text += piece
    pytest.skip("the tiny model's greedy reply has no token boundary to cut at")


def test_stop_strings_store_the_ids_of_the_text_shown_and_warm_equals_rebuilt(
    servers: tuple[str, str], settings: Settings, tokenizer: ChatTokenizer
) -> None:
    warm, cold = servers
    probe = new_session(warm)
    turn(warm, probe)
    stop = boundary_stop(last_reply_ids(stored_ids(settings, probe), tokenizer), tokenizer)

    first, second = new_session(warm), new_session(warm)
    shown = turn(warm, first, stop=[stop])
    assert turn(warm, second, stop=[stop]) == shown
    reply_ids = last_reply_ids(stored_ids(settings, first), tokenizer)
    assert tokenizer.decode(reply_ids) == shown  # the model remembers exactly what the user saw
    assert stop not in tokenizer.decode(stored_ids(settings, first))

    # The next turn: from the warm state on one server, from a state rebuilt from the ids on the other.
    assert turn(warm, first) == turn(cold, second)
    assert stored_ids(settings, first) == stored_ids(settings, second)


def test_tokens_without_text_are_never_generated(
    servers: tuple[str, str], settings: Settings, tokenizer: ChatTokenizer
) -> None:
    warm, _ = servers
    session_id = new_session(warm)
    bias = {str(tokenizer.pad_id): 100, str(tokenizer.unk_id): 100}
    turn(warm, session_id, logit_bias=bias)
    reply_ids = last_reply_ids(stored_ids(settings, session_id), tokenizer)
    assert reply_ids, "the reply is empty"
    assert not set(reply_ids) & tokenizer.special_ids

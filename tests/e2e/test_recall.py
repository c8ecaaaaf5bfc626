"""The shipped model remembers what it was told: a fact stated in the first message, several turns of
chat, then the question, all through the real service (uvicorn, Redis, the engine's cached decode states);
the greedy reply must contain the value.

The recall has to come from the model attending over the conversation it was fed, so a second test asks the
same question in a conversation where the fact was never stated: the value must not come back there (a model
that answers "Nora" to every name question would otherwise pass).

Values come from the eval side of model/train/facts.py (never in training), phrased with train-side templates.
A checkpoint trained without memory episodes (training.json: options.fact_rate absent or 0) is skipped with
that reason: it was never taught to recall. The checkpoint shipped with issue 18's first memory training was
taught and does not recall yet (docs/MODEL.md: 0 % of facts at every gap in bench/recall.py); the recall test
is a strict expected failure for it, named by its weights' digest, so it fails the day that checkpoint is
replaced by one that recalls (or this one starts to), and the marker must go.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import httpx
import pytest

from app.config import SHIPPED_MODEL_DIR
from model.checkpoint import read_training_info
from model.train.facts import reply_has_value, side_of
from tests import support

# (statement, question, value, kind): train-side phrasings, eval-side values.
CASES = [
    ("My name is {v}.", "What is my name?", "Nora", "names"),
    ("I have a dog called {v}.", "What's my dog called?", "Biscuit", "pets"),
    ("I live in {v}.", "Where do I live?", "Dublin", "cities"),
]
SMALL_TALK = [
    "hey! how is your week going?",
    "what are you doing this weekend?",
    "do you like music? i listen to a lot of jazz",
    "i have an exam tomorrow and i'm a bit nervous",
]
REPLY = {"temperature": 0, "max_tokens": 24}
# SHA-256 of model.safetensors of memory-trained checkpoints measured not to recall (docs/MODEL.md).
NOT_RECALLING = {
    "b45fcf6efd869dead66704006083a692536c3cfd8fc6cbfaa5b5f50effadceea": (
        "issue 18's first memory training: 0 % of facts at every gap in bench/recall.py"
    ),
}


def _known_not_to_recall() -> str | None:
    digest = hashlib.sha256((SHIPPED_MODEL_DIR / "model.safetensors").read_bytes()).hexdigest()
    return NOT_RECALLING.get(digest)


def _memory_trained() -> tuple[bool, str]:
    info = read_training_info(SHIPPED_MODEL_DIR) or {}
    rate = (info.get("options") or {}).get("fact_rate") or 0.0
    return rate > 0, f"training.json options.fact_rate = {rate}"


@pytest.fixture(scope="module")
def client() -> Iterator[httpx.Client]:
    trained, why = _memory_trained()
    if not trained:
        pytest.skip(
            f"the shipped checkpoint was trained without memory episodes ({why}): recall is not trained in; "
            "scripts/train_shipped.sh trains one that is"
        )
    with (
        support.live_server(SHIPPED_MODEL_DIR, max_new_tokens=64, max_message_chars=400) as live,
        httpx.Client(base_url=live.url, timeout=None) as http,
    ):
        yield http


def _chat(client: httpx.Client, messages: list[str]) -> str:
    """Send each message in one session; return the last greedy reply."""
    session_id = client.post("/v1/sessions").json()["session_id"]
    reply = ""
    for content in messages:
        response = client.post(f"/v1/sessions/{session_id}/messages", json={"content": content, **REPLY})
        assert response.status_code == 200, response.text
        reply = response.json()["message"]["content"]
    return reply


@pytest.mark.parametrize(("statement", "question", "value", "kind"), CASES, ids=[c[3] for c in CASES])
def test_a_fact_stated_turns_ago_is_recalled(
    client: httpx.Client,
    request: pytest.FixtureRequest,
    statement: str,
    question: str,
    value: str,
    kind: str,
) -> None:
    assert side_of(value) == "eval", "the value must be one training never saw"
    known = _known_not_to_recall()
    if known is not None:  # strict: passing for this checkpoint fails the test, so the entry must go
        request.applymarker(pytest.mark.xfail(reason=f"known not to recall: {known}", strict=True))
    opening = f"{statement.format(v=value)}\n{SMALL_TALK[0]}"
    recalled = _chat(client, [opening, *SMALL_TALK[1:], question])
    assert reply_has_value(recalled, value), f"asked {question!r} after stating {value!r}, got {recalled!r}"


@pytest.mark.parametrize(("statement", "question", "value", "kind"), CASES, ids=[c[3] for c in CASES])
def test_a_value_never_stated_does_not_come_back(
    client: httpx.Client, statement: str, question: str, value: str, kind: str
) -> None:
    never_told = _chat(client, [*SMALL_TALK, question])
    assert not reply_has_value(never_told, value), f"{value!r} came back without being stated: {never_told!r}"

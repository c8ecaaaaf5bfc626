"""Warm cache, rebuilt state and a replica hand-off give the same greedy replies.

Two servers share one Redis prefix, like two replicas behind a load balancer: one keeps decode states
(a turn feeds only its new tokens), the other has no cache at all (every turn rebuilds the state from the
stored token ids). The same conversation must get the same temperature-0 replies on both, and a
conversation that hops between them mid-way must too.
"""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import pytest

from tests.support import LiveServerFactory, metric, new_prefix, quiet_params

TURNS = ("Hi there!", "What do you do for fun?", "That sounds nice. Anything else?", "Ok, bye!")
ADMIN = {"Authorization": "Bearer admin"}


@pytest.fixture(scope="module")
def replicas(live_server: LiveServerFactory) -> Iterator[tuple[str, str]]:
    """(URL of the caching replica, URL of the cacheless replica), sharing one key prefix."""
    common = {"redis_key_prefix": new_prefix(), "admin_token": "admin", "prefill_chunk_tokens": 7}
    with live_server(**common) as warm, live_server(state_cache_bytes=0, **common) as cold:
        yield warm.url, cold.url


def converse(urls: list[str]) -> list[str]:
    """Run TURNS greedily, turn i on urls[i]; return the replies."""
    session_id = httpx.post(f"{urls[0]}/v1/sessions").json()["session_id"]
    replies = []
    for url, content in zip(urls, TURNS, strict=True):
        body = {"content": content, **quiet_params(max_tokens=10)}
        response = httpx.post(f"{url}/v1/sessions/{session_id}/messages", json=body, timeout=None)
        assert response.status_code == 200, response.text
        replies.append(response.json()["message"]["content"])
    return replies


def counter(url: str, name: str) -> float:
    return metric(url, name, ADMIN)


def test_warm_rebuilt_and_handed_off_conversations_agree(replicas: tuple[str, str]) -> None:
    warm, cold = replicas
    hits_before = counter(warm, "reformer_chat_state_cache_hits_total")
    all_warm = converse([warm] * len(TURNS))
    assert counter(warm, "reformer_chat_state_cache_hits_total") - hits_before == len(TURNS) - 1

    rebuilt_before = counter(cold, "reformer_chat_prefill_tokens_total")
    all_cold = converse([cold] * len(TURNS))
    assert counter(cold, "reformer_chat_state_cache_hits_total") == 0
    # Without a cache every turn re-feeds the whole conversation, so far more than the new prompts.
    assert counter(cold, "reformer_chat_prefill_tokens_total") - rebuilt_before > counter(
        cold, "reformer_chat_prompt_tokens_total"
    )

    # warm -> cold -> warm -> cold: the caching replica's state is behind the store when the
    # conversation comes back to it, and it must feed exactly the turns it missed.
    handed_off = converse([warm, cold, warm, cold])

    assert all(all_warm), "empty replies would make the comparison vacuous"
    assert all_warm == all_cold == handed_off

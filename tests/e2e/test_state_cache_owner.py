"""The state cache is keyed by (owner, session): deleting a session drops its cached decode state, and
only its own; another owner's states stay and keep serving their turns.

A cache keyed by the session alone would still answer the owner's turns, so behaviour at the routes
hardly shows it; what shows it is the cache itself, through its gauges, when the owner deletes the
session (the delete discards the (owner, session) entry: under any other key the state would stay).
"""

from __future__ import annotations

import httpx

from tests.support import LiveServerFactory, metric, quiet_params

ALPHA = {"Authorization": "Bearer alpha-key"}
BRAVO = {"Authorization": "Bearer bravo-key"}
ENTRIES = "reformer_chat_state_cache_entries"
BYTES = "reformer_chat_state_cache_bytes"
HITS = "reformer_chat_state_cache_hits_total"


def test_deleting_a_session_drops_its_cached_state_and_only_its_own(live_server: LiveServerFactory) -> None:
    with (
        live_server(api_keys=["alpha-key", "bravo-key"]) as live,
        httpx.Client(base_url=live.url, timeout=None) as http,
    ):
        sessions = {}
        for who in (ALPHA, BRAVO):
            session_id = http.post("/v1/sessions", headers=who).json()["session_id"]
            turn = http.post(
                f"/v1/sessions/{session_id}/messages", json={"content": "hi", **quiet_params()}, headers=who
            )
            assert turn.status_code == 200, turn.text
            sessions[who["Authorization"]] = session_id
        assert metric(live.url, ENTRIES) == 2
        both = metric(live.url, BYTES)

        alpha, bravo = sessions[ALPHA["Authorization"]], sessions[BRAVO["Authorization"]]
        assert http.delete(f"/v1/sessions/{alpha}", headers=ALPHA).status_code == 204
        assert metric(live.url, ENTRIES) == 1
        assert metric(live.url, BYTES) == both / 2  # the two states are the same size

        hits = metric(live.url, HITS)
        again = http.post(f"/v1/sessions/{bravo}/messages", json={"content": "still here?", **quiet_params()},
                          headers=BRAVO)  # fmt: skip
        assert again.status_code == 200, again.text
        assert metric(live.url, HITS) == hits + 1  # bravo's state was kept and used

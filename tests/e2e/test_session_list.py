"""REST listing, paging and export end to end: GET /v1/sessions lists exactly the key's live conversations
(newest first, each once across pages), GET /v1/sessions/{id}/messages pages history backwards, export
gives JSON and Markdown."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from tests.support import TEST_REDIS_URL, make_settings, quiet_params, require_redis, serving

KEY_A = {"Authorization": "Bearer list-a"}
KEY_B = {"Authorization": "Bearer list-b"}


@pytest.fixture(scope="module")
def server(tiny_checkpoint: Path) -> Iterator[tuple[str, str]]:
    require_redis()
    settings = make_settings(tiny_checkpoint, api_keys=["list-a", "list-b"])
    with serving(settings) as url:
        yield url, settings.redis_key_prefix


def client(server: tuple[str, str], headers: dict[str, str]) -> httpx.Client:
    return httpx.Client(base_url=server[0], headers=headers, timeout=None)


def listed(http: httpx.Client, limit: int) -> list[dict]:
    sessions, cursor = [], None
    while True:
        params = {"limit": limit, **({"cursor": cursor} if cursor else {})}
        page = http.get("/v1/sessions", params=params).json()
        sessions += page["sessions"]
        cursor = page["next_cursor"]
        if cursor is None:
            return sessions


def test_a_key_lists_exactly_its_live_conversations(server: tuple[str, str]) -> None:
    with client(server, KEY_A) as a, client(server, KEY_B) as b:
        mine = [a.post("/v1/sessions").json()["session_id"] for _ in range(5)]
        theirs = b.post("/v1/sessions").json()["session_id"]
        reply = a.post(f"/v1/sessions/{mine[1]}/messages", json={"content": "Plan a  trip", **quiet_params()})
        assert reply.status_code == 200
        sessions = listed(a, 2)
        ids = [s["session_id"] for s in sessions]
        # Newest (last updated) first: the one just talked to, then the rest by creation, each once.
        assert ids == [mine[1], mine[4], mine[3], mine[2], mine[0]]
        top = sessions[0]
        assert top["title"] == "Plan a trip" and top["message_count"] == 2 and top["context_tokens"] > 0
        assert top["updated_at"] >= top["created_at"]
        assert [s["session_id"] for s in listed(b, 10)] == [theirs]
        # Deleted and expired conversations disappear.
        assert a.delete(f"/v1/sessions/{mine[3]}").status_code == 204
        with redis.Redis.from_url(TEST_REDIS_URL) as r:
            for part in ("meta", "msgs", "ids"):
                r.delete(f"{server[1]}chat:{{{mine[0]}}}:{part}")  # what expiry leaves: nothing
        assert [s["session_id"] for s in listed(a, 3)] == [mine[1], mine[4], mine[2]]
        bad = a.get("/v1/sessions", params={"cursor": "x"})
        assert bad.status_code == 422 and bad.json()["error"]["code"] == "invalid_request"


def test_history_pages_backwards_and_exports(server: tuple[str, str]) -> None:
    with client(server, KEY_A) as a, client(server, KEY_B) as b:
        sid = a.post("/v1/sessions").json()["session_id"]
        items = [{"role": "user", "content": f"line {i} <script>alert(1)</script>"} for i in range(7)]
        assert a.post(f"/v1/conversations/conv_{sid}/items", json={"items": items}).status_code == 200
        pages, before = [], None
        while True:
            params = {"limit": 3, **({"before": before} if before else {})}
            page = a.get(f"/v1/sessions/{sid}/messages", params=params).json()
            pages.append([m["content"] for m in page["messages"]])
            if not page["has_more"]:
                break
            before = page["messages"][0]["id"]
        texts = [i["content"] for i in items]
        assert pages == [texts[4:], texts[1:4], texts[:1]]
        assert b.get(f"/v1/sessions/{sid}/messages").status_code == 404
        exported = a.get(f"/v1/sessions/{sid}/export")
        assert exported.headers["content-disposition"].startswith("attachment")
        data = json.loads(exported.text)
        assert [m["content"] for m in data["messages"]] == texts and data["session_id"] == sid
        markdown = a.get(f"/v1/sessions/{sid}/export", params={"format": "markdown"}).text
        assert markdown.startswith("# line 0") and markdown.count("## User") == 7
        assert b.get(f"/v1/sessions/{sid}/export").status_code == 404

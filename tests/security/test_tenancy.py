"""Tenants are kept apart and secrets are kept out of storage and logs.

Another key's session answers exactly like a missing one and its attempts never reach the owner's
cached decode state (the cache is keyed by owner and session, and ownership is checked first). API keys
never reach Redis or stay in memory in the clear, nor the server log when a browser sends one in the
websocket URL; session ids carry at least 128 random bits; and no message content is ever logged at INFO
or above, whatever path a turn takes.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
import re
import uuid
from collections.abc import Iterator

import httpx
import pytest
import redis
from websockets.exceptions import InvalidStatus

from app.auth import ApiKeyAuth
from app.engine.state_cache import StateCache
from app.metrics import Metrics
from app.store.sessions import new_session_id
from model.reformer import ReformerLM
from model.tokenizer import ChatTokenizer
from tests.support import TEST_REDIS_URL, LiveServerFactory, frame, metric, open_ws, quiet_params, send

SECRET_A, SECRET_B = "alpha-secret-key-0123", "bravo-secret-key-4567"
KEY_A = {"Authorization": f"Bearer {SECRET_A}"}
KEY_B = {"Authorization": f"Bearer {SECRET_B}"}
ADMIN = {"Authorization": "Bearer admin"}


@pytest.fixture(scope="module")
def server(live_server: LiveServerFactory) -> Iterator[tuple[str, str]]:
    """(base URL, key prefix) of a server with two tenants."""
    with live_server(api_keys=[SECRET_A, SECRET_B], admin_token="admin", rate_limit_per_minute=0) as live:
        yield live.url, live.prefix


def counter(url: str, name: str) -> float:
    return metric(url, name, ADMIN)


def test_another_tenant_never_reaches_the_owners_cached_state(server: tuple[str, str]) -> None:
    url, _ = server
    with httpx.Client(base_url=url, timeout=None) as http:
        session_id = http.post("/v1/sessions", headers=KEY_A).json()["session_id"]
        path = f"/v1/sessions/{session_id}/messages"
        assert http.post(path, json={"content": "mine", **quiet_params()}, headers=KEY_A).status_code == 200
        queries = counter(url, "reformer_chat_state_cache_queries_total")
        hits = counter(url, "reformer_chat_state_cache_hits_total")

        for method, target, body in [
            ("POST", path, {"content": "let me continue your chat", **quiet_params()}),
            ("GET", f"/v1/sessions/{session_id}", None),
            ("DELETE", f"/v1/sessions/{session_id}", None),
        ]:
            response = http.request(method, target, json=body, headers=KEY_B)
            assert response.status_code == 404 and response.json()["error"]["code"] == "session_not_found"
        with pytest.raises(InvalidStatus) as refused:  # the websocket: a 404 in place of its handshake
            open_ws(url, session_id, KEY_B)
        assert json.loads(refused.value.response.body)["error"]["code"] == "session_not_found"
        # The intruder never got as far as the cache ...
        assert counter(url, "reformer_chat_state_cache_queries_total") == queries
        # ... and the owner's state is still there for the owner's next turn.
        again = http.post(path, json={"content": "still mine", **quiet_params()}, headers=KEY_A)
        assert again.status_code == 200
        assert counter(url, "reformer_chat_state_cache_hits_total") == hits + 1
        assert len(http.get(f"/v1/sessions/{session_id}", headers=KEY_A).json()["messages"]) == 4


def test_the_state_cache_is_keyed_by_owner_and_session(tiny_model: tuple[ReformerLM, ChatTokenizer]) -> None:
    model, _ = tiny_model
    cache = StateCache(budget_bytes=1 << 30, metrics=Metrics())
    cache.put(("key-owner", "session-1"), model.init_state(1), tokens=0)
    assert cache.take(("key-intruder", "session-1")) is None
    assert ("key-owner", "session-1") in cache
    assert cache.take(("key-owner", "session-1")) is not None


def test_api_keys_never_reach_redis_or_memory_in_the_clear(server: tuple[str, str]) -> None:
    url, prefix = server
    session_id = httpx.post(f"{url}/v1/sessions", headers=KEY_A).json()["session_id"]
    httpx.post(
        f"{url}/v1/sessions/{session_id}/messages", json={"content": "hi", **quiet_params()}, headers=KEY_A
    )
    stored = b""
    with redis.Redis.from_url(TEST_REDIS_URL) as r:
        for key in r.scan_iter(match=f"{prefix}*"):
            kind = r.type(key)
            if kind == b"hash":
                stored += b"".join(k + v for k, v in r.hgetall(key).items())
            elif kind == b"list":
                stored += b"".join(r.lrange(key, 0, -1))
            elif kind == b"string":
                stored += r.get(key) or b""
            stored += key
        owner = r.hget(f"{prefix}chat:{{{session_id}}}:meta", "owner")
    assert stored and b"alpha-secret" not in stored and b"bravo-secret" not in stored
    assert owner == b"key-" + hashlib.sha256(SECRET_A.encode()).hexdigest()[:32].encode()
    auth = ApiKeyAuth([SECRET_A, SECRET_B])
    assert SECRET_A not in repr(vars(auth)) and SECRET_A.encode() not in b"".join(auth._digests)


def test_session_ids_carry_at_least_128_random_bits(server: tuple[str, str]) -> None:
    url, _ = server
    from_api = [httpx.post(f"{url}/v1/sessions", headers=KEY_A).json()["session_id"] for _ in range(20)]
    ids = from_api + [new_session_id() for _ in range(20_000)]
    assert len(set(ids)) == len(ids)
    for session_id in from_api:
        assert re.fullmatch(r"[A-Za-z0-9_-]+", session_id)
        raw = base64.urlsafe_b64decode(session_id + "=" * (-len(session_id) % 4))
        assert len(raw) * 8 >= 128


def test_message_content_is_never_logged_at_info_or_above(
    server: tuple[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    url, prefix = server
    marker = f"private-{uuid.uuid4().hex}"
    caplog.set_level(logging.DEBUG)
    with httpx.Client(base_url=url, headers=KEY_A, timeout=None) as http:
        session_id = http.post("/v1/sessions").json()["session_id"]
        path = f"/v1/sessions/{session_id}/messages"
        assert http.post(path, json={"content": f"{marker} over REST", **quiet_params()}).status_code == 200
        with open_ws(url, session_id, KEY_A) as ws:
            send(ws, type="message", content=f"{marker} over the websocket", **quiet_params())
            while frame(ws)["type"] != "done":
                pass
            send(ws, type="message", content=f"{marker} with a bad field", temperature=-1)
            assert frame(ws)["type"] == "error"
        too_long = http.post(path, json={"content": marker * 100})
        assert too_long.status_code == 422 and marker not in too_long.text
        lock = f"{prefix}chat:{{{session_id}}}:lock"
        with redis.Redis.from_url(TEST_REDIS_URL) as r:
            r.set(lock, "another-replica", px=60_000)
            assert http.post(path, json={"content": f"{marker} while busy"}).status_code == 409
            r.delete(lock)
    loud = [record for record in caplog.records if record.levelno >= logging.INFO]
    for record in loud:
        assert marker not in record.getMessage(), record.getMessage()
        assert marker not in (record.exc_text or "")


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def test_a_key_in_the_websocket_url_never_reaches_the_server_log(live_server: LiveServerFactory) -> None:
    """Browsers cannot set headers on a websocket, so the page sends `?api_key=`: uvicorn logs that URL
    at INFO, and the record must arrive redacted."""
    collect = Collect()
    loggers = [logging.getLogger(name) for name in ("uvicorn.error", "uvicorn.access")]
    with live_server(api_keys=[SECRET_A], log_level="info", rate_limit_per_minute=0) as live:
        url = live.url
        for logger in loggers:
            logger.addHandler(collect)
        try:
            session_id = httpx.post(f"{url}/v1/sessions", headers=KEY_A).json()["session_id"]
            with open_ws(url, session_id, query=f"?api_key={SECRET_A}") as ws:
                send(ws, type="message", content="hello", **quiet_params())
                while frame(ws)["type"] != "done":
                    pass
        finally:
            for logger in loggers:
                logger.removeHandler(collect)
    handshakes = [line for line in collect.lines if "WebSocket" in line]
    assert handshakes and all("api_key=[redacted]" in line for line in handshakes), handshakes
    assert not [line for line in collect.lines if SECRET_A in line]

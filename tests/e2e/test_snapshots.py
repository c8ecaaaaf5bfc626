"""Snapshots that cannot be trusted are ignored, counted, and the turn still gets the right reply.

One real server with no state cache (every turn is a cache miss, so every turn looks for a snapshot) and
two twin conversations with the same history. Before each turn the victim's snapshot is damaged in Redis
(a flipped byte, cut short, another checkpoint's, another format version, covering more ids than are
stored, written before a rewind); the twin's is left alone. The victim's turn must count the damage in
`snapshot_rejected{reason}`, rebuild from the ids (the whole history is fed) and reply exactly as the twin
does, whose turn resumed from its snapshot and fed only the tail.
"""

from __future__ import annotations

import re
import struct
import time
from collections.abc import Callable

import httpx
import redis

from model import ReformerConfig, ReformerLM, checkpoint_identity, state_to_bytes
from model.tokenizer import ChatTokenizer
from tests.support import TEST_REDIS_URL, LiveServerFactory, endless_params, quiet_params

ADMIN = {"Authorization": "Bearer admin"}
HISTORY = (
    "Tell me about the sea, the boats on it and the people who sail them all year round.",
    "And the mountains? What grows on them, and who climbs them in the winter snow?",
)
SNAP = "reformer_chat_snapshot"
PREFILL = "reformer_chat_prefill_tokens_total"  # every token fed to the model before a reply


def metric(http: httpx.Client, name: str, **labels: str) -> float:
    """A sample of /admin/metrics (0 when the labelled series does not exist yet)."""
    text = http.get("/admin/metrics", headers=ADMIN).text
    selector = "{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else ""
    match = re.search(rf"^{re.escape(name + selector)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else 0.0


def turn(http: httpx.Client, session_id: str, content: str) -> dict:
    body = {"content": content, **quiet_params(max_tokens=12)}
    response = http.post(f"/v1/sessions/{session_id}/messages", json=body)
    assert response.status_code == 200, response.text
    return response.json()


def reply(response: dict) -> tuple[str, dict]:
    """What must not depend on how the state was obtained: the reply's text and the token counts."""
    return response["message"]["content"], response["usage"]


def wait_for_writes(http: httpx.Client, count: int) -> None:
    """Snapshots are written in the background after the reply: wait until `count` writes have ended,
    and fail if any of them was skipped."""
    while True:
        text = http.get("/admin/metrics", headers=ADMIN).text
        skipped = sum(
            float(v) for v in re.findall(rf"^{SNAP}_skipped_total{{.*}} (\S+)$", text, re.MULTILINE)
        )
        written = metric(http, f"{SNAP}_writes_total")
        if written + skipped >= count:
            assert (written, skipped) == (count, 0)
            return
        time.sleep(0.02)


def foreign_snapshot(vocab_size: int) -> tuple[str, bytes]:
    torch_model = ReformerLM(ReformerConfig.tiny(vocab_size=vocab_size))  # other random weights
    identity = checkpoint_identity(torch_model)
    return identity, state_to_bytes(torch_model.init_state(1), identity)


Damage = Callable[[redis.Redis, str, str], None]


def _flip(r: redis.Redis, victim: str, twin: str) -> None:
    data = bytearray(r.hget(victim, "data"))
    data[len(data) // 2] ^= 0x40
    r.hset(victim, "data", bytes(data))


def _cut(r: redis.Redis, victim: str, twin: str) -> None:
    data = r.hget(victim, "data")
    r.hset(victim, "data", data[: len(data) - 100])


def _version(r: redis.Redis, victim: str, twin: str) -> None:
    data = r.hget(victim, "data")
    r.hset(victim, "data", data[:8] + struct.pack("<I", 99) + data[12:])


def _too_long(r: redis.Redis, victim: str, twin: str) -> None:
    # The twin is one turn ahead: its snapshot covers ids the victim has not stored (as after a rewind).
    r.delete(victim)
    r.hset(victim, mapping=r.hgetall(twin))


def _stale(r: redis.Redis, victim: str, twin: str) -> None:
    r.hincrby(victim.removesuffix(":snap") + ":meta", "rewinds", 1)  # issue 15's rewind count


DAMAGES: dict[str, Damage] = {
    "corrupt": _flip,
    "truncated": _cut,
    "version": _version,
    "too_long": _too_long,
    "stale": _stale,
}


def test_damaged_snapshots_are_ignored_counted_and_the_reply_is_unchanged(
    live_server: LiveServerFactory, tokenizer: ChatTokenizer
) -> None:
    settings = {
        "state_cache_bytes": 0,
        "snapshot_min_tokens": 0,
        "snapshot_every_tokens": 1,
        "admin_token": "admin",
    }
    other_identity, other_data = foreign_snapshot(tokenizer.vocab_size)

    def foreign(r: redis.Redis, victim: str, twin: str) -> None:
        r.hset(victim, mapping={"identity": other_identity, "data": other_data})

    damages = {**DAMAGES, "foreign": foreign}
    with (
        live_server(**settings) as live,
        httpx.Client(base_url=live.url, timeout=None) as http,
        redis.Redis.from_url(TEST_REDIS_URL) as r,
    ):
        victim, twin = (http.post("/v1/sessions").json()["session_id"] for _ in range(2))
        writes = 0
        for content in HISTORY:
            assert reply(turn(http, victim, content)) == reply(turn(http, twin, content))
            writes += 2
        wait_for_writes(http, writes)
        for i, (reason, damage) in enumerate(damages.items()):
            content = f"Go on{'.' if i % 2 == 0 else '!'}"
            prompt = len(tokenizer.encode_turn("user", content)) + 1
            stored = http.get(f"/v1/sessions/{twin}").json()["context_tokens"]
            covered = int(r.hget(f"{live.prefix}chat:{{{twin}}}:snap", "tokens"))
            fed, resumed = (
                metric(http, PREFILL),
                metric(http, f"{SNAP}_resumes_total"),
            )
            expected = turn(http, twin, content)
            assert metric(http, f"{SNAP}_resumes_total") == resumed + 1
            assert metric(http, PREFILL) - fed == stored - covered + prompt
            wait_for_writes(http, writes := writes + 1)

            damage(r, f"{live.prefix}chat:{{{victim}}}:snap", f"{live.prefix}chat:{{{twin}}}:snap")
            rejected = metric(http, f"{SNAP}_rejected_total", reason=reason)
            fed, resumed = (
                metric(http, PREFILL),
                metric(http, f"{SNAP}_resumes_total"),
            )
            assert reply(turn(http, victim, content)) == reply(expected), reason
            assert metric(http, f"{SNAP}_rejected_total", reason=reason) == rejected + 1, reason
            assert metric(http, f"{SNAP}_resumes_total") == resumed, reason  # not resumed ...
            assert metric(http, PREFILL) - fed == stored + prompt  # ... rebuilt
            wait_for_writes(http, writes := writes + 1)  # and a good snapshot replaces the bad one


def test_with_snapshots_off_nothing_is_written(live_server: LiveServerFactory) -> None:
    settings = {"snapshots_enabled": False, "snapshot_min_tokens": 0, "admin_token": "admin"}
    with live_server(**settings) as live, httpx.Client(base_url=live.url, timeout=None) as http:
        session_id = http.post("/v1/sessions").json()["session_id"]
        turn(http, session_id, HISTORY[0])
        assert http.get("/admin/info", headers=ADMIN).json()["snapshots"] == {"enabled": False}
        with redis.Redis.from_url(TEST_REDIS_URL) as r:
            assert not r.exists(f"{live.prefix}chat:{{{session_id}}}:snap")


def test_a_rewind_never_resumes_a_snapshot_that_saw_removed_text(
    live_server: LiveServerFactory, tokenizer: ChatTokenizer
) -> None:
    """Edit-last, and deleting the last items, cut history back under a snapshot that saw the cut text (it
    covers more ids than are kept): each time it is refused, and every reply equals a fresh
    conversation's fed only the remaining history. (A snapshot the stored ids outgrew again after a
    rewind is refused as "stale": the damage test above.)"""
    settings = {
        "state_cache_bytes": 0,
        "snapshot_min_tokens": 0,
        "snapshot_every_tokens": 1,
        "admin_token": "admin",
    }
    params = endless_params(tokenizer, 12)
    with live_server(**settings) as live, httpx.Client(base_url=live.url, timeout=None) as http:
        turns = 0

        def say(sid: str, content: str, route: str = "messages") -> str:
            nonlocal turns
            response = http.post(f"/v1/sessions/{sid}/{route}", json={"content": content, **params})
            assert response.status_code == 200, response.text
            turns += 1
            wait_for_writes(http, turns)
            return response.json()["message"]["content"]

        def fresh(contents: list[str]) -> list[str]:
            sid = http.post("/v1/sessions").json()["session_id"]
            return [say(sid, c) for c in contents]

        def rejected(reason: str) -> float:
            return metric(http, f"{SNAP}_rejected_total", reason=reason)

        sid = http.post("/v1/sessions").json()["session_id"]
        say(sid, "Hello there")
        say(sid, "Tell me about cats")
        expected = fresh(["Hello there", "Tell me about the weather today", "Go on"])
        assert say(sid, "Tell me about the weather today", route="edit") == expected[1]
        assert rejected("too_long") == 1
        resumed = metric(http, f"{SNAP}_resumes_total")
        assert say(sid, "Go on") == expected[2]
        assert metric(http, f"{SNAP}_resumes_total") == resumed + 1  # from the snapshot after the edit

        items = http.get(f"/v1/conversations/conv_{sid}/items").json()["data"]  # newest first
        for item in items[:2]:
            assert http.delete(f"/v1/conversations/conv_{sid}/items/{item['id']}").status_code == 200
        assert say(sid, "Go on") == expected[2]
        assert rejected("too_long") == 2  # the cut left fewer ids than the snapshot covers

"""The embedded default: `python -m app` with no REDIS_URL, restarted on the same DATA_DIR, keeps every
session and message and chats on; even a killed server loses no acknowledged turn."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.support import AppProcess, app_env, quiet_params

# Both processes on a DATA_DIR must use one key prefix (the embedded Redis is the data directory's own).
PREFIX = "chat-test:"


@contextmanager
def app_process(checkpoint: Path, data_dir: Path, name: str, *, graceful: bool = True) -> Iterator[str]:
    """`python -m app` with no REDIS_URL (the embedded Redis under DATA_DIR); yields its URL. Its log is
    <data_dir's parent>/<name>.log."""
    env = app_env(checkpoint, None, PREFIX, data_dir=data_dir, max_new_tokens=16)
    app = AppProcess(data_dir.parent, name, env)
    app.start()
    try:
        yield app.url
    finally:
        if graceful:
            assert app.stop() == 0, app.log.read_text()
        else:
            app.kill()


def chat(url: str, session_id: str, content: str) -> dict:
    response = httpx.post(
        f"{url}/v1/sessions/{session_id}/messages", json={"content": content, **quiet_params()}
    )
    assert response.status_code == 200, response.text
    return response.json()


def test_sessions_survive_a_restart_and_chat_continues(tiny_checkpoint: Path, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with app_process(tiny_checkpoint, data_dir, "first") as url:
        assert httpx.get(f"{url}/admin/ready").status_code == 200
        session_id = httpx.post(f"{url}/v1/sessions").json()["session_id"]
        first = chat(url, session_id, "Remember me?")
        before = httpx.get(f"{url}/v1/sessions/{session_id}").json()
    assert (data_dir / "redis" / "appendonly.aof").exists()

    with app_process(tiny_checkpoint, data_dir, "second") as url:
        after = httpx.get(f"{url}/v1/sessions/{session_id}").json()
        assert after == before
        second = chat(url, session_id, "Still here?")
        assert second["usage"]["context_tokens"] > first["usage"]["context_tokens"]
        assert len(httpx.get(f"{url}/v1/sessions/{session_id}").json()["messages"]) == 4


def test_a_killed_server_loses_no_acknowledged_turn(tiny_checkpoint: Path, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with app_process(tiny_checkpoint, data_dir, "first", graceful=False) as url:
        session_id = httpx.post(f"{url}/v1/sessions").json()["session_id"]
        reply = chat(url, session_id, "Acknowledged?")["message"]["content"]
    # SIGKILL gave the app no chance to stop its Redis; the next start finds and replaces it.
    with app_process(tiny_checkpoint, data_dir, "second") as url:
        messages = httpx.get(f"{url}/v1/sessions/{session_id}").json()["messages"]
        assert [m["content"] for m in messages] == ["Acknowledged?", reply]
    assert "stopping a stale embedded redis-server" in (tmp_path / "second.log").read_text()

"""The embedded default: `python -m app` with no REDIS_URL, restarted on the same DATA_DIR, keeps every
session and message and chats on; even a killed server loses no acknowledged turn."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

from tests.support import quiet_params

URL_LINE = "reformer-chat is serving at "


@contextmanager
def app_process(checkpoint: Path, data_dir: Path, log: Path, *, graceful: bool = True) -> Iterator[str]:
    """`python -m app --port 0` as a user would run it; yields the URL it prints."""
    env = {k: v for k, v in os.environ.items() if k not in {"REDIS_URL", "API_KEYS", "ADMIN_TOKEN"}}
    env.update(MODEL_DIR=str(checkpoint), DATA_DIR=str(data_dir), TORCH_THREADS="1", LOG_LEVEL="warning",
               MAX_NEW_TOKENS="16", DEVICE="cpu", PRECISION="fp32")  # fmt: skip
    out = log.with_suffix(".out")
    with open(out, "w") as stdout, open(log, "w") as stderr:
        process = subprocess.Popen(
            [sys.executable, "-m", "app", "--host", "127.0.0.1", "--port", "0"],
            cwd=data_dir.parent,  # not the repository: no stray .env
            env=env,
            stdout=stdout,
            stderr=stderr,
        )
    try:
        while URL_LINE not in out.read_text():
            assert process.poll() is None, f"the server exited: {log.read_text()}"
            time.sleep(0.05)
        yield out.read_text().split(URL_LINE)[1].split()[0]
    finally:
        if graceful:
            process.send_signal(signal.SIGINT)
            assert process.wait() == 0, log.read_text()
        else:
            process.kill()
            process.wait()


def chat(url: str, session_id: str, content: str) -> dict:
    response = httpx.post(
        f"{url}/v1/sessions/{session_id}/messages", json={"content": content, **quiet_params()}
    )
    assert response.status_code == 200, response.text
    return response.json()


def test_sessions_survive_a_restart_and_chat_continues(tiny_checkpoint: Path, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with app_process(tiny_checkpoint, data_dir, tmp_path / "first.log") as url:
        assert httpx.get(f"{url}/admin/ready").status_code == 200
        session_id = httpx.post(f"{url}/v1/sessions").json()["session_id"]
        first = chat(url, session_id, "Remember me?")
        before = httpx.get(f"{url}/v1/sessions/{session_id}").json()
    assert (data_dir / "redis" / "appendonly.aof").exists()

    with app_process(tiny_checkpoint, data_dir, tmp_path / "second.log") as url:
        after = httpx.get(f"{url}/v1/sessions/{session_id}").json()
        assert after == before
        second = chat(url, session_id, "Still here?")
        assert second["usage"]["context_tokens"] > first["usage"]["context_tokens"]
        assert len(httpx.get(f"{url}/v1/sessions/{session_id}").json()["messages"]) == 4


def test_a_killed_server_loses_no_acknowledged_turn(tiny_checkpoint: Path, tmp_path: Path) -> None:
    data_dir = tmp_path / "data"
    with app_process(tiny_checkpoint, data_dir, tmp_path / "first.log", graceful=False) as url:
        session_id = httpx.post(f"{url}/v1/sessions").json()["session_id"]
        reply = chat(url, session_id, "Acknowledged?")["message"]["content"]
    # SIGKILL gave the app no chance to stop its Redis; the next start finds and replaces it.
    with app_process(tiny_checkpoint, data_dir, tmp_path / "second.log") as url:
        messages = httpx.get(f"{url}/v1/sessions/{session_id}").json()["messages"]
        assert [m["content"] for m in messages] == ["Acknowledged?", reply]
    assert "stopping a stale embedded redis-server" in (tmp_path / "second.log").read_text()

"""Redis goes away and comes back: 503 store_unavailable with Retry-After, readiness names Redis, the
process stays up, and it serves again once Redis is back (redis-py reconnects)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import httpx
import pytest
import redis
from websockets.exceptions import InvalidStatus

from app.store.embedded_redis import EmbeddedRedis
from tests.support import free_port, make_settings, open_ws, quiet_params, running_server


class RedisProcess:
    """A throwaway redis-server of our own on a loopback port, without persistence, to stop and restart."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        command = [EmbeddedRedis.executable(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                   "--appendonly", "no"]  # fmt: skip
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        with redis.Redis(port=self.port) as client:
            while True:
                try:
                    client.ping()
                    return
                except redis.ConnectionError:
                    time.sleep(0.02)

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait()
            self.process = None


def test_redis_down_is_503_and_the_service_recovers(tiny_checkpoint: Path) -> None:
    redis_process = RedisProcess(free_port())
    settings = make_settings(
        tiny_checkpoint, redis_url=f"redis://127.0.0.1:{redis_process.port}/0", retry_after_seconds=4
    )
    redis_process.start()
    try:
        with running_server(settings) as url, httpx.Client(base_url=url, timeout=None) as http:
            session_id = http.post("/v1/sessions").json()["session_id"]
            turn = http.post(f"/v1/sessions/{session_id}/messages", json={"content": "hi", **quiet_params()})
            assert turn.status_code == 200

            redis_process.stop()
            for method, path, body in [
                ("POST", "/v1/sessions", None),
                ("GET", f"/v1/sessions/{session_id}", None),
                ("POST", f"/v1/sessions/{session_id}/messages", {"content": "hi", **quiet_params()}),
                ("DELETE", f"/v1/sessions/{session_id}", None),
            ]:
                response = http.request(method, path, json=body)
                assert response.status_code == 503, (method, path, response.text)
                assert response.json()["error"]["code"] == "store_unavailable"
                assert response.headers["Retry-After"] == "4"
            ready = http.get("/admin/ready")
            assert ready.status_code == 503 and ready.headers["Retry-After"] == "4"
            assert ready.json()["error"]["code"] == "not_ready"
            assert ready.json()["error"]["message"].startswith("redis:")
            assert http.get("/admin/health").status_code == 200  # the process is still up
            with pytest.raises(InvalidStatus) as refused:  # the websocket: refused in its handshake
                open_ws(url, session_id)
            assert refused.value.response.status_code == 503
            assert refused.value.response.headers["Retry-After"] == "4"
            assert json.loads(refused.value.response.body)["error"]["code"] == "store_unavailable"

            redis_process.start()  # empty again: it kept nothing
            assert http.get("/admin/ready").status_code == 200
            fresh = http.post("/v1/sessions")
            assert fresh.status_code == 201
            turn = http.post(f"/v1/sessions/{fresh.json()['session_id']}/messages", json={"content": "back?"})
            assert turn.status_code == 200
    finally:
        redis_process.stop()

"""Redis goes away and comes back: 503 store_unavailable with Retry-After, readiness names Redis, the
process stays up, and it serves again once Redis is back (redis-py reconnects)."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from websockets.exceptions import InvalidStatus

from tests.support import RedisServer, make_settings, open_ws, quiet_params, running_server


def test_redis_down_is_503_and_the_service_recovers(tiny_checkpoint: Path, tmp_path: Path) -> None:
    redis_process = RedisServer(tmp_path / "redis", aof=False)  # it keeps nothing across a restart
    settings = make_settings(tiny_checkpoint, redis_url=redis_process.url, retry_after_seconds=4)
    redis_process.start()
    try:
        with running_server(settings) as url, httpx.Client(base_url=url, timeout=None) as http:
            session_id = http.post("/v1/sessions").json()["session_id"]
            turn = http.post(f"/v1/sessions/{session_id}/messages", json={"content": "hi", **quiet_params()})
            assert turn.status_code == 200

            redis_process.kill()
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
        redis_process.kill()

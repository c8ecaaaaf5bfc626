"""The app starts before its Redis, as it may under compose (which does not wait for health) or Kubernetes.

It does not exit: it serves, answers not-ready naming Redis, refuses what needs Redis with a 503, and
logs that it waits. Once a real redis-server comes up on the URL it was given, the same process logs that
Redis answers (with no request to prompt it) and serves turns, without a restart.
"""

from __future__ import annotations

from pathlib import Path

import httpx

from tests.support import AppProcess, RedisServer, app_env, new_prefix, poll_until, quiet_params


def wait_for_log(app: AppProcess, text: str) -> str:
    def logged() -> str | None:
        log = app.log.read_text()
        assert app.alive or text in log, f"the app exited: {log}"
        return log if text in log else None

    return poll_until(logged, f"{text!r} in {app.log}", every=0.05)


def test_the_app_waits_for_a_redis_that_starts_later(tmp_path: Path, tiny_checkpoint: Path) -> None:
    redis = RedisServer(tmp_path / "redis", aof=False)  # its port is chosen, nothing listens there yet
    env = app_env(tiny_checkpoint, redis.url, new_prefix(), log_level="info")
    with AppProcess(tmp_path / "app", "app", env) as app, httpx.Client(base_url=app.url, timeout=30) as http:
        wait_for_log(app, f"Redis at {redis.url} is not answering yet")
        ready = http.get("/admin/ready")
        assert ready.status_code == 503
        assert ready.json()["error"]["code"] == "not_ready"
        assert ready.json()["error"]["message"].startswith("redis:")
        assert http.get("/admin/health").status_code == 200
        refused = http.post("/v1/sessions")
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "store_unavailable"

        with redis:
            # Nothing asks the app anything until its log says Redis answers: it found out by itself.
            log = wait_for_log(app, f"Redis at {redis.url} answers now")
            assert log.count("is not answering yet") == 1, "one warning, not one per retry"
            assert http.get("/admin/ready").status_code == 200
            session_id = http.post("/v1/sessions").json()["session_id"]
            turn = http.post(f"/v1/sessions/{session_id}/messages", json={"content": "hi", **quiet_params()})
            assert turn.status_code == 200
            assert app.alive

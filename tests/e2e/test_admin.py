"""Admin surface: open health and readiness, metrics and info behind the admin token."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from model import ChatTokenizer
from tests.support import LiveServerFactory, endless_params, quiet_params

ADMIN = {"Authorization": "Bearer admin-token"}

SERIES = [
    "reformer_chat_num_requests_running",
    "reformer_chat_num_requests_waiting",
    "reformer_chat_time_to_first_token_seconds_count",
    "reformer_chat_inter_token_latency_seconds_count",
    "reformer_chat_e2e_request_latency_seconds_count",
    "reformer_chat_request_queue_time_seconds_count",
    "reformer_chat_prompt_tokens_total",
    "reformer_chat_generation_tokens_total",
    'reformer_chat_request_success_total{finished_reason="length"}',
    "reformer_chat_state_cache_queries_total",
    "reformer_chat_state_cache_hits_total",
    "reformer_chat_state_cache_bytes",
    'reformer_chat_redis_operation_seconds_count{operation="append_turn"}',
]


@pytest.fixture(scope="module")
def base_url(live_server: LiveServerFactory) -> Iterator[str]:
    with live_server(admin_token="admin-token") as live:
        yield live.url


def sample(text: str, series: str) -> float:
    match = re.search(rf"^{re.escape(series)} (\S+)$", text, flags=re.MULTILINE)
    assert match, f"{series} missing from /admin/metrics"
    return float(match.group(1))


def test_health_and_readiness_need_no_token(base_url: str) -> None:
    assert httpx.get(f"{base_url}/admin/health").json() == {"status": "ok"}
    ready = httpx.get(f"{base_url}/admin/ready")
    assert ready.status_code == 200
    assert ready.json() == {"status": "ready", "checks": {"model": "ok", "redis": "ok"}}


def test_metrics_and_info_need_the_admin_token(base_url: str) -> None:
    for path in ("/admin/metrics", "/admin/info"):
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "admin-token"}):
            response = httpx.get(f"{base_url}{path}", headers=headers)
            assert response.status_code == 401 and response.json()["error"]["code"] == "unauthorized"
        assert httpx.get(f"{base_url}{path}", headers=ADMIN).status_code == 200


def test_metrics_count_what_a_turn_did(base_url: str) -> None:
    session_id = httpx.post(f"{base_url}/v1/sessions").json()["session_id"]
    body = {"content": "Count me.", **quiet_params(max_tokens=5, logit_bias={"0": 0})}
    before = httpx.get(f"{base_url}/admin/metrics", headers=ADMIN).text
    reply = httpx.post(f"{base_url}/v1/sessions/{session_id}/messages", json=body, timeout=None).json()
    response = httpx.get(f"{base_url}/admin/metrics", headers=ADMIN)
    assert response.headers["content-type"].startswith("text/plain")
    after = response.text
    for series in SERIES:
        sample(after, series)  # present
    usage = reply["usage"]
    for series, expected in [
        ("reformer_chat_prompt_tokens_total", usage["prompt_tokens"]),
        ("reformer_chat_generation_tokens_total", usage["completion_tokens"]),
        ("reformer_chat_state_cache_queries_total", 1),
        ("reformer_chat_e2e_request_latency_seconds_count", 1),
    ]:
        previous = sample(before, series) if series in before else 0.0
        assert sample(after, series) - previous == expected, series
    assert sample(after, "reformer_chat_state_cache_bytes") > 0
    assert sample(after, "reformer_chat_num_requests_running") == 0


def test_info_describes_the_model(base_url: str, tiny_checkpoint: Path) -> None:
    info = httpx.get(f"{base_url}/admin/info", headers=ADMIN).json()
    assert info["device"] == "cpu"
    assert info["precision"] == "fp32" and info["model"]["state_dtype"] == "float32"
    assert info["checkpoint"] == str(tiny_checkpoint)
    assert info["model"]["config"]["attn_layers"] == ["local", "lsh"]
    assert info["model"]["parameters"] > 0
    assert info["uptime_seconds"] >= 0 and info["version"]
    assert info["auth"] == {"api_keys": False, "admin_token": True}


def test_bf16_serving_says_so_and_answers(
    live_server: LiveServerFactory, tokenizer: ChatTokenizer, caplog: pytest.LogCaptureFixture
) -> None:
    """PRECISION=bf16: /admin/info and the startup line say bf16, and a turn is answered."""
    caplog.set_level(logging.INFO, logger="app")
    with live_server(precision="bf16") as live:
        info = httpx.get(f"{live.url}/admin/info").json()
        assert info["precision"] == "bf16" and info["model"]["state_dtype"] == "bfloat16"
        session = httpx.post(f"{live.url}/v1/sessions").json()["session_id"]
        body = {"content": "Hi! How was your day?", **endless_params(tokenizer, 8)}
        reply = httpx.post(f"{live.url}/v1/sessions/{session}/messages", json=body, timeout=60)
        assert reply.status_code == 200, reply.text
        assert reply.json()["usage"]["completion_tokens"] == 8
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("serving ")]
    assert " in bf16 (decode state bfloat16)" in line


def test_without_an_admin_token_metrics_are_open(live_server: LiveServerFactory) -> None:
    with live_server() as live:
        url = live.url
        assert httpx.get(f"{url}/admin/metrics").status_code == 200
        assert httpx.get(f"{url}/admin/info").json()["auth"]["admin_token"] is False

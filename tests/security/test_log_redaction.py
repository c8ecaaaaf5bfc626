"""No credential reaches the log, in any spelling the server accepts: a server at DEBUG is driven with its
keys in a header and in the query string under every name the server reads as `api_key` (percent-encoded
in part or whole, the value encoded too), over HTTP and the websocket, accepted and refused; then every
line logged during the run is scanned for every spelling of every key that was sent.
"""

from __future__ import annotations

import logging
from pathlib import Path

import httpx
from websockets.exceptions import InvalidStatus

from tests.support import make_settings, open_ws, require_redis, serving

KEY = "sk-redact-me-1234"
ADMIN = "adm-redact-me-5678"
# Names Starlette decodes to `api_key` (so the server accepts them), and case variants it does not
# accept but a reader of the log would still recognise.
NAMES = ["api_key", "api%5Fkey", "api%5fkey", "%61%70%69%5F%6B%65%79", "API_KEY", "Api_Key"]
# The key as sent: plain, and percent-encoded in part (the server decodes it to the same key).
VALUES = [KEY, "sk-red%61ct-me-1234", "%73%6B-redact-me-1234"]


class Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


def test_no_key_reaches_the_log_in_any_accepted_spelling(tiny_checkpoint: Path) -> None:
    require_redis()
    collect = Collect()
    loggers = [logging.getLogger(name) for name in ("", "uvicorn", "uvicorn.error", "uvicorn.access")]
    settings = make_settings(
        tiny_checkpoint, api_keys=[KEY], admin_token=ADMIN, log_level="debug", rate_limit_per_minute=0
    )
    accepted = 0
    with serving(settings) as url:
        for logger in loggers:
            logger.addHandler(collect)
        try:
            headers = {"Authorization": f"Bearer {KEY}"}
            session_id = httpx.post(f"{url}/v1/sessions", headers=headers).json()["session_id"]
            httpx.get(f"{url}/admin/metrics", headers={"Authorization": f"Bearer {ADMIN}"})
            for name in NAMES:
                for value in VALUES:
                    query = f"?{name}={value}"
                    httpx.get(f"{url}/v1/sessions/{session_id}{query}")  # HTTP: logged, then 401
                    try:
                        with open_ws(url, session_id, query=query):
                            accepted += 1
                    except InvalidStatus as refused:
                        assert refused.response.status_code == 401
        finally:
            for logger in loggers:
                logger.removeHandler(collect)
    assert accepted == 12  # the four names the server reads as api_key, each with the three values
    handshakes = [line for line in collect.lines if "WebSocket" in line]
    assert len(handshakes) >= len(NAMES) * len(VALUES), "the handshakes were not logged: the test saw nothing"
    secrets = {KEY, ADMIN, *VALUES}
    leaked = [line for line in collect.lines if any(secret in line for secret in secrets)]
    assert not leaked, leaked

"""What a production server shows a browser: the chat page with a Content-Security-Policy that allows no
inline script (and the page has none), no framing and no Referer; no API explorer (/docs, /redoc,
/openapi.json) unless ENABLE_DOCS turns it on."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from app.factory import STATIC_DIR
from tests.support import make_settings, require_redis, serving

DOCS = ("/docs", "/redoc", "/openapi.json")


@pytest.mark.parametrize("enable_docs", [None, True])
def test_production_serves_no_api_explorer_unless_enabled(
    tiny_checkpoint: Path, enable_docs: bool | None
) -> None:
    require_redis()
    settings = make_settings(
        tiny_checkpoint, environment="production", api_keys=["k"], admin_token="a", enable_docs=enable_docs
    )
    with serving(settings) as url:
        statuses = [httpx.get(url + path).status_code for path in DOCS]
    assert statuses == ([200] * 3 if enable_docs else [404] * 3)


def test_the_page_is_sent_with_a_policy_it_satisfies(tiny_checkpoint: Path) -> None:
    require_redis()
    with serving(make_settings(tiny_checkpoint)) as url:
        for path in ("/", "/static/app.js", "/static/style.css"):
            headers = httpx.get(url + path).headers
            policy = dict(
                part.strip().split(" ", 1) for part in headers["Content-Security-Policy"].split(";")
            )
            assert policy["script-src"] == "'self'" and policy["style-src"] == "'self'"
            assert policy["frame-ancestors"] == "'none'" and policy["default-src"] == "'none'"
            assert headers["X-Frame-Options"] == "DENY"
            assert headers["Referrer-Policy"] == "no-referrer"
            assert headers["X-Content-Type-Options"] == "nosniff"
        api = httpx.get(url + "/admin/health").headers
        assert "Content-Security-Policy" not in api  # JSON needs none (and /docs would break under it)
    html = (STATIC_DIR / "index.html").read_text()
    assert all("src=" in tag for tag in re.findall(r"<script[^>]*>", html)), "an inline script"
    assert not re.search(r"\son\w+\s*=", html), "an inline event handler"
    assert not re.search(r"\sstyle\s*=", html), "an inline style"

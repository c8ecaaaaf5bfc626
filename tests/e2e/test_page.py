"""The chat page at `/` in a real browser: Playwright driving headless Chromium (Debian's `chromium`).

Send a message and watch it stream, reload and find the history, stop a long reply, switch and delete
conversations, see model and user text rendered as text, the API-key field, and a clear message when the
server goes away. Skipped, with the reason, where Chromium or Playwright is missing.

Every page gets a generous Playwright default timeout (HANG_GUARD_MS): a hang guard, not a performance
assertion, so a wait for something that never comes fails within minutes, naming what it waited for,
instead of running into pytest-timeout with no clue. Nothing here waits for a state that may be too short
to observe: that the reply is on the page while it streams is recorded by a MutationObserver in the page
(a reply from a warm tiny model can finish between two of Playwright's polls).
"""

from __future__ import annotations

import json
import re
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from app.config import Settings
from app.factory import create_app
from model.tokenizer import ChatTokenizer
from tests.support import (
    LiveServerFactory,
    delete_prefix,
    endless_params,
    free_port,
    make_settings,
    poll_until,
    require_redis,
)

playwright = pytest.importorskip(
    "playwright.sync_api", reason="the playwright package is not installed: pip install -e '.[dev]'"
)
from playwright.sync_api import BrowserContext, Page, WebSocketRoute  # noqa: E402

KEY = "page-key"
# Generous on a shared 2-core machine; only a hang should ever reach it.
HANG_GUARD_MS = 120_000
# The page sends no max_tokens: replies run to the server's MAX_NEW_TOKENS (or end-of-turn). Short for
# most tests; the Stop test's own server allows endless replies.
SHORT_REPLIES = 24
MAX_TOKENS = 4000
# Runs in every document, about:blank included (which has no localStorage).
PRESET_KEY = (
    "if (location.protocol.startsWith('http')) "
    f"localStorage.setItem('reformer-chat.apiKey', {json.dumps(json.dumps(KEY))})"
)


@pytest.fixture(scope="module")
def base_url(live_server: LiveServerFactory) -> Iterator[str]:
    with live_server(api_keys=[KEY], max_new_tokens=SHORT_REPLIES) as live:
        yield live.url


def open_page(context: BrowserContext, url: str) -> Page:
    opened = context.new_page()
    opened.set_default_timeout(HANG_GUARD_MS)
    opened.goto(url)
    return opened


@pytest.fixture
def page(context: BrowserContext, base_url: str) -> Page:
    """The page of a user who has saved the API key."""
    context.add_init_script(PRESET_KEY)
    return open_page(context, base_url)


@pytest.fixture
def http(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {KEY}"}, timeout=None) as client:
        yield client


def send(page: Page, text: str) -> None:
    page.fill("#input", text)
    page.press("#input", "Enter")


# Records the length of the streaming reply's text after every change to the messages, so a test can
# check afterwards that the reply was on the page, growing, before it finished.
RECORD_STREAMING = """() => {
  window.streamedLengths = [];
  new MutationObserver(() => {
    const bubble = document.querySelector('.message.assistant.streaming .bubble');
    if (bubble) window.streamedLengths.push(bubble.textContent.length);
  }).observe(document.querySelector('#messages'), { childList: true, subtree: true, characterData: true });
}"""


def finished_reply(page: Page, index: int = -1) -> dict[str, str]:
    """Wait until the reply at `index` has its finish reason; its raw text (the bubble shows it rendered
    as Markdown) and reason."""
    reply = page.locator(".message.assistant").nth(index)
    reply.locator(".reason").wait_for()
    return {
        "text": reply.get_attribute("data-text") or "",
        "reason": reply.locator(".reason").inner_text(),
    }


def current_session(page: Page) -> str:
    return json.loads(page.evaluate("localStorage.getItem('reformer-chat.current')"))


def stored(http: httpx.Client, session_id: str) -> dict[str, Any]:
    return http.get(f"/v1/sessions/{session_id}").json()


STREAM_URL = re.compile(r".*/stream(\?.*)?$")


def route_stream(page: Page, sampling: dict[str, Any], tokens: list[str] | None = None) -> None:
    """Route the page's websocket through the test: `sampling` fields are added to every message frame
    the page sends, and the token frames on their way to the page are recorded in `tokens` if given."""

    def handler(ws: WebSocketRoute) -> None:
        server = ws.connect_to_server()

        def to_server(message: str | bytes) -> None:
            frame = json.loads(message)
            if frame.get("type") == "message":
                frame.update(sampling)
            server.send(json.dumps(frame))

        def to_page(message: str | bytes) -> None:
            frame = json.loads(message)
            if tokens is not None and frame.get("type") == "token":
                tokens.append(frame["text"])
            ws.send(message)

        ws.on_message(to_server)
        server.on_message(to_page)

    page.route_web_socket(STREAM_URL, handler)


def test_a_reply_streams_and_the_history_survives_a_reload(
    context: BrowserContext, base_url: str, http: httpx.Client, tokenizer: ChatTokenizer
) -> None:
    # Greedy with end-of-turn banned, so the reply always has SHORT_REPLIES tokens to stream (a sampled
    # one may end after a single token); the token frames are recorded on their way to the page.
    sampling = endless_params(tokenizer, SHORT_REPLIES)
    tokens: list[str] = []
    context.add_init_script(PRESET_KEY)
    page = context.new_page()
    page.set_default_timeout(HANG_GUARD_MS)
    route_stream(page, sampling, tokens)
    page.goto(base_url)
    page.evaluate(RECORD_STREAMING)
    send(page, "Hello, page!")
    reply = finished_reply(page)
    assert len(tokens) > 1 and reply["text"] == "".join(tokens)  # streamed piece by piece
    streamed = page.evaluate("window.streamedLengths")
    # The reply was on the page, partly written, while it streamed.
    assert any(0 < length < len(reply["text"]) for length in streamed), streamed
    session_id = current_session(page)
    record = stored(http, session_id)
    assert [m["content"] for m in record["messages"]] == ["Hello, page!", reply["text"]]
    assert reply["reason"] == record["messages"][1]["finish_reason"]
    assert page.inner_text("#context-size") == f"context: {record['context_tokens']} tokens"
    assert page.inner_text("#conversations .open") == "Hello, page!"  # titled by its first message
    assert page.inner_text("#model-name").startswith("model: ")

    page.reload()
    page.locator(".message.assistant .reason").wait_for()
    texts = [m.get_attribute("data-text") for m in page.locator(".message").all()]
    assert texts == ["Hello, page!", reply["text"]]
    assert page.inner_text("#chat-title") == "Hello, page!"
    assert page.inner_text("#context-size") == f"context: {record['context_tokens']} tokens"


def test_stop_cancels_a_long_reply(
    context: BrowserContext, live_server: LiveServerFactory, tokenizer: ChatTokenizer
) -> None:
    endless = endless_params(tokenizer, MAX_TOKENS)
    with live_server(max_new_tokens=MAX_TOKENS) as live:
        url = live.url
        page = context.new_page()
        page.set_default_timeout(HANG_GUARD_MS)
        # logit_bias against every token that could end the reply, added to the page's own frames
        route_stream(page, endless)
        page.goto(url)
        send(page, "Tell me everything.")
        page.wait_for_function(
            "() => document.querySelector('.message.assistant.streaming .bubble')?.textContent.length > 5"
        )
        assert page.locator("#stop").is_visible() and page.locator("#send").is_hidden()
        page.click("#stop")
        reply = finished_reply(page)
        assert reply["reason"] == "cancelled"
        assert page.locator("#send").is_visible() and page.locator("#stop").is_hidden()
        with httpx.Client(base_url=url, timeout=None) as http:
            record = stored(http, current_session(page))
    assert record["messages"][1]["finish_reason"] == "cancelled"
    assert record["messages"][1]["content"] == reply["text"]


def test_new_chat_switching_and_delete(page: Page, http: httpx.Client) -> None:
    send(page, "First chat")
    finished_reply(page)
    first = current_session(page)
    page.click("#new-chat")
    send(page, "Second chat")  # at once: it must wait for the new chat, not go to the old one
    # The first chat's finished reply stays on the page until the new chat exists: wait for the message
    # in the new chat's view before waiting for its reply.
    page.wait_for_function("() => document.querySelector('.message .bubble')?.textContent === 'Second chat'")
    finished_reply(page)
    second = current_session(page)
    assert second != first
    assert page.locator(".message .bubble").first.text_content() == "Second chat"
    assert [m["content"] for m in stored(http, first)["messages"]][:1] == ["First chat"]
    assert len(stored(http, first)["messages"]) == 2
    # The list is the server's: this key's conversations, last updated first.
    assert page.locator("#conversations .open").all_inner_texts()[:2] == ["Second chat", "First chat"]
    listed = page.locator("#conversations li").count()

    page.locator(f'#conversations li[data-id="{first}"] .open').click()
    page.wait_for_function("() => document.querySelector('.message .bubble')?.textContent === 'First chat'")
    assert page.inner_text("#chat-title") == "First chat"

    page.locator(f'#conversations li[data-id="{first}"] .delete').click()
    page.wait_for_function(f"() => document.querySelectorAll('#conversations li').length === {listed - 1}")
    assert http.get(f"/v1/sessions/{first}").status_code == 404
    assert page.locator(".message").count() == 0
    listing = http.get("/v1/sessions", params={"limit": 100}).json()["sessions"]
    assert listing[0]["session_id"] == second and first not in [s["session_id"] for s in listing]


def test_text_is_never_parsed_as_html(page: Page) -> None:
    markup = '<img src=x onerror="window.injected=1"><b>bold</b>'
    send(page, markup)
    finished_reply(page)
    page.reload()
    finished_reply(page)
    assert page.locator(".message.user .bubble").text_content() == markup
    assert page.locator(".messages img, .messages b, #conversations img").count() == 0
    assert page.evaluate("window.injected") is None
    assert page.inner_text("#conversations .open") == markup[:39] + "…"


def test_the_api_key_field_appears_when_the_server_asks(context: BrowserContext, base_url: str) -> None:
    page = open_page(context, base_url)
    page.locator("#key-form").wait_for()
    assert "requires an API key" in page.inner_text("#banner")
    page.fill("#api-key", "wrong-key")
    page.click("#key-form button")
    page.wait_for_function("() => document.querySelector('#banner').textContent.includes('refused')")
    assert page.locator("#key-form").is_visible()
    page.fill("#api-key", KEY)
    page.click("#key-form button")
    page.wait_for_function("() => document.querySelector('#model-name').textContent !== 'model: …'")
    assert page.locator("#banner").is_hidden()
    send(page, "Now with a key")
    assert finished_reply(page)["reason"] in ("stop", "length")


@contextmanager
def serving_on(settings: Settings, port: int) -> Iterator[str]:
    """A server on a given port, so a restarted one is where the page last saw it."""
    server = uvicorn.Server(
        uvicorn.Config(create_app(settings), host="127.0.0.1", port=port, log_level=settings.log_level)
    )
    thread = threading.Thread(target=server.run, name="test-uvicorn", daemon=True)
    thread.start()

    def started() -> bool:
        if not thread.is_alive():
            raise RuntimeError(f"the test server failed to start on port {port}: see the captured log")
        return server.started

    poll_until(started, f"the test server starting on port {port}")
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join()


def test_a_server_that_goes_away_is_reported_and_rejoined(
    context: BrowserContext, tiny_checkpoint: Path
) -> None:
    require_redis()
    settings = make_settings(tiny_checkpoint, max_new_tokens=8)
    port = free_port()
    page = context.new_page()
    page.set_default_timeout(HANG_GUARD_MS)
    try:
        with serving_on(settings, port) as url:
            page.goto(url)
            send(page, "Are you there?")
            finished_reply(page)
            assert page.locator("#key-form").is_hidden()  # an open server asks for no key
            page.wait_for_function("() => document.querySelector('#connection').dataset.state === 'open'")
        # The server has stopped.
        page.wait_for_function("() => document.querySelector('#connection').dataset.state === 'lost'")
        assert "Lost the connection to the server" in page.inner_text("#banner")
        assert page.inner_text("#connection") == "reconnecting…"
        send(page, "Hello?")
        page.wait_for_function(
            "() => document.querySelector('#banner').textContent.includes('Not connected')"
        )
        assert page.input_value("#input") == "Hello?"  # kept for a retry
        page.click("#new-chat")
        page.wait_for_function("() => document.querySelector('#banner').textContent.includes('Cannot reach')")

        with serving_on(settings, port):  # back, with the same Redis: the page reconnects by itself
            page.wait_for_function("() => document.querySelector('#connection').dataset.state === 'open'")
            assert page.locator("#banner").is_hidden()
            page.press("#input", "Enter")  # the kept message
            finished_reply(page, 1)
            texts = [m.get_attribute("data-text") for m in page.locator(".message").all()]
            assert texts[::2] == ["Are you there?", "Hello?"]
    finally:
        delete_prefix(settings.redis_key_prefix)


def test_long_unbroken_text_wraps_inside_the_window(page: Page) -> None:
    send(page, "x" * 400)
    finished_reply(page)
    # Without overflow-wrap the bubble would grow to the word's width, far past the window's left edge.
    bubble = page.locator(".message.user .bubble").bounding_box()
    window = page.viewport_size
    assert bubble is not None and window is not None
    assert bubble["x"] >= 0 and bubble["x"] + bubble["width"] <= window["width"]
    composer = page.locator("#composer").bounding_box()
    assert composer is not None and composer["y"] + composer["height"] <= window["height"]

"""The chat page's conversation features in a real browser (Chromium, as tests/e2e/test_page.py): the list
comes from the server (same key, another browser: same list), long histories load by page as you scroll
up, replies render as Markdown without ever running HTML from model text, Copy, Regenerate, Edit and
Export."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.e2e.test_page import HANG_GUARD_MS, KEY, PRESET_KEY, finished_reply, send
from tests.support import make_settings, require_redis, serving

pytest.importorskip(
    "playwright.sync_api", reason="the playwright package is not installed: pip install -e '.[dev]'"
)
from playwright.sync_api import BrowserContext, Page


@pytest.fixture(scope="module")
def base_url(tiny_checkpoint: Path) -> Iterator[str]:
    require_redis()
    with serving(make_settings(tiny_checkpoint, api_keys=[KEY], max_new_tokens=16)) as url:
        yield url


@pytest.fixture
def http(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {KEY}"}, timeout=None) as client:
        yield client


@pytest.fixture
def page(context: BrowserContext, base_url: str) -> Page:
    """The page of a user who has saved the API key."""
    context.add_init_script(PRESET_KEY)
    opened = context.new_page()
    opened.set_default_timeout(HANG_GUARD_MS)
    opened.goto(base_url)
    return opened


def open_conversation(context: BrowserContext, base_url: str, session_id: str) -> Page:
    """A fresh profile holding only the key and which conversation is open, as another browser would."""
    context.add_init_script(PRESET_KEY)
    context.add_init_script(
        "if (location.protocol.startsWith('http')) "
        f"localStorage.setItem('reformer-chat.current', {json.dumps(json.dumps(session_id))})"
    )
    opened = context.new_page()
    opened.set_default_timeout(HANG_GUARD_MS)
    opened.goto(base_url)
    return opened


def new_conversation(http: httpx.Client, items: list[dict[str, str]]) -> str:
    conv = http.post("/v1/conversations", json={"items": items[:20]}).json()
    for start in range(20, len(items), 20):
        http.post(f"/v1/conversations/{conv['id']}/items", json={"items": items[start : start + 20]})
    return conv["id"].removeprefix("conv_")


def test_the_list_comes_from_the_server_in_any_browser(
    context: BrowserContext, base_url: str, http: httpx.Client
) -> None:
    made = [new_conversation(http, [{"role": "user", "content": f"Topic {i}"}]) for i in range(3)]
    fresh = open_conversation(context, base_url, made[0])
    fresh.locator(f'#conversations li[data-id="{made[2]}"]').wait_for()
    titles = fresh.locator("#conversations .open").all_inner_texts()
    assert titles[:3] == ["Topic 2", "Topic 1", "Topic 0"]
    fresh.locator(".message .bubble").first.wait_for()
    assert fresh.locator(".message").first.get_attribute("data-text") == "Topic 0"


def test_a_long_history_loads_by_page_as_you_scroll_up(
    context: BrowserContext, base_url: str, http: httpx.Client
) -> None:
    lines = [f"line {i}" for i in range(70)]
    sid = new_conversation(http, [{"role": "user", "content": t} for t in lines])
    view = open_conversation(context, base_url, sid)
    view.wait_for_function("() => document.querySelectorAll('.message').length === 30")
    shown = [m.get_attribute("data-text") for m in view.locator(".message").all()]
    assert shown == lines[40:]
    for count in (60, 70):
        view.evaluate("document.querySelector('#messages').scrollTop = 0")
        view.wait_for_function(f"() => document.querySelectorAll('.message').length === {count}")
    shown = [m.get_attribute("data-text") for m in view.locator(".message").all()]
    assert shown == lines


def test_replies_render_as_markdown_and_never_run_html(
    context: BrowserContext, base_url: str, http: httpx.Client
) -> None:
    reply = (
        "Here:\n```python\nprint('<b>hi</b>')\n```\n**bold** and `x < y` "
        '<img src=x onerror="window.injected=1"> [bad](javascript:window.injected=2) '
        "[good](https://example.com/a)\n- one\n- two"
    )
    sid = new_conversation(
        http, [{"role": "user", "content": "Show me"}, {"role": "assistant", "content": reply}]
    )
    context.grant_permissions(["clipboard-read", "clipboard-write"])
    view = open_conversation(context, base_url, sid)
    bubble = view.locator(".message.assistant .bubble")
    bubble.locator("pre code").wait_for()
    assert bubble.locator("pre code").text_content() == "print('<b>hi</b>')"
    assert bubble.locator("pre code").get_attribute("data-language") == "python"
    assert bubble.locator("strong").text_content() == "bold"
    assert bubble.locator("p code").text_content() == "x < y"
    assert bubble.locator("li").all_text_contents() == ["one", "two"]
    links = bubble.locator("a")
    assert links.count() == 1 and links.get_attribute("href") == "https://example.com/a"
    assert "[bad](javascript:window.injected=2)" in (bubble.text_content() or "")
    assert view.locator(".messages img, .messages b, .messages script").count() == 0
    assert view.evaluate("window.injected") is None
    view.click(".message.assistant .copy")
    view.wait_for_function(
        "() => document.querySelector('.message.assistant .copy').textContent === 'Copied'"
    )
    assert view.evaluate("navigator.clipboard.readText()") == reply


def test_regenerate_edit_and_export(page: Page, http: httpx.Client) -> None:
    send(page, "First question")
    finished_reply(page)
    session_id = json.loads(page.evaluate("localStorage.getItem('reformer-chat.current')"))
    page.click(".message.assistant .regenerate")
    page.wait_for_function("() => !document.querySelector('.message.assistant.streaming')")
    page.locator(".message.assistant .regenerate").wait_for()
    stored = http.get(f"/v1/sessions/{session_id}").json()["messages"]
    assert [m["content"] for m in stored] == [
        m.get_attribute("data-text") for m in page.locator(".message").all()
    ]
    assert page.locator(".message.assistant").get_attribute("data-id") == stored[1]["id"]

    page.click(".message.user .edit")
    assert page.input_value("#input") == "First question" and page.locator("#editing").is_visible()
    page.fill("#input", "A better question")
    page.press("#input", "Enter")
    page.wait_for_function(
        "() => document.querySelector('.message.user').dataset.text === 'A better question'"
        " && document.querySelector('.message.assistant .regenerate') !== null"
    )
    stored = http.get(f"/v1/sessions/{session_id}").json()["messages"]
    assert stored[0]["content"] == "A better question" and len(stored) == 2
    assert [m["content"] for m in stored] == [
        m.get_attribute("data-text") for m in page.locator(".message").all()
    ]
    assert page.locator("#editing").is_hidden()

    with page.expect_download() as download:
        page.click("#export-md")
    text = Path(download.value.path()).read_text()
    assert text.startswith("# A better question") and stored[1]["content"] in text
    with page.expect_download() as download:
        page.click("#export-json")
    exported = json.loads(Path(download.value.path()).read_text())
    assert [m["content"] for m in exported["messages"]] == [m["content"] for m in stored]

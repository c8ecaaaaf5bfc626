"""The browser fixtures of the page tests (tests/e2e/test_page*.py): one headless Chromium (Debian's
`chromium`) per module, and a fresh profile per test whose pages must raise no uncaught JS error.
Playwright is imported when a fixture runs, so the rest of the e2e suite runs where it is not installed;
the page tests then skip with the reason."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from playwright.sync_api import Browser, BrowserContext

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
LAUNCH_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if CHROMIUM is None:
        pytest.skip(
            "no chromium on PATH: install Debian's `chromium` package (scripts/test.sh does, as root)"
        )
    playwright = pytest.importorskip(
        "playwright.sync_api", reason="the playwright package is not installed: pip install -e '.[dev]'"
    )
    with playwright.sync_playwright() as driver:
        launched = driver.chromium.launch(executable_path=CHROMIUM, headless=True, args=LAUNCH_ARGS)
        yield launched
        launched.close()


@pytest.fixture
def context(browser: Browser) -> Iterator[BrowserContext]:
    """A fresh profile (empty localStorage) per test, whose pages must raise no uncaught JS error."""
    ctx = browser.new_context(viewport={"width": 1100, "height": 720})
    errors: list[str] = []
    ctx.on("page", lambda page: page.on("pageerror", lambda error: errors.append(str(error))))
    yield ctx
    ctx.close()
    assert errors == []

"""Noticing that an HTTP client hung up while its reply is still being generated."""

from __future__ import annotations

from collections.abc import Callable

from starlette.requests import Request


async def watch_disconnect(request: Request, on_disconnect: Callable[[], object]) -> None:
    """Call `on_disconnect()` when the client hangs up; run it as a task once the body is read (from then
    on, receive() only returns at the disconnect). Both the REST turn and the OpenAI completion use it to
    cancel their generation."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    on_disconnect()

"""Websocket: every message frame the server reads ends in exactly one `done` or `error` frame (issue 14).

Faults are injected into the real server (it runs in this process's thread, so a test can wrap one of
its functions): a delay right after a terminal frame is sent (the client answers it before the server
is past it), and an exception while a turn is set up or answered. The client must get one terminal
frame per message, never a silent close or a busy refusal for a message it sent after `done`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from websockets.sync.client import ClientConnection

from app.chat import ChatService
from app.routes import stream
from tests.support import LiveServerFactory, frame, open_ws, quiet_params, send

KEY = "delivery-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


class Injected(RuntimeError):
    """The fault a test injected."""


@pytest.fixture(scope="module")
def base_url(live_server: LiveServerFactory) -> Iterator[str]:
    with live_server(api_keys=[KEY]) as live:
        yield live.url


@pytest.fixture
def session_id(base_url: str) -> str:
    response = httpx.post(f"{base_url}/v1/sessions", headers=AUTH)
    return str(response.json()["session_id"])


def terminal(ws: ClientConnection) -> dict[str, Any]:
    """The frame that ends the current message: the first `done` or `error`."""
    while (event := frame(ws))["type"] not in ("done", "error"):
        pass
    return event


def test_a_message_sent_the_moment_done_arrives_is_never_refused_as_busy(
    base_url: str, session_id: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    send_frame = stream._Connection._send

    async def slow_after_terminal(self: stream._Connection, out: dict[str, Any]) -> None:
        await send_frame(self, out)
        if out["type"] in ("done", "error"):
            await asyncio.sleep(0.1)  # the client reads the frame and answers while the server is here

    monkeypatch.setattr(stream._Connection, "_send", slow_after_terminal)
    with open_ws(base_url, session_id, AUTH) as ws:
        ends = []
        for i in range(3):
            send(ws, type="message", content=f"message {i}", **quiet_params(max_tokens=2))
            ends.append(terminal(ws))
    assert [e["type"] for e in ends] == ["done", "done", "done"], ends


@pytest.mark.parametrize("where", ["setting up the turn", "answering the turn"])
def test_an_exception_in_a_turn_gets_one_error_frame_and_the_socket_stays_usable(
    base_url: str, session_id: str, monkeypatch: pytest.MonkeyPatch, where: str
) -> None:
    fired = False

    def once(real: Any) -> Any:
        def failing(*args: Any, **kwargs: Any) -> Any:
            nonlocal fired
            if not fired:
                fired = True
                raise Injected(where)
            return real(*args, **kwargs)

        return failing

    if where == "setting up the turn":
        monkeypatch.setattr(ChatService, "sampling_params", once(ChatService.sampling_params))
    else:
        monkeypatch.setattr(stream, "reply_out", once(stream.reply_out))
    with open_ws(base_url, session_id, AUTH) as ws:
        send(ws, type="message", content="first", **quiet_params(max_tokens=2))
        failed = terminal(ws)
        send(ws, type="message", content="second", **quiet_params(max_tokens=2))
        after = terminal(ws)
    assert failed["type"] == "error" and failed["error"]["code"] == "internal_error", failed
    assert after["type"] == "done", after

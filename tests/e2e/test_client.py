"""The terminal client (`python -m app.client`, `reformer-chat chat`) driven through its stdin and stdout
against a live server: streamed replies, /new, /history, /quit, resuming, Ctrl-C stopping a reply,
/sessions, /regenerate, /edit and /export."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.client import printable
from model.tokenizer import ChatTokenizer
from tests.support import LiveServerFactory, endless_params

KEY = "client-key"
MAX_TOKENS = 4000
PROMPT = "you> "
# A bound on waiting for the client's next output: a failure with its output, not a hung test.
EXPECT_SECONDS = 120


@pytest.fixture(scope="module")
def base_url(live_server: LiveServerFactory) -> Iterator[str]:
    with live_server(api_keys=[KEY], max_new_tokens=MAX_TOKENS) as live:
        yield live.url


@pytest.fixture
def http(base_url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=base_url, headers={"Authorization": f"Bearer {KEY}"}, timeout=None) as client:
        yield client


class Terminal:
    """A client process whose merged stdout/stderr is read by a thread, so `expect` never blocks the
    process on a full pipe; `expect` waits (no time limit: pytest-timeout bounds a hung test)."""

    def __init__(self, args: list[str]) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "NO_COLOR": "1"}
        env.pop("REFORMER_CHAT_API_KEY", None)
        self.process = subprocess.Popen(
            args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env
        )
        self.output = ""
        self._seen = 0
        self._changed = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        decoder_buffer = b""
        while chunk := os.read(self.process.stdout.fileno(), 4096):
            decoder_buffer += chunk
            try:
                text, decoder_buffer = decoder_buffer.decode(), b""
            except UnicodeDecodeError:  # a character split across reads: wait for the rest
                continue
            with self._changed:
                self.output += text
                self._changed.notify_all()
        with self._changed:
            self.output += "\n<EOF>"
            self._changed.notify_all()

    def expect(self, pattern: str) -> re.Match[str]:
        """The next match of `pattern` in the output after the previous match."""
        regex = re.compile(pattern, re.DOTALL)
        with self._changed:

            def seen() -> bool:
                return regex.search(self.output, self._seen) is not None or self.output.endswith("<EOF>")

            if not self._changed.wait_for(seen, timeout=EXPECT_SECONDS):
                raise AssertionError(f"no {pattern!r} within {EXPECT_SECONDS} s:\n{self.output}")
            match = regex.search(self.output, self._seen)
            assert match, f"client exited before {pattern!r}:\n{self.output}"
            self._seen = match.end()
            return match

    def send(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line.encode() + b"\n")
        self.process.stdin.flush()

    def close(self) -> int:
        if self.process.stdin is not None:
            self.process.stdin.close()
        code = self.process.wait()
        self._reader.join()
        return code


@pytest.fixture
def terminals() -> Iterator[list[Terminal]]:
    started: list[Terminal] = []
    yield started
    for terminal in started:
        if terminal.process.poll() is None:
            terminal.process.kill()
        terminal.close()


def start(terminals: list[Terminal], base_url: str, *args: str, module: bool = True) -> Terminal:
    entry = ["-m", "app.client"] if module else ["-m", "app.cli", "chat"]
    terminal = Terminal([sys.executable, *entry, "--url", base_url, "--api-key", KEY, *args])
    terminals.append(terminal)
    return terminal


def session_of(terminal: Terminal) -> str:
    return terminal.expect(r"new session ([A-Za-z0-9_-]+)").group(1)


def test_a_conversation_streams_and_shows_its_history(
    base_url: str, http: httpx.Client, terminals: list[Terminal]
) -> None:
    terminal = start(terminals, base_url, "--temperature", "0", "--max-tokens", "12")
    session_id = session_of(terminal)
    terminal.expect(PROMPT)
    terminal.send("Hello, terminal!")
    reply = terminal.expect(r"bot> (.*?)\n\[(stop|length) · (\d+) tokens in context\]")
    terminal.expect(PROMPT)
    stored = http.get(f"/v1/sessions/{session_id}").json()
    assert [m["content"] for m in stored["messages"]] == [
        "Hello, terminal!",
        stored["messages"][1]["content"],
    ]
    assert reply.group(1) == printable(stored["messages"][1]["content"])
    assert int(reply.group(3)) == stored["context_tokens"]
    terminal.send("/history")
    history = terminal.expect(
        r"user> Hello, terminal!\nassistant> (.*?)  \[(\w+)\]\n\[2 messages, (\d+) tokens"
    )
    assert history.group(1) == reply.group(1)
    terminal.send("/quit")
    assert terminal.close() == 0


def test_new_starts_another_session_and_resume_continues_one(
    base_url: str, http: httpx.Client, terminals: list[Terminal]
) -> None:
    first = start(terminals, base_url, "--temperature", "0", "--max-tokens", "4", module=False)
    old_session = session_of(first)
    first.expect(PROMPT)
    first.send("First conversation.")
    first.expect(r"tokens in context\]")
    first.send("/new")
    new_session = session_of(first)
    assert new_session != old_session
    first.send("/history")
    first.expect(r"\(no messages yet\)\n\[0 messages, 0 tokens")
    first.send("Another conversation.")  # on a new websocket, to the new session
    first.expect(r"tokens in context\]")
    first.send("/quit")
    assert first.close() == 0
    messages = http.get(f"/v1/sessions/{new_session}").json()["messages"]
    assert [m["content"] for m in messages][:1] == ["Another conversation."]

    resumed = start(
        terminals, base_url, f"--session={old_session}", "--temperature", "0", "--max-tokens", "4"
    )
    resumed.expect(rf"resumed session {old_session} \(2 messages")
    resumed.send("Second message.")
    resumed.expect(r"tokens in context\]")
    resumed.send("/history")
    resumed.expect(r"user> First conversation\..*user> Second message\..*\[4 messages")
    assert resumed.close() == 0  # EOF on stdin (Ctrl-D) leaves too


def test_ctrl_c_stops_the_reply_and_keeps_the_client(
    base_url: str, http: httpx.Client, terminals: list[Terminal], tokenizer: ChatTokenizer
) -> None:
    endless = endless_params(tokenizer, MAX_TOKENS)
    terminal = start(
        terminals,
        base_url,
        "--temperature",
        "0",
        "--max-tokens",
        str(MAX_TOKENS),
        "--param",
        f"logit_bias={json.dumps(endless['logit_bias'])}",
    )
    session_id = session_of(terminal)
    terminal.expect(PROMPT)
    terminal.send("Talk forever.")
    terminal.expect(r"bot> \S")  # streaming
    terminal.process.send_signal(signal.SIGINT)
    terminal.expect(r"\[cancelled · \d+ tokens in context\]")
    terminal.expect(PROMPT)
    assert terminal.process.poll() is None  # still running
    reply = http.get(f"/v1/sessions/{session_id}").json()["messages"][1]
    assert reply["finish_reason"] == "cancelled"
    terminal.send("/help")
    terminal.expect(r"/quit")
    terminal.send("/quit")
    assert terminal.close() == 0


def test_an_unreachable_server_or_a_wrong_key_is_a_clear_error(
    base_url: str, terminals: list[Terminal]
) -> None:
    wrong = Terminal([sys.executable, "-m", "app.client", "--url", base_url, "--api-key", "wrong"])
    terminals.append(wrong)
    wrong.expect(r"error: the server refused the API key: pass --api-key")
    assert wrong.close() == 1
    # Port 9 (discard) on loopback: nothing listens there in a test environment.
    down = Terminal([sys.executable, "-m", "app.client", "--url", "http://127.0.0.1:9"])
    terminals.append(down)
    down.expect(r"error: cannot reach the server at http://127.0.0.1:9")
    assert down.close() == 1


def test_sessions_regenerate_edit_and_export(
    base_url: str, http: httpx.Client, terminals: list[Terminal], tmp_path: Path
) -> None:
    terminal = start(terminals, base_url, "--temperature", "0", "--max-tokens", "6")
    first = session_of(terminal)
    terminal.expect(PROMPT)
    terminal.send("Hello there.")
    terminal.expect(r"tokens in context\]")
    terminal.send("/regenerate")  # greedy: the same reply again, in place of the old one
    regenerated = terminal.expect(r"bot> (.*?)\n\[(\w+) · (\d+) tokens in context\]")
    stored = http.get(f"/v1/sessions/{first}").json()["messages"]
    assert len(stored) == 2 and printable(stored[1]["content"]) == regenerated.group(1)
    terminal.send("/edit Goodbye now.")
    terminal.expect(r"tokens in context\]")
    stored = http.get(f"/v1/sessions/{first}").json()["messages"]
    assert [m["content"] for m in stored][:1] == ["Goodbye now."] and len(stored) == 2
    out = tmp_path / "chat.md"
    terminal.send(f"/export {out}")
    terminal.expect(r"saved this conversation to")
    assert out.read_text().startswith("# Goodbye now.")
    terminal.send("/new")
    second = session_of(terminal)
    terminal.send("/sessions")
    listing = terminal.expect(r"\*\s+1\. \(untitled\).*?\n\s+2\. Goodbye now\.")
    assert listing
    terminal.send("/sessions 2")
    terminal.expect(rf"switched to session {first} \(2 messages")
    terminal.send("/edit")
    terminal.expect(r"error: /edit takes the new text")
    terminal.send("/quit")
    assert terminal.close() == 0
    assert second != first

"""`python -m app.client` (or `reformer-chat chat`): chat with a running server from a terminal.

It creates a session (or resumes one with --session), streams each reply over the websocket as it is
generated, and understands /new, /sessions (list yours; /sessions N switches to the Nth), /history,
/regenerate (a new last reply), /edit TEXT (replace your last message and answer it), /export FILE
(Markdown for .md, else JSON), /help and /quit. Ctrl-C while a reply streams stops that reply
(the server stores what was generated, as "cancelled") and returns to the prompt; Ctrl-C at the prompt
clears the line, and /quit or Ctrl-D leaves.

Model text is printed with control characters made visible, so a reply can never drive the terminal
(escape sequences that move the cursor, change the title, ...).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from types import FrameType
from typing import Any

import httpx
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.sync.client import ClientConnection, connect

DEFAULT_URL = "http://127.0.0.1:8000"
URL_ENV = "REFORMER_CHAT_URL"
API_KEY_ENV = "REFORMER_CHAT_API_KEY"
# How often a streaming reply checks for Ctrl-C between frames.
_POLL_SECONDS = 0.2
# C0 and C1 control characters except tab and newline: shown, never obeyed by the terminal.
_CONTROLS = {c: "\ufffd" for c in [*range(0x00, 0x09), *range(0x0B, 0x20), *range(0x7F, 0xA0)]}
HELP = """commands:
  /new          start a new conversation
  /sessions     list your conversations, newest first; /sessions N switches to the Nth
  /history      show this conversation so far
  /regenerate   replace the last reply with a new one
  /edit TEXT    replace your last message with TEXT, and answer it again
  /export FILE  save this conversation (Markdown if FILE ends in .md, else JSON)
  /help         this list
  /quit         leave (Ctrl-D too)
Ctrl-C stops a reply that is streaming."""
SESSIONS_SHOWN = 20


class ClientError(Exception):
    """Something the user should read (server unreachable, refused key, ...); the message says what to do."""


def printable(text: str) -> str:
    return text.translate(_CONTROLS)


def parse_param(raw: str) -> tuple[str, Any]:
    """`NAME=VALUE` with VALUE read as JSON when it is JSON (numbers, objects), else as a string."""
    name, sep, value = raw.partition("=")
    if not sep or not name:
        raise argparse.ArgumentTypeError(f"--param takes NAME=VALUE, e.g. top_k=20; got {raw!r}")
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        return name, value


class ChatClient:
    """One server, one current session, one websocket to it."""

    def __init__(self, base_url: str, api_key: str | None, sampling: dict[str, Any]) -> None:
        self.base_url = base_url.rstrip("/")
        self._headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._sampling = sampling
        self._http = httpx.Client(base_url=self.base_url, headers=self._headers, timeout=30.0)
        self._ws: ClientConnection | None = None
        # Holds the open websocket (connections are context managers); closing it closes the socket.
        self._ws_stack = contextlib.ExitStack()
        self.session_id: str | None = None

    # --- REST ---------------------------------------------------------------------------------------
    def _request(
        self, method: str, path: str, body: dict[str, Any] | None = None, *, raw: bool = False
    ) -> Any:
        """The JSON answer (the body as text when `raw`); a ClientError that says what went wrong."""
        try:
            response = self._http.request(method, path, json=body, timeout=None if body is not None else 30.0)
        except httpx.HTTPError as exc:
            raise ClientError(f"cannot reach the server at {self.base_url} ({exc}): is it running?") from exc
        if response.status_code == 401:
            raise ClientError(f"the server refused the API key: pass --api-key or set {API_KEY_ENV}")
        if response.is_error:
            try:
                message = response.json()["error"]["message"]
            except (ValueError, KeyError, TypeError):
                message = response.text
            raise ClientError(f"the server answered {response.status_code}: {message}")
        return response.text if raw else response.json()

    def new_session(self) -> str:
        self.close_socket()
        self.session_id = self._request("POST", "/v1/sessions")["session_id"]
        return self.session_id

    def resume(self, session_id: str) -> list[dict[str, Any]]:
        """Make `session_id` current; its messages so far."""
        self.close_socket()
        messages = self._request("GET", f"/v1/sessions/{session_id}")["messages"]
        self.session_id = session_id
        return messages

    def history(self) -> tuple[list[dict[str, Any]], int]:
        record = self._request("GET", f"/v1/sessions/{self.session_id}")
        return record["messages"], record["context_tokens"]

    def sessions(self) -> list[dict[str, Any]]:
        """This key's conversations, newest first (the first page)."""
        return self._request("GET", f"/v1/sessions?limit={SESSIONS_SHOWN}")["sessions"]

    def regenerate(self) -> dict[str, Any]:
        """A new last reply (the server cuts the old one and answers again); the reply body."""
        return self._request("POST", f"/v1/sessions/{self.session_id}/regenerate", dict(self._sampling))

    def edit(self, content: str) -> dict[str, Any]:
        """Replace the last user message (and its reply) with `content`, answered; the reply body."""
        body = {"content": content, **self._sampling}
        return self._request("POST", f"/v1/sessions/{self.session_id}/edit", body)

    def export(self, markdown: bool) -> str:
        fmt = "markdown" if markdown else "json"
        return self._request("GET", f"/v1/sessions/{self.session_id}/export?format={fmt}", raw=True)

    # --- websocket ----------------------------------------------------------------------------------
    def _socket(self) -> ClientConnection:
        if self._ws is None:
            ws_url = self.base_url.replace("http://", "ws://", 1).replace("https://", "wss://", 1)
            try:
                self._ws = self._ws_stack.enter_context(
                    connect(
                        f"{ws_url}/v1/sessions/{self.session_id}/stream",
                        additional_headers=self._headers,
                        proxy=None,
                        ping_interval=None,
                    )
                )
            except (OSError, InvalidHandshake) as exc:
                detail = f"HTTP {exc.response.status_code}" if isinstance(exc, InvalidStatus) else str(exc)
                raise ClientError(f"cannot open the stream to {self.base_url} ({detail})") from exc
        return self._ws

    def close_socket(self) -> None:
        self._ws = None
        self._ws_stack.close()

    def close(self) -> None:
        self.close_socket()
        self._http.close()

    def reply(
        self, content: str, write: Callable[[str], None], interrupted: threading.Event
    ) -> dict[str, Any]:
        """Send a message and write the reply's text as it streams; the final `done` frame.

        `interrupted` set (by Ctrl-C) sends a cancel: the reply stops within a decode step and the
        server still stores it, as "cancelled".
        """
        ws = self._socket()
        try:
            ws.send(json.dumps({"type": "message", "content": content, **self._sampling}))
            cancel_sent = False
            while True:
                if interrupted.is_set() and not cancel_sent:
                    ws.send(json.dumps({"type": "cancel"}))
                    cancel_sent = True
                try:
                    frame = json.loads(ws.recv(timeout=_POLL_SECONDS))
                except TimeoutError:
                    continue
                if frame["type"] == "token":
                    write(frame["text"])
                elif frame["type"] == "done":
                    return frame
                elif frame["type"] == "error":
                    raise ClientError(frame["error"]["message"])
        except ConnectionClosed as exc:
            self.close_socket()  # the next message reconnects
            raise ClientError(f"lost the connection to the server ({exc}); send again to reconnect") from exc


class _Terminal:
    """The prompt loop: reads lines, runs commands, prints replies."""

    def __init__(self, client: ChatClient, read: Callable[[str], str] = input) -> None:
        self.client = client
        self.read = read
        self.color = sys.stdout.isatty() and "NO_COLOR" not in os.environ

    def _dim(self, text: str) -> str:
        return f"\033[2m{text}\033[0m" if self.color else text

    def say(self, text: str) -> None:
        print(self._dim(text), flush=True)

    def run(self) -> int:
        while True:
            try:
                line = self.read("you> ")
            except EOFError:
                print()
                return 0
            except KeyboardInterrupt:
                print("\n(Ctrl-C stops a reply; /quit or Ctrl-D leaves)", flush=True)
                continue
            command = line.strip()
            if not command:
                continue
            try:
                if command == "/quit":
                    return 0
                self._handle(command)
            except ClientError as exc:
                print(f"error: {exc}", file=sys.stderr, flush=True)

    def _handle(self, command: str) -> None:
        name, _, argument = command.partition(" ")
        argument = argument.strip()
        if command == "/new":
            self.say(f"new session {self.client.new_session()}")
        elif name == "/sessions":
            self.sessions(argument)
        elif command == "/history":
            self.show_history()
        elif command == "/regenerate":
            self._finished(self.client.regenerate())
        elif name == "/edit":
            if not argument:
                raise ClientError("/edit takes the new text of your last message: /edit TEXT")
            self._finished(self.client.edit(argument))
        elif name == "/export":
            self.export(argument)
        elif command == "/help":
            self.say(HELP)
        elif command.startswith("/") and " " not in command:
            self.say(f"unknown command {command}; /help lists them")
        else:
            self._reply(command)

    def sessions(self, argument: str) -> None:
        listed = self.client.sessions()
        if argument:
            if not argument.isdigit() or not 1 <= int(argument) <= len(listed):
                raise ClientError(f"/sessions N takes a number from the list (1..{len(listed)})")
            chosen = listed[int(argument) - 1]["session_id"]
            messages = self.client.resume(chosen)
            self.say(f"switched to session {chosen} ({len(messages)} messages; /history shows them)")
            return
        if not listed:
            self.say("(no conversations yet)")
        for number, item in enumerate(listed, 1):
            mark = "*" if item["session_id"] == self.client.session_id else " "
            title = printable(item["title"]) or "(untitled)"
            print(
                f"{mark}{number:>3}. {title}  "
                + self._dim(f"[{item['message_count']} messages · updated {item['updated_at']}]"),
                flush=True,
            )

    def export(self, path: str) -> None:
        if not path:
            raise ClientError("/export takes a file name: /export chat.md (Markdown) or chat.json")
        text = self.client.export(markdown=path.endswith(".md"))
        try:
            with open(path, "w", encoding="utf-8") as out:
                out.write(text)
        except OSError as exc:
            raise ClientError(f"cannot write {path}: {exc.strerror}") from exc
        self.say(f"saved this conversation to {path}")

    def _finished(self, reply: dict[str, Any]) -> None:
        """A reply answered over REST (regenerate, edit): printed whole."""
        print(f"bot> {printable(reply['message']['content'])}", flush=True)
        reason = reply["message"].get("finish_reason")
        self.say(f"[{reason} · {reply['usage']['context_tokens']} tokens in context]")

    def show_history(self) -> None:
        messages, context = self.client.history()
        if not messages:
            self.say("(no messages yet)")
        for message in messages:
            reason = message.get("finish_reason")
            suffix = self._dim(f"  [{reason}]") if reason else ""
            print(f"{message['role']}> {printable(message['content'])}{suffix}", flush=True)
        self.say(f"[{len(messages)} messages, {context} tokens in context]")

    def _reply(self, content: str) -> None:
        interrupted = threading.Event()

        def on_sigint(signum: int, frame: FrameType | None) -> None:
            interrupted.set()

        previous = signal.signal(signal.SIGINT, on_sigint)
        print("bot> ", end="", flush=True)
        try:
            done = self.client.reply(
                content, lambda text: print(printable(text), end="", flush=True), interrupted
            )
        finally:
            signal.signal(signal.SIGINT, previous)
            print(flush=True)
        reason = done["message"].get("finish_reason")
        self.say(f"[{reason} · {done['usage']['context_tokens']} tokens in context]")


def add_client_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--url",
        default=os.environ.get(URL_ENV, DEFAULT_URL),
        help=f"server URL (default: ${URL_ENV} or {DEFAULT_URL})",
    )
    parser.add_argument(
        "--api-key", default=os.environ.get(API_KEY_ENV), help=f"API key (default: ${API_KEY_ENV})"
    )
    parser.add_argument(
        "--session",
        help="resume this session id instead of starting a new one; write --session=ID "
        "(an id may start with '-')",
    )
    parser.add_argument("--temperature", type=float, help="sampling temperature (0 = greedy)")
    parser.add_argument("--max-tokens", type=int, help="longest reply, in tokens")
    parser.add_argument(
        "--param",
        type=parse_param,
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="any other sampling field of the API, VALUE as JSON (e.g. top_k=20, stop='[\"\\n\"]')",
    )


def run(args: argparse.Namespace) -> int:
    """Run the terminal client with parsed arguments; the process exit status."""
    sampling: dict[str, Any] = dict(args.param)
    if args.temperature is not None:
        sampling["temperature"] = args.temperature
    if args.max_tokens is not None:
        sampling["max_tokens"] = args.max_tokens
    if sys.stdin.isatty():
        import readline  # noqa: F401  (line editing and history for input(), where the platform has it)
    client = ChatClient(args.url, args.api_key, sampling)
    terminal = _Terminal(client)
    try:
        if args.session:
            messages = client.resume(args.session)
            terminal.say(f"resumed session {args.session} ({len(messages)} messages; /history shows them)")
        else:
            terminal.say(f"new session {client.new_session()}  (resume it later with --session)")
        terminal.say("type a message, or /help")
        return terminal.run()
    except ClientError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return 1
    finally:
        client.close()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m app.client", description="Chat with a reformer-chat server."
    )
    add_client_arguments(parser)
    sys.exit(run(parser.parse_args(argv)))


if __name__ == "__main__":
    main()

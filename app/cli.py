"""`reformer-chat`: the console script. `serve` runs the service; `chat` is the terminal client."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from app.client import add_client_arguments
from app.client import run as run_client


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", help="interface to listen on (default: HOST setting, 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to listen on, 0 = any free one (default: PORT, 8000)")


def serve(args: argparse.Namespace) -> None:
    # Imported here so `reformer-chat --help` answers without importing torch.
    from pydantic import ValidationError

    from app.config import Settings
    from app.server import run

    try:
        settings = Settings()
    except ValidationError as exc:
        print(f"invalid settings (environment or .env):\n{exc}", file=sys.stderr)
        sys.exit(2)
    run(settings, host=args.host, port=args.port, on_ready=_announce)


def _announce(url: str) -> None:
    print(f"reformer-chat is serving at {url}  (Ctrl+C to stop)", flush=True)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="reformer-chat", description="Long-context chat on a Reformer LM.")
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser("serve", help="run the chat service (settings from env and .env)")
    add_serve_arguments(serve_parser)
    serve_parser.set_defaults(handler=serve)
    chat_parser = commands.add_parser("chat", help="chat with a running server from this terminal")
    add_client_arguments(chat_parser)
    chat_parser.set_defaults(handler=lambda args: sys.exit(run_client(args)))
    args = parser.parse_args(argv)
    args.handler(args)


if __name__ == "__main__":
    main()

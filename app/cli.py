"""The service's one entry point: `reformer-chat serve` runs it, `reformer-chat chat` talks to it.

`python -m app` is `reformer-chat serve` (app/__main__.py). Serving is uvicorn running the app that
app/factory.py builds; the URL is printed once the server actually accepts connections. Heavy imports
(torch, the app) happen inside `run`, so `reformer-chat --help` and the terminal client start at once.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from app.client import add_client_arguments
from app.client import run as run_client

if TYPE_CHECKING:
    import uvicorn

    from app.config import Settings

# uvicorn's exit status when the app's startup fails (e.g. MODEL_DIR missing).
STARTUP_FAILURE = 3


def bound_url(server: uvicorn.Server, host: str) -> str:
    """The URL of a started server, with the real port when port 0 asked the OS to pick one."""
    port = server.servers[0].sockets[0].getsockname()[1]
    shown = f"[{host}]" if ":" in host else host
    return f"http://{shown}:{port}"


async def _serve(server: uvicorn.Server, host: str, on_ready: Callable[[str], None]) -> bool:
    task = asyncio.create_task(server.serve())
    while not server.started and not task.done():
        await asyncio.sleep(0.05)
    if server.started:
        on_ready(bound_url(server, host))
    await task
    return server.started


def run(
    settings: Settings,
    host: str | None = None,
    port: int | None = None,
    on_ready: Callable[[str], None] = lambda url: None,
) -> None:
    """Serve until interrupted, calling on_ready(url) once listening; exit status 3 when startup fails."""
    import uvicorn

    from app.factory import create_app
    from app.malloc import pin_mmap_threshold
    from app.protocols import uvicorn_config

    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    host = settings.host if host is None else host
    port = settings.port if port is None else port
    pin_mmap_threshold(settings.malloc_mmap_threshold_bytes)
    config = uvicorn_config(settings, create_app(settings), host, port)
    try:
        started = asyncio.run(_serve(uvicorn.Server(config), host, on_ready))
    except KeyboardInterrupt:
        # uvicorn shuts down gracefully on Ctrl+C/SIGINT, then re-raises the signal: that is a normal stop.
        return
    if not started:
        sys.exit(STARTUP_FAILURE)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--host", help="interface to listen on (default: HOST setting, 127.0.0.1)")
    parser.add_argument("--port", type=int, help="port to listen on, 0 = any free one (default: PORT, 8000)")


def serve(args: argparse.Namespace) -> None:
    """Read the settings (exit status 2 when they are invalid), then run the service."""
    from pydantic import ValidationError

    from app.config import Settings

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

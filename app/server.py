"""Run the app under uvicorn and print the URL once it is actually accepting connections."""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Callable

import uvicorn

from app.config import Settings
from app.factory import create_app
from app.malloc import pin_mmap_threshold

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
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    host = settings.host if host is None else host
    port = settings.port if port is None else port
    pin_mmap_threshold(settings.malloc_mmap_threshold_bytes)
    config = uvicorn.Config(
        create_app(settings),
        host=host,
        port=port,
        log_level=settings.log_level,
        lifespan="on",
        ws_max_size=settings.max_body_bytes,
        timeout_graceful_shutdown=10,
    )
    try:
        started = asyncio.run(_serve(uvicorn.Server(config), host, on_ready))
    except KeyboardInterrupt:
        # uvicorn shuts down gracefully on Ctrl+C/SIGINT, then re-raises the signal: that is a normal stop.
        return
    if not started:
        sys.exit(STARTUP_FAILURE)

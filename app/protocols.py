"""The uvicorn server's configuration, and its HTTP and websocket protocols with the bounds a public
server needs on slow or silent clients.

uvicorn queues whatever it writes in the transport's buffer and waits for the client to read it, for as
long as the client likes; it also answers every websocket ping with a pong, whether or not the client
reads them. A client that sends but never reads could therefore grow the server's memory without limit
and keep a session's turn (and its lock) open forever, and one that sends half a request header could
hold a connection for hours. These subclasses add three bounds:

- **Drain deadline.** When the transport's buffer passes its high-water mark (the client is not reading),
  a timer starts; if the buffer has not drained below the low-water mark within SEND_TIMEOUT_SECONDS,
  the connection is aborted. The app then sees an ordinary disconnect: its turn is stored as cancelled
  and the session lock released.
- **Websocket backpressure.** While the client is not reading, the websocket reads nothing more from it:
  no frame is parsed, so no pong (or error frame) is queued for it. What one connection can queue is
  then the high-water mark plus what one read brought in, not what the client chooses to send.
- **Header deadline and size.** A request's header must arrive whole within HEADER_TIMEOUT_SECONDS of the
  connection (or of the previous response) and within MAX_HEADER_BYTES; otherwise the connection is
  closed (a 400 for an oversized header).

`uvicorn_config()` is the one place these are put together with the rest of uvicorn's settings, for
`reformer-chat serve` (app/cli.py) and the tests' servers alike.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import Any

import uvicorn
from starlette.types import ASGIApp
from uvicorn._types import ASGIReceiveEvent, ASGISendEvent
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from app.config import Settings

logger = logging.getLogger(__name__)

# A request line plus headers larger than this is refused (h11's default limit is 16 KiB; this leaves
# room for long cookies and tokens set by a proxy).
MAX_HEADER_BYTES = 64 * 1024


class DrainDeadline:
    """Aborts a transport whose peer has not drained its write buffer within `timeout` seconds."""

    def __init__(self, timeout: float) -> None:
        self._timeout = timeout
        self._timer: asyncio.TimerHandle | None = None

    def arm(self, transport: asyncio.Transport) -> None:
        if self._timer is None:
            self._timer = asyncio.get_running_loop().call_later(self._timeout, self._expire, transport)

    def disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _expire(self, transport: asyncio.Transport) -> None:
        # (Not isinstance checks: uvloop's transports are not asyncio.Transport subclasses.)
        self._timer = None
        logger.info(
            "dropping a connection whose client read nothing for %.0f s (%d bytes queued for it)",
            self._timeout,
            transport.get_write_buffer_size(),
        )
        transport.abort()  # close() would wait for the buffer to drain, which is the problem


class BoundedWebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's websocket protocol, reading nothing while its client reads nothing, with a drain deadline."""

    def __init__(self, *args: Any, send_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline = DrainDeadline(send_timeout)
        self._draining = False

    def pause_writing(self) -> None:
        super().pause_writing()
        self.transport.pause_reading()  # no more frames parsed, so no more pongs queued
        self._deadline.arm(self.transport)

    def resume_writing(self) -> None:
        super().resume_writing()
        self._deadline.disarm()
        if not self.read_paused:  # the app's own backpressure (an unread message) still holds
            self.transport.resume_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self._deadline.disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._draining:
            return  # the rest of a refused frame: read and dropped, so that closing sends no reset
        super().data_received(data)

    def handle_parser_exception(self) -> None:
        """A frame the parser refused (1009 too big, 1002 malformed): the close frame, then a half-close.

        uvicorn writes the close frame and closes the socket at once; with the rest of an oversized frame
        still unread, the kernel answers that close with a reset, which can destroy the close frame
        before the client reads it (seen as a close without a code). Here the rest is read and dropped
        until the client closes its side, or the close timeout passes.
        """
        close = self.conn.close_sent
        assert close is not None
        self.queue.put_nowait({"type": "websocket.disconnect", "code": close.code, "reason": close.reason})
        self.transport.write(b"".join(self.conn.data_to_send()))
        self.close_sent = True
        self._draining = True
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.close_timer = asyncio.get_running_loop().call_later(self.close_timeout, self.transport.close)

    async def send(self, message: ASGISendEvent) -> None:
        await super().send(message)
        if message["type"] == "websocket.http.response.body" and not message.get("more_body", False):
            # A refused handshake (an HTTP answer instead of 101) is complete: without this uvicorn
            # logs "ASGI callable returned without completing handshake" for every refused client.
            self.handshake_complete = True

    async def receive(self) -> ASGIReceiveEvent:
        """uvicorn's receive, except that reading stays paused while writing is."""
        message = await self.queue.get()
        if self.read_paused and self.queue.empty():
            self.read_paused = False
            if self.writable.is_set():
                self.transport.resume_reading()
        return message


class BoundedHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with a header deadline, a header size cap and a drain deadline."""

    def __init__(self, *args: Any, send_timeout: float, header_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._deadline = DrainDeadline(send_timeout)
        self._header_timeout = header_timeout
        self._header_timer: asyncio.TimerHandle | None = None
        self._header_bytes = 0

    def _arm_header_timer(self) -> None:
        self._disarm_header_timer()
        self._header_timer = self.loop.call_later(self._header_timeout, self._header_timed_out)

    def _disarm_header_timer(self) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if not self.transport.is_closing():
            logger.info(
                "closing a connection that sent no complete request header in %.0f s", self._header_timeout
            )
            self.transport.abort()

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_header_timer()
        self._deadline.disarm()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._header_bytes = 0
        if self._header_timer is None:  # a keep-alive connection's next request
            self._arm_header_timer()

    def _count_header(self, size: int) -> None:
        self._header_bytes += size
        if self._header_bytes > MAX_HEADER_BYTES:
            # Raised inside a parser callback: httptools stops, and uvicorn answers 400 and closes.
            raise ValueError(f"request header over {MAX_HEADER_BYTES} bytes")

    def on_url(self, url: bytes) -> None:
        self._count_header(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        self._count_header(len(name) + len(value) + 4)
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._disarm_header_timer()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.cycle is not None and not self.pipeline:
            self._arm_header_timer()

    def pause_writing(self) -> None:
        super().pause_writing()
        self._deadline.arm(self.transport)

    def resume_writing(self) -> None:
        super().resume_writing()
        self._deadline.disarm()


def uvicorn_config(settings: Settings, app: ASGIApp, host: str, port: int) -> uvicorn.Config:
    """The server's uvicorn settings, in one place for `reformer-chat serve` and the tests' servers.

    Forwarded headers are believed only from TRUSTED_PROXY_IPS (uvicorn alone trusts loopback), so the
    client address that rate limits and fair shares count under cannot be chosen by the client.
    """
    return uvicorn.Config(
        app,
        host=host,
        port=port,
        log_level=settings.log_level,
        lifespan="on",
        http=functools.partial(  # type: ignore[arg-type]
            BoundedHttpProtocol,
            send_timeout=settings.send_timeout_seconds,
            header_timeout=settings.header_timeout_seconds,
        ),
        ws=functools.partial(  # type: ignore[arg-type]
            BoundedWebSocketProtocol, send_timeout=settings.send_timeout_seconds
        ),
        ws_max_size=settings.max_body_bytes,
        # A token frame is a few dozen bytes: deflating each one costs the event loop CPU per token
        # (shared with the engine thread under the GIL) and saves nothing.
        ws_per_message_deflate=False,
        proxy_headers=bool(settings.trusted_proxy_ips),
        forwarded_allow_ips=list(settings.trusted_proxy_ips),
        limit_concurrency=settings.max_connections or None,
        timeout_graceful_shutdown=10,
    )

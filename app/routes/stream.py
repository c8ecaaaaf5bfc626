"""Websocket `/v1/sessions/{id}/stream`: several turns per connection, tokens streamed as generated.

Client frames: `{"type": "message", "content": ..., <sampling fields>}` and `{"type": "cancel"}`.
Server frames: `start`, `token` (texts concatenate to exactly the stored reply), `done`, `error`.
One turn at a time per connection: a message sent while a reply is streaming gets an error frame
(`session_busy`), as a second turn on a busy session gets 409 over REST. A bad frame (invalid JSON, an
unknown type, a binary frame) gets an error frame and the socket stays usable; a frame over the server's
size limit closes it with 1009 (uvicorn's `ws_max_size`), invalid UTF-8 with 1007. The handshake is
refused before it is accepted, as an HTTP answer, for a browser page of a foreign origin (403,
app/security.py), a bad key (401) and a session that is missing or another key's (404).
Each frame but a cancel spends the caller's rate-limit budget like a REST request. A disconnect or a
cancel stops generation within one decode step, and the turn is stored with what was generated, as
"cancelled"; so does a client that reads nothing for SEND_TIMEOUT_SECONDS (app/protocols.py).

Every message frame the server reads ends in exactly one `done` or `error` frame for it (or the socket
closes): a busy refusal is its error frame; a turn's one terminal frame is sent in one place
(`_Connection._answer`), whatever failed, an unexpected exception included (`internal_error`); and the
connection is idle again before that frame goes out, so a client that answers it at once is never
refused as busy.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import MutableMapping
from typing import Any

from fastapi import APIRouter, WebSocket
from fastapi.responses import JSONResponse
from pydantic import TypeAdapter, ValidationError
from starlette.websockets import WebSocketDisconnect

from app.auth import bearer_token
from app.chat import ChatService, Turn, TurnOutcome
from app.deps import ServicesDep, valid_session_id
from app.errors import InvalidRequest, ServiceError, SessionBusy
from app.ratelimit import RateLimiter, caller_identity
from app.routes.chat import reply_out
from app.schemas import CancelFrame, ClientFrame, MessageFrame
from app.security import websocket_origin_allowed

logger = logging.getLogger(__name__)

router = APIRouter(tags=["stream"])

_FRAME = TypeAdapter(ClientFrame)
# Errors of the socket's own calls that mean the client is gone: sending to it is pointless.
_GONE = (WebSocketDisconnect, RuntimeError, OSError)


class _ClientGone(Exception):
    """Sending a frame failed: the client is gone, and nothing more can reach it."""


def _frame_error(exc: ValidationError) -> InvalidRequest:
    problems = "; ".join(
        f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" if e["loc"] else e["msg"] for e in exc.errors()
    )
    return InvalidRequest(f"bad frame: {problems}")


class _Connection:
    """One accepted websocket: a reader task for client frames, the main task for turns."""

    def __init__(
        self, websocket: WebSocket, chat: ChatService, limiter: RateLimiter, owner: str, session_id: str
    ) -> None:
        self._ws = websocket
        self._chat = chat
        self._limiter = limiter
        self._identity = caller_identity(owner, websocket.client.host if websocket.client else None)
        self._owner = owner
        self._session_id = session_id
        self._send_lock = asyncio.Lock()
        self._inbox: asyncio.Queue[MessageFrame | None] = asyncio.Queue()
        self._busy = False  # a message is queued or its turn is running
        self._turn: Turn | None = None
        # A cancel (or disconnect) that arrived while the turn was still being set up.
        self._cancel_pending = False

    async def run(self) -> None:
        reader = asyncio.create_task(self._read())
        try:
            while (frame := await self._inbox.get()) is not None:
                await self._answer(frame)
        except _ClientGone:
            logger.debug("websocket of session %s went away mid-turn", self._session_id)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader

    async def _read(self) -> None:
        """Parse client frames; cancel acts at once, a message goes to the main task when idle.

        Every frame but a cancel spends the caller's rate-limit budget, valid or not, as a REST request
        does (its dependency runs before the body is validated): bad frames are not a free way to keep
        the server busy."""
        try:
            while True:
                message = await self._ws.receive()
                if message["type"] == "websocket.disconnect":
                    return
                problem: ServiceError | None = None
                try:
                    frame = self._parse(message)
                except InvalidRequest as exc:
                    frame, problem = None, exc
                if isinstance(frame, CancelFrame):
                    self._cancel()
                    continue
                try:
                    await self._limiter.check(self._identity)
                except ServiceError as exc:
                    problem = exc
                if problem is not None or frame is None:
                    await self._send_error(problem or InvalidRequest("bad frame"))
                elif self._busy:
                    await self._send_error(SessionBusy(self._session_id))
                else:
                    self._busy, self._cancel_pending = True, False
                    self._inbox.put_nowait(frame)
        except _GONE:
            return
        finally:
            self._cancel()  # a disconnect stops generation within one decode step
            self._inbox.put_nowait(None)

    def _cancel(self) -> None:
        """Cancel the running turn, or the one being set up as soon as it exists; nothing when idle."""
        if self._turn is not None:
            self._turn.cancel()
        elif self._busy:
            self._cancel_pending = True

    @staticmethod
    def _parse(message: MutableMapping[str, Any]) -> MessageFrame | CancelFrame:
        """The frame; InvalidRequest for a bad one."""
        raw = message.get("text")
        if raw is None:
            # Not decoded with replacement characters: that would store text the user never sent.
            raise InvalidRequest("binary frames are refused: send JSON in a text frame")
        try:
            return _FRAME.validate_json(raw)
        except ValidationError as exc:
            raise _frame_error(exc) from exc

    async def _answer(self, frame: MessageFrame) -> None:
        """Run one accepted message and send its one terminal frame: `done`, or `error` whatever failed."""
        try:
            outcome = await self._run_turn(frame)
            end = {"type": "done", **reply_out(outcome).model_dump(exclude_none=True)}
        except _ClientGone:
            raise
        except ServiceError as exc:
            end = error_frame(exc)
        except Exception:  # a bug must still answer the message, and leave the socket usable
            logger.exception("websocket turn of session %s failed", self._session_id)
            end = error_frame(ServiceError("internal server error; see the server log"))
        self._busy = False  # idle before the frame goes out: the client may send its next message at once
        await self._send(end)

    async def _run_turn(self, frame: MessageFrame) -> TurnOutcome:
        chat = self._chat
        content = chat.check_content(frame.content)
        params = chat.sampling_params(frame)
        async with chat.turn(self._owner, self._session_id, content, params, tenant=self._identity) as turn:
            self._turn = turn
            if self._cancel_pending:
                turn.cancel()
            try:
                await self._send(
                    {"type": "start", "session_id": self._session_id, "prompt_tokens": len(turn.prompt_ids)}
                )
                async for piece in turn.pieces():
                    await self._send({"type": "token", "text": piece})
                outcome = await turn.finish()
            finally:
                self._turn = None
        return outcome

    async def _send(self, frame: dict[str, Any]) -> None:
        text = json.dumps(frame, ensure_ascii=False)
        async with self._send_lock:
            try:
                await self._ws.send_text(text)
            except _GONE as exc:
                raise _ClientGone from exc

    async def _send_error(self, exc: ServiceError) -> None:
        with contextlib.suppress(_ClientGone):
            await self._send(error_frame(exc))


def error_frame(exc: ServiceError) -> dict[str, Any]:
    """The error frame for exc; a retryable one (429, 503) also says after how many seconds."""
    frame: dict[str, Any] = {"type": "error", **exc.body()}
    if "Retry-After" in exc.headers:
        frame["retry_after"] = int(exc.headers["Retry-After"])
    return frame


@router.websocket("/v1/sessions/{session_id}/stream")
async def stream(websocket: WebSocket, session_id: str, services: ServicesDep) -> None:
    settings = services.settings
    if not websocket_origin_allowed(
        websocket.headers.get("origin"), websocket.headers.get("host"), settings.ws_allowed_origins
    ):
        logger.info("refused a websocket handshake from origin %r", websocket.headers.get("origin"))
        await websocket.close(code=1008, reason="origin not allowed")  # before accept: HTTP 403
        return
    # Key and session ownership are checked before the handshake completes: a refused client gets an
    # HTTP answer (401, 404, 503) instead of a 101, and no frame of its is ever read.
    token = bearer_token(websocket.headers.get("authorization")) or websocket.query_params.get("api_key")
    try:
        owner = services.api_keys.owner(token)
        valid_session_id(session_id)
        await services.chat.get_session(owner, session_id, with_messages=False)
    except ServiceError as exc:
        await websocket.send_denial_response(
            JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)
        )
        return
    await websocket.accept()
    limiter: RateLimiter = websocket.app.state.rate_limiter
    await _Connection(websocket, services.chat, limiter, owner, session_id).run()

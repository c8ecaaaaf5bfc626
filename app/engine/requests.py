"""What travels between the event loop and the engine thread: a request, its handle, its result.

The asyncio side only ever touches these: a route builds a GenerationRequest, gets a GenerationHandle
back from ChatEngine.submit(), reads text pieces from it and finally a GenerationResult. The engine
thread posts to the handle through `loop.call_soon_threadsafe`, never touching the loop directly.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Protocol

from model import DecodeState, FinishReason, SamplingParams

logger = logging.getLogger(__name__)


class TextDecoder(Protocol):
    """Incremental detokenizer (the tokenizer's StreamDecoder): pieces never split a character."""

    def push(self, token_id: int) -> str: ...

    def flush(self) -> str: ...


@dataclass
class GenerationRequest:
    # The session's cached state, or None to start from an empty one (a rebuild feeds all history).
    state: DecodeState | None
    # Tokens the state has not seen yet: stored history from state.length on, then this turn's prompt.
    feed_ids: list[int]
    params: SamplingParams
    decoder: TextDecoder
    # How many of feed_ids (at the end) are the new prompt, as opposed to re-fed history; for metrics.
    prompt_tokens: int = 0
    # Whose request this is (an API key's owner id, or a client address on an open server): the engine
    # holds at most `max_per_tenant` requests of one tenant, running or queued.
    tenant: str = ""


@dataclass
class GenerationResult:
    token_ids: list[int]
    text: str
    finish_reason: FinishReason
    # The advanced state and how many tokens it has seen; None after a model error (it may be half-fed).
    state: DecodeState | None
    state_tokens: int
    error: BaseException | None = None


class GenerationHandle:
    """The asyncio side of one request: text pieces as they come, then the result."""

    def __init__(self) -> None:
        self._events: asyncio.Queue[str | GenerationResult] = asyncio.Queue()
        self._cancel = threading.Event()
        self._result: GenerationResult | None = None

    def cancel(self) -> None:
        """Stop generating; the engine notices before its next decode step."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    async def pieces(self) -> AsyncIterator[str]:
        """Non-empty text pieces; they concatenate to the result's text."""
        while self._result is None:
            event = await self._events.get()
            if isinstance(event, GenerationResult):
                self._result = event
                return
            yield event

    async def result(self) -> GenerationResult:
        """Wait for the end (draining pieces nobody read)."""
        result = self._result
        while result is None:
            event = await self._events.get()
            if isinstance(event, GenerationResult):
                self._result = result = event
        return result


@dataclass
class Job:
    """A submitted request, as it waits in the queue."""

    request: GenerationRequest
    handle: GenerationHandle
    loop: asyncio.AbstractEventLoop
    submitted: float

    def post(self, event: str | GenerationResult) -> None:
        _call_in_loop(self.loop, self.handle._events.put_nowait, event)


class Outbox:
    """Events the engine thread produced during one step, handed to the event loop in one wake-up.

    `call_soon_threadsafe` writes to the loop's self-pipe every time; one call per token per stream was a
    measurable share of a batched step's CPU. Events keep their order, so a job's text always arrives
    before its result.
    """

    def __init__(self) -> None:
        self._events: list[tuple[Job, str | GenerationResult]] = []

    def post(self, job: Job, event: str | GenerationResult) -> None:
        self._events.append((job, event))

    def flush(self) -> None:
        """Deliver everything posted so far: one wake-up per event loop."""
        if not self._events:
            return
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[Job, str | GenerationResult]]] = {}
        for job, event in self._events:
            by_loop.setdefault(job.loop, []).append((job, event))
        self._events = []
        for loop, events in by_loop.items():
            _call_in_loop(loop, _deliver, events)


def _deliver(events: list[tuple[Job, str | GenerationResult]]) -> None:
    for job, event in events:
        job.handle._events.put_nowait(event)


def _call_in_loop(loop: asyncio.AbstractEventLoop, callback: Callable[..., object], *args: object) -> None:
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:  # the event loop is closed: the server is gone, nobody is listening
        logger.debug("dropped an engine event: event loop closed")

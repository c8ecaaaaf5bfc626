"""ChatEngine: owns the model on one dedicated thread and hands generated text back to asyncio.

The event loop never runs torch: routes submit a GenerationRequest, the engine thread runs it, and each
text piece travels back through `loop.call_soon_threadsafe` into the request's own asyncio.Queue.

The loop is a step loop over a queue of requests: every pass admits waiting requests up to
`max_running`, then advances each running request by one step (its prefill, or one decode step),
round-robin. That is the seam continuous batching will use: a pass will stack the running requests'
states (DecodeState.stack) and decode them as one batch instead of one after another.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from typing import Protocol

import torch

from app.errors import EngineUnavailable, Overloaded
from app.metrics import Metrics
from app.state_cache import StateCache
from model import DecodeState, FinishReason, ReformerLM, SamplingParams, StopStringMatcher, generate

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
class _Job:
    """A submitted request, as it waits in the queue."""

    request: GenerationRequest
    handle: GenerationHandle
    loop: asyncio.AbstractEventLoop
    submitted: float

    def post(self, event: str | GenerationResult) -> None:
        try:
            self.loop.call_soon_threadsafe(self.handle._events.put_nowait, event)
        except RuntimeError:  # the event loop is closed: the server is gone, nobody is listening
            logger.debug("dropped an engine event: event loop closed")


@dataclass
class _Running:
    """A request the engine is stepping: its state, its step iterator and what it produced so far."""

    job: _Job
    state: DecodeState
    steps: Iterator[int]
    stopper: StopStringMatcher
    token_ids: list[int] = field(default_factory=list)
    pieces: list[str] = field(default_factory=list)
    last_token_at: float = 0.0


class ChatEngine:
    """One thread, one model, a queue of requests, a step loop."""

    def __init__(
        self,
        model: ReformerLM,
        *,
        metrics: Metrics,
        cache_bytes: int,
        max_running: int,
        max_waiting: int,
        prefill_chunk: int,
        retry_after: int,
    ) -> None:
        if max_running < 1 or max_waiting < 0 or prefill_chunk < 1:
            raise ValueError(
                f"need max_running >= 1, max_waiting >= 0, prefill_chunk >= 1; got {max_running}, "
                f"{max_waiting}, {prefill_chunk}"
            )
        self.model = model
        self.device = next(model.parameters()).device
        self.cache = StateCache(cache_bytes, metrics)
        self._metrics = metrics
        self._max_running = max_running
        self._capacity = max_running + max_waiting
        self._prefill_chunk = prefill_chunk
        self._retry_after = retry_after
        self._inbox: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._active: list[_Running] = []
        self._in_flight = 0
        self._count_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    # ---- asyncio side -------------------------------------------------------------------------------
    def start(self) -> None:
        if self._thread is not None:
            raise RuntimeError("the engine is already started")
        self._thread = threading.Thread(target=self._run, name="chat-engine", daemon=True)
        self._thread.start()

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._stopping.is_set()

    def submit(self, request: GenerationRequest) -> GenerationHandle:
        """Queue a request; Overloaded (429) when running and waiting requests are at capacity."""
        if not self.alive:
            raise EngineUnavailable(self._retry_after)
        with self._count_lock:
            if self._in_flight >= self._capacity:
                raise Overloaded(
                    f"the server has {self._in_flight} replies running or queued, its limit: retry shortly",
                    retry_after=self._retry_after,
                )
            self._in_flight += 1
            self._publish_counts()
        handle = GenerationHandle()
        self._inbox.put(_Job(request, handle, asyncio.get_running_loop(), time.perf_counter()))
        return handle

    def stop(self, timeout: float = 30.0) -> None:
        """Cancel everything in flight (each finishes as "cancelled") and join the thread."""
        if self._thread is None:
            return
        self._stopping.set()
        self._inbox.put(None)
        self._thread.join(timeout)
        if self._thread.is_alive():
            logger.warning("engine thread did not stop within %.0f s", timeout)
        self.cache.clear()

    # ---- engine thread -------------------------------------------------------------------------------
    def _run(self) -> None:
        with torch.inference_mode():
            while self._admit():
                for run in list(self._active):
                    self._step(run)
            # stop() was called: should_stop is now true for every running request, so each one ends
            # (as "cancelled") at its next step.
            while self._active:
                for run in list(self._active):
                    self._step(run)
        self._drain_inbox()

    def _admit(self) -> bool:
        """Move queued jobs into the running set; block while idle. False once stop() was called."""
        while len(self._active) < self._max_running:
            try:
                job = self._inbox.get(block=not self._active)
            except queue.Empty:
                return True
            if job is None or self._stopping.is_set():
                if job is not None:
                    self._inbox.put(job)
                return False
            self._activate(job)
        return not self._stopping.is_set()

    def _activate(self, job: _Job) -> None:
        request = job.request
        state = request.state if request.state is not None else self.model.init_state(1)
        steps = generate(
            self.model,
            state,
            request.feed_ids,
            request.params,
            should_stop=lambda: job.handle.cancelled or self._stopping.is_set(),
            generator=request.params.make_generator(self.device),
            prefill_chunk=self._prefill_chunk,
        )
        self._active.append(_Running(job, state, steps, StopStringMatcher(request.params.stop_strings)))
        self._metrics.queue_time.observe(time.perf_counter() - job.submitted)
        self._publish_counts()

    def _step(self, run: _Running) -> None:
        """Advance one request by one step: its prefill and first token, or one decode step."""
        try:
            token_id = next(run.steps)
            text = run.stopper.push(run.job.request.decoder.push(token_id))
        except StopIteration as stop:
            self._finish(run, stop.value)
            return
        except Exception as exc:  # a model (or decoding) error fails this request, never the engine
            logger.exception("generation failed")
            self._finish(run, "cancelled", error=exc)
            return
        now = time.perf_counter()
        if run.token_ids:
            self._metrics.inter_token_latency.observe(now - run.last_token_at)
        else:
            self._metrics.time_to_first_token.observe(now - run.job.submitted)
        run.last_token_at = now
        run.token_ids.append(token_id)
        self._emit(run, text)
        if run.stopper.stopped:
            run.steps.close()
            self._finish(run, "stop")

    def _emit(self, run: _Running, text: str) -> None:
        if text:
            run.pieces.append(text)
            run.job.post(text)

    def _finish(self, run: _Running, reason: FinishReason, error: BaseException | None = None) -> None:
        if error is None and not run.stopper.stopped:
            self._emit(run, run.stopper.push(run.job.request.decoder.flush()) + run.stopper.flush())
        self._active.remove(run)
        state = None if error is not None else run.state
        result = GenerationResult(
            token_ids=run.token_ids,
            text="".join(run.pieces),
            finish_reason=reason,
            state=state,
            state_tokens=int(run.state.length[0]) if state is not None else 0,
            error=error,
        )
        metrics = self._metrics
        metrics.e2e_latency.observe(time.perf_counter() - run.job.submitted)
        metrics.generation_tokens.inc(len(run.token_ids))
        metrics.prefill_tokens.inc(len(run.job.request.feed_ids))
        metrics.prompt_tokens.inc(run.job.request.prompt_tokens)
        if error is None:
            metrics.request_success.labels(reason).inc()
        else:
            metrics.request_failure.inc()
        with self._count_lock:
            self._in_flight -= 1
            self._publish_counts()
        run.job.post(result)

    def _drain_inbox(self) -> None:
        """At shutdown: requests that never started finish as cancelled with their state untouched."""
        while True:
            try:
                job = self._inbox.get_nowait()
            except queue.Empty:
                return
            if job is None:
                continue
            state = job.request.state
            result = GenerationResult(
                [], "", "cancelled", state, int(state.length[0]) if state is not None else 0
            )
            with self._count_lock:
                self._in_flight -= 1
                self._publish_counts()
            job.post(result)

    def _publish_counts(self) -> None:
        running = len(self._active)
        self._metrics.requests_running.set(running)
        self._metrics.requests_waiting.set(max(0, self._in_flight - running))

"""ChatEngine: owns the model on one dedicated thread and hands generated text back to asyncio.

The event loop never runs torch: routes submit a GenerationRequest, the engine thread runs it, and the
text pieces and results of each step go back to the event loop together (`Outbox`, one
`loop.call_soon_threadsafe` per step) into each request's own asyncio.Queue.

Continuous batching. The thread runs steps; each step
1. admits waiting requests, up to `max_running` in flight (beyond that they wait; beyond `max_waiting`
   more, submit() refuses with 429, and so it does for a tenant that already holds `max_per_tenant` of
   them, so that one caller's burst is its own 429 and never everyone's);
2. feeds at most `prefill_chunk` prompt tokens, shortest remaining prompt first, in separate prefill
   calls: a request's new turn, or a whole conversation re-fed after a cache miss. A 64 K-token rebuild
   therefore takes many steps, and the conversations already streaming get a token at every one of them
   instead of waiting;
3. decodes the next token of every row in one `model.decode()` call (app/engine/batching.py), and
   samples each generating row with its own parameters and generator (`sample_rows`).
Requests join the batch when their prompt is fed and leave when their reply ends; neither waits for
the others. A short prompt (at most `batch_prompt_tokens`) that arrives while other requests run skips
step 2: it joins the batch at once and feeds one prompt token per step alongside the others. A separate
prefill call costs about as much as the state's capacity (the cached entries are sorted together with
the new tokens) whatever the prompt's length, while a row of a decode step is far cheaper (figures in
docs/BENCHMARKS.md), so under load this keeps every short turn inside the batch; alone, the one prefill
call is faster.
A row's tokens are the ones it would get alone: greedy replies match token for token, and a
seeded reply does not depend on its batch companions.

Every submitted request gets exactly one GenerationResult, whatever fails: a request is either in the
inbox (drained as "cancelled" when the thread ends) or live (`_live`), and `_finish` is the only way out
of `_live`. An error inside one request's work fails that request; an unexpected error in a step fails
the requests in flight (their batch state may be half-updated) and the loop goes on; if the thread ends
anyway, it closes the inbox under the same lock `submit` takes, so no request can slip in behind it.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from app.engine.batching import DecodeBatch, SlotBatch, SoloBatch
from app.engine.requests import GenerationHandle, GenerationRequest, GenerationResult, Job, Outbox
from app.errors import EngineUnavailable, Overloaded
from app.metrics import Metrics
from model import DecodeState, FinishReason, ReformerLM, StopStringMatcher, sample_rows

logger = logging.getLogger(__name__)


@dataclass(eq=False)
class _Running:
    """A request the engine is working on: feeding its prompt, then one row of a decode batch."""

    job: Job
    generator: torch.Generator
    stopper: StopStringMatcher
    fed: int = 0  # how many of feed_ids the state has seen
    pending: int = -1  # the last generated token, fed at the next decode step
    token_ids: list[int] = field(default_factory=list)
    pieces: list[str] = field(default_factory=list)
    last_token_at: float = 0.0

    @property
    def request(self) -> GenerationRequest:
        return self.job.request

    @property
    def unfed(self) -> int:
        return len(self.job.request.feed_ids) - self.fed


# Why a request ended: a finish reason, and the error when it failed.
_Ending = tuple[FinishReason, BaseException | None]


class ChatEngine:
    """One thread, one model, a queue of requests, a step loop over a continuous batch."""

    def __init__(
        self,
        model: ReformerLM,
        *,
        metrics: Metrics,
        max_running: int,
        max_waiting: int,
        prefill_chunk: int,
        retry_after: int,
        batch_prompt_tokens: int = 32,
        max_per_tenant: int | None = None,
    ) -> None:
        if max_running < 1 or max_waiting < 0 or prefill_chunk < 1 or batch_prompt_tokens < 0:
            raise ValueError(
                "need max_running >= 1, max_waiting >= 0, prefill_chunk >= 1, batch_prompt_tokens >= 0; "
                f"got {max_running}, {max_waiting}, {prefill_chunk}, {batch_prompt_tokens}"
            )
        self.model = model
        self.device = next(model.parameters()).device
        self._metrics = metrics
        self._max_running = max_running
        self._capacity = max_running + max_waiting
        self._per_tenant = self._capacity if max_per_tenant is None else max_per_tenant
        self._by_tenant: dict[str, int] = {}  # requests running or queued, per tenant (none at 0)
        self._prefill_chunk = prefill_chunk
        # Stepping a prompt through a batch needs fixed-size states (lsh/local): "full" rows run alone.
        self._batch_prompt_tokens = 0 if model.config.has_full_layers else batch_prompt_tokens
        self._retry_after = retry_after
        self._inbox: queue.SimpleQueue[Job | None] = queue.SimpleQueue()
        # Requests whose prompt is being fed, each with its own batch-size-1 state until it joins a batch.
        self._prefilling: dict[_Running, DecodeState] = {}
        self._batches: list[DecodeBatch[_Running]] = []
        self._live: set[_Running] = set()  # prefilling + decoding; _finish takes a request out
        self._in_flight = 0  # submitted and not yet finished; guarded by _count_lock, as is _closed
        self._closed = False  # the thread no longer reads the inbox
        self._count_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()
        self._outbox = Outbox()  # flushed after every step and before the thread blocks

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
        handle = GenerationHandle()
        job = Job(request, handle, asyncio.get_running_loop(), time.perf_counter())
        with self._count_lock:
            if self._closed:  # the thread ended between the check above and here
                raise EngineUnavailable(self._retry_after)
            if self._in_flight >= self._capacity:
                raise Overloaded(
                    f"the server has {self._in_flight} replies running or queued, its limit: retry shortly",
                    retry_after=self._retry_after,
                )
            held = self._by_tenant.get(request.tenant, 0)
            if held >= self._per_tenant:
                raise Overloaded(
                    f"this API key has {held} replies running or queued, its share of this server: retry "
                    "when one has finished",
                    retry_after=self._retry_after,
                )
            self._by_tenant[request.tenant] = held + 1
            self._in_flight += 1
            self._publish_counts()
            self._inbox.put(job)  # under the lock: the thread's last drain cannot miss it
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

    # ---- engine thread: the loop ----------------------------------------------------------------------
    def _run(self) -> None:
        try:
            with torch.inference_mode():
                while self._guarded(self._admit):
                    self._guarded(self._step)
                # stop() was called: every request now counts as cancelled and ends at its next step.
                while self._live:
                    self._guarded(self._step)
        finally:  # also when something escaped _guarded: nobody may wait for a result forever
            self._stopping.set()
            self._fail_all(EngineUnavailable(self._retry_after))
            with self._count_lock:
                self._closed = True
            self._drain_inbox()
            self._outbox.flush()

    def _guarded(self, part: Callable[[], bool | None]) -> bool:
        """Run one part of the loop; an unexpected error fails the requests in flight, not the thread."""
        try:
            return part() is not False
        except Exception as exc:
            logger.exception("engine step failed: failing the %d requests in flight", len(self._live))
            self._fail_all(exc)
            return True

    def _fail_all(self, error: BaseException) -> None:
        """End every live request with `error`; their batch states may be half-updated, so drop them."""
        for run in list(self._live):
            self._finish(run, ("cancelled", error), None)
        self._prefilling.clear()
        self._batches = []

    def _admit(self) -> bool:
        """Start queued jobs up to max_running; block while idle. False once stop() was called."""
        while len(self._live) < self._max_running:
            self._outbox.flush()  # a refused job's result must not wait behind a blocking get
            try:
                job = self._inbox.get(block=not self._live)
            except queue.Empty:
                break
            if job is None or self._stopping.is_set():
                if job is not None:
                    self._inbox.put(job)
                return False
            self._activate(job)
        return not self._stopping.is_set()

    def _activate(self, job: Job) -> None:
        request = job.request
        try:
            run = _Running(
                job,
                request.params.make_generator(self.device),
                StopStringMatcher(request.params.stop_strings),
            )
        except Exception as exc:  # never live: answered here
            logger.exception("could not start a request")
            self._post_result(job, GenerationResult([], "", "cancelled", None, 0, exc))
            return
        self._metrics.queue_time.observe(time.perf_counter() - job.submitted)
        self._live.add(run)
        self._publish_counts()
        error = self._refusal(request)
        if error is not None:
            self._finish(run, ("cancelled", error), None)
            return
        try:
            state = request.state if request.state is not None else self.model.init_state(1)
            if len(request.feed_ids) <= self._batch_prompt_tokens and len(self._live) > 1:
                self._join(run, state)  # others are running: its prompt goes through the decode steps
            else:
                self._prefilling[run] = state
        except Exception as exc:  # e.g. out of memory for its state: this request fails alone
            logger.exception("could not start a request")
            self._prefilling.pop(run, None)
            self._finish(run, ("cancelled", exc), None)

    def _refusal(self, request: GenerationRequest) -> ValueError | None:
        """What would make this request fail inside a batched call (and so fail its companions too)."""
        if not request.feed_ids:
            return ValueError("a generation needs a non-empty prompt: at least the assistant prefix token")
        vocab = self.model.config.vocab_size
        outside = [i for i in (*request.feed_ids, *request.params.logit_bias) if not 0 <= i < vocab]
        if outside:
            return ValueError(f"token ids {sorted(set(outside))[:5]} are outside the vocabulary [0, {vocab})")
        return None

    def _step(self) -> None:
        self._prefill_some()
        for batch in self._batches:
            if batch.members:
                self._decode(batch)
        self._batches = [b for b in self._batches if b.members or isinstance(b, SlotBatch)]
        self._outbox.flush()

    def _cancelled(self, run: _Running) -> bool:
        return run.job.handle.cancelled or self._stopping.is_set()

    # ---- prompts ------------------------------------------------------------------------------------
    def _prefill_some(self) -> None:
        """Feed up to prefill_chunk prompt tokens, shortest remaining prompt first (short prompts reach
        their first token at once; a long rebuild takes the rest of the budget, step after step)."""
        budget = self._prefill_chunk
        for run, state in sorted(self._prefilling.items(), key=lambda item: item[0].unfed):
            if self._cancelled(run):
                del self._prefilling[run]
                self._finish(run, ("cancelled", None), state)
                continue
            if budget == 0:
                continue
            take = min(budget, run.unfed)
            chunk = run.request.feed_ids[run.fed : run.fed + take]
            try:
                ids = torch.tensor([chunk], dtype=torch.long, device=self.device)  # (1, T)
                logits = self.model.decode(ids, state)[:, -1, :]  # (1, V)
            except Exception as exc:  # e.g. an id outside the vocabulary: this request fails alone
                logger.exception("prefill failed")
                del self._prefilling[run]
                self._finish(run, ("cancelled", exc), None)
                continue
            run.fed += take
            budget -= take
            if run.unfed == 0:
                del self._prefilling[run]
                self._first_token(run, state, logits)

    def _first_token(self, run: _Running, state: DecodeState, logits: torch.Tensor) -> None:
        """Sample the reply's first token from the prompt's last logits, then join a decode batch."""
        try:
            pick = sample_rows(logits, [run.request.params], [run.generator], [run.token_ids])[0]
        except Exception as exc:  # e.g. a logit_bias id outside the vocabulary
            logger.exception("sampling failed")
            self._finish(run, ("cancelled", exc), None)
            return
        ending = self._accept(run, pick)
        if ending is not None:
            self._finish(run, ending, state if ending[1] is None else None)
            return
        run.pending = pick
        self._join(run, state)

    def _join(self, run: _Running, state: DecodeState) -> None:
        batch = next((b for b in self._batches if b.accepts(state)), None)
        if batch is None:
            batch = self._new_batch()
            self._batches.append(batch)
        batch.add(run, state)

    def _new_batch(self) -> DecodeBatch[_Running]:
        if self.model.config.has_full_layers:
            return SoloBatch(self.model)
        return SlotBatch(self.model, self._max_running)

    # ---- decode steps -------------------------------------------------------------------------------
    def _decode(self, batch: DecodeBatch[_Running]) -> None:
        """One decode step: each row feeds its next prompt token or its last generated one; the rows whose
        prompt is now fed sample their next token."""
        cancelled = [run for run in batch.members if self._cancelled(run)]
        if cancelled:  # before the step: their last token stays unfed, as generate() leaves it
            self._leave(batch, [(run, ("cancelled", None)) for run in cancelled])
        rows = list(batch.members)
        if not rows:
            return
        inputs = [run.request.feed_ids[run.fed] if run.unfed else run.pending for run in rows]
        self._metrics.decode_steps.inc()
        self._metrics.decode_step_rows.inc(len(rows))
        try:
            logits = batch.decode(torch.tensor(inputs, dtype=torch.long, device=self.device))  # (B, V)
            for run in rows:
                run.fed += 1 if run.unfed else 0
            ready = [i for i, run in enumerate(rows) if not run.unfed]  # generating rows
            picks = sample_rows(
                logits[ready],
                [rows[i].request.params for i in ready],
                [rows[i].generator for i in ready],
                [rows[i].token_ids for i in ready],
            )
        except Exception as exc:  # the batch's states may be half-updated: every row in it fails
            logger.exception("decode step failed for %d rows", len(rows))
            batch.remove(rows)
            for run in rows:
                self._finish(run, ("cancelled", exc), None)
            return
        ended: list[tuple[_Running, _Ending]] = []
        for i, pick in zip(ready, picks, strict=True):
            run = rows[i]
            ending = ("cancelled", None) if self._cancelled(run) else self._accept(run, pick)
            if ending is None:
                run.pending = pick
            else:
                ended.append((run, ending))
        if ended:
            self._leave(batch, ended)

    def _leave(self, batch: DecodeBatch[_Running], ended: list[tuple[_Running, _Ending]]) -> None:
        states = batch.remove([run for run, _ in ended])
        for (run, ending), state in zip(ended, states, strict=True):
            self._finish(run, ending, state if ending[1] is None else None)

    def _accept(self, run: _Running, token_id: int) -> _Ending | None:
        """Hand a sampled token to the client; how the reply ends with it, or None to go on."""
        params = run.request.params
        if token_id in params.stop_token_ids:
            return ("stop", None)
        try:
            text = run.stopper.push(run.request.decoder.push(token_id))
        except Exception as exc:  # a detokenizer error fails this request, never the engine
            logger.exception("detokenizing failed")
            return ("cancelled", exc)
        now = time.perf_counter()
        if run.token_ids:
            self._metrics.inter_token_latency.observe(now - run.last_token_at)
        else:
            self._metrics.time_to_first_token.observe(now - run.job.submitted)
        run.last_token_at = now
        run.token_ids.append(token_id)
        self._emit(run, text)
        if run.stopper.stopped:
            return ("stop", None)
        if len(run.token_ids) >= params.max_tokens:
            return ("length", None)
        return None

    # ---- endings ------------------------------------------------------------------------------------
    def _emit(self, run: _Running, text: str) -> None:
        if text:
            run.pieces.append(text)
            self._outbox.post(run.job, text)

    def _finish(self, run: _Running, ending: _Ending, state: DecodeState | None) -> None:
        """Post the result, once per request; `state` is the advanced state, or None after an error (it
        may be half-fed)."""
        if run not in self._live:
            return
        self._live.discard(run)
        reason, error = ending
        try:
            if error is None and not run.stopper.stopped:
                self._emit(run, run.stopper.push(run.request.decoder.flush()) + run.stopper.flush())
            state_tokens = state.seen_tokens() if state is not None and error is None else 0
        except Exception as exc:  # the detokenizer's last piece: the request fails, never the engine
            logger.exception("finishing a request failed")
            reason, error, state_tokens = "cancelled", exc, 0
        result = GenerationResult(
            token_ids=run.token_ids,
            text="".join(run.pieces),
            finish_reason=reason,
            state=state if error is None else None,
            state_tokens=state_tokens,
            error=error,
        )
        metrics = self._metrics
        metrics.e2e_latency.observe(time.perf_counter() - run.job.submitted)
        metrics.generation_tokens.inc(len(run.token_ids))
        metrics.prefill_tokens.inc(run.fed)
        metrics.prompt_tokens.inc(run.request.prompt_tokens)
        if error is None:
            metrics.request_success.labels(reason).inc()
        else:
            metrics.request_failure.inc()
        self._post_result(run.job, result)

    def _post_result(self, job: Job, result: GenerationResult) -> None:
        self._release(job.request)
        self._outbox.post(job, result)

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
                [], "", "cancelled", state, state.seen_tokens() if state is not None else 0
            )
            self._post_result(job, result)

    def _release(self, request: GenerationRequest) -> None:
        """A request of submit() has ended: free its slot and its tenant's."""
        with self._count_lock:
            self._in_flight -= 1
            left = self._by_tenant[request.tenant] - 1
            if left:
                self._by_tenant[request.tenant] = left
            else:
                del self._by_tenant[request.tenant]
            self._publish_counts()

    def _publish_counts(self) -> None:
        running = len(self._live)
        self._metrics.requests_running.set(running)
        self._metrics.requests_waiting.set(max(0, self._in_flight - running))

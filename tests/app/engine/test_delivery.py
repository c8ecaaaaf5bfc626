"""Every submitted request ends in exactly one GenerationResult, whatever fails on the way (issue 14).

Faults are injected where a request could be dropped: the detokenizer raising mid-reply or at its last
piece, a slow step, a cancel before the request starts or mid-reply, a batch operation raising (which
fails the whole step), and a submit racing the engine's shutdown. The model is the real tiny one.
Instead of waiting with a clock, each test waits until every consumer is done or the engine thread is
gone, then stops the engine and counts what each handle received.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import torch

from app.engine import ChatEngine, GenerationHandle, GenerationRequest, GenerationResult
from app.engine.batching import SlotBatch
from app.errors import EngineUnavailable
from app.metrics import Metrics
from model.generate import SamplingParams
from model.reformer import ReformerLM
from model.state import DecodeState
from model.tokenizer import ChatTokenizer, StreamDecoder

Model = tuple[ReformerLM, ChatTokenizer]
FAULTS = ("none", "raise_push", "raise_flush", "delay", "cancel_before", "cancel_mid")


class Injected(RuntimeError):
    """The fault a test injected (so a test can tell it from any other error)."""


class FaultyDecoder:
    """The real StreamDecoder, with one fault: raise at the n-th push, raise at flush, or sleep."""

    def __init__(self, inner: StreamDecoder, fault: str, at: int) -> None:
        self._inner, self._fault, self._at, self._calls = inner, fault, at, 0

    def push(self, token_id: int) -> str:
        self._calls += 1
        if self._calls == self._at:
            if self._fault == "raise_push":
                raise Injected("push")
            if self._fault == "delay":
                time.sleep(0.02)  # a slow step: every row of the batch waits for it
        return self._inner.push(token_id)

    def flush(self) -> str:
        if self._fault == "raise_flush":
            raise Injected("flush")
        return self._inner.flush()


@dataclass
class Consumer:
    fault: str
    handle: GenerationHandle
    pieces: list[str] = field(default_factory=list)
    result: GenerationResult | None = None

    async def run(self) -> None:
        if self.fault == "cancel_before":
            self.handle.cancel()
        async for piece in self.handle.pieces():
            self.pieces.append(piece)
            if self.fault == "cancel_mid" and len(self.pieces) == 2:
                self.handle.cancel()
        self.result = await self.handle.result()


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def make_engine(model: ReformerLM, **options: int) -> ChatEngine:
    return ChatEngine(
        model,
        metrics=Metrics(),
        **{"max_running": 3, "max_waiting": 16, "prefill_chunk": 16, "retry_after": 1, **options},
    )


def make_request(
    tokenizer: ChatTokenizer, text: str, fault: str = "none", at: int = 1, max_tokens: int = 8
) -> GenerationRequest:
    prompt = [*tokenizer.encode_turn("user", text), tokenizer.assistant_id]
    params = SamplingParams(
        temperature=0,
        max_tokens=max_tokens,
        stop_token_ids=(tokenizer.end_id,),
        logit_bias={tokenizer.end_id: -100.0},  # replies run to max_tokens
    )
    decoder = FaultyDecoder(tokenizer.stream_decoder(), fault, at)
    return GenerationRequest(state=None, feed_ids=prompt, params=params, decoder=decoder)


async def settle(engine: ChatEngine, tasks: list[asyncio.Task[None]]) -> None:
    """Until every consumer is done, or the engine thread is gone (then some never will be)."""
    while not all(task.done() for task in tasks) and engine._thread is not None and engine._thread.is_alive():
        await asyncio.sleep(0.01)


def results_received(handle: GenerationHandle) -> int:
    """How many results reached this handle: the one it returned plus any still queued behind it."""
    queued = []
    while not handle._events.empty():
        queued.append(handle._events.get_nowait())
    return (handle._result is not None) + sum(isinstance(e, GenerationResult) for e in queued)


async def stop_and_deliver(engine: ChatEngine) -> None:
    await asyncio.to_thread(engine.stop)
    for _ in range(3):  # run the callbacks the thread's last flush scheduled
        await asyncio.sleep(0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_every_request_ends_in_exactly_one_result(tiny_model: Model, seed: int) -> None:
    model, tokenizer = tiny_model
    rng = random.Random(seed)
    faults = [*FAULTS, *(rng.choice(FAULTS) for _ in range(6))]
    rng.shuffle(faults)

    async def main() -> None:
        engine = make_engine(model)
        engine.start()
        consumers = [
            Consumer(fault, engine.submit(make_request(tokenizer, f"message {i}", fault, rng.randint(1, 6))))
            for i, fault in enumerate(faults)
        ]
        tasks = [asyncio.create_task(c.run()) for c in consumers]
        await settle(engine, tasks)
        alive = engine.alive
        if alive:  # after all that, the engine still serves
            after = Consumer("none", engine.submit(make_request(tokenizer, "still there?")))
            await settle(engine, [asyncio.create_task(after.run())])
            consumers.append(after)
        await stop_and_deliver(engine)

        received = {(i, c.fault): results_received(c.handle) for i, c in enumerate(consumers)}
        assert all(n == 1 for n in received.values()), f"results per request: {received}"
        assert alive, "the engine thread died"
        for c in consumers:
            result = c.result
            assert result is not None
            if c.fault in ("raise_push", "raise_flush"):
                assert isinstance(result.error, Injected) and result.state is None
            else:
                assert result.error is None and result.text == "".join(c.pieces)
                assert result.finish_reason == ("cancelled" if c.fault.startswith("cancel") else "length")
        assert engine._in_flight == 0

    asyncio.run(main())


def test_a_failing_step_fails_its_requests_and_the_engine_goes_on(
    tiny_model: Model, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, tokenizer = tiny_model
    remove = SlotBatch.remove
    calls = 0

    def remove_failing_once(self: SlotBatch, members: list) -> list[DecodeState]:  # type: ignore[type-arg]
        nonlocal calls
        calls += 1
        if calls == 1:
            raise Injected("remove")
        return remove(self, members)

    monkeypatch.setattr(SlotBatch, "remove", remove_failing_once)

    async def main() -> None:
        engine = make_engine(model)
        engine.start()
        consumers = [
            Consumer("none", engine.submit(make_request(tokenizer, f"row {i}", max_tokens=4 + i)))
            for i in range(3)
        ]
        tasks = [asyncio.create_task(c.run()) for c in consumers]
        await settle(engine, tasks)
        alive = engine.alive
        after_error: object = "not run"
        if alive:
            after = Consumer("none", engine.submit(make_request(tokenizer, "again")))
            await settle(engine, [asyncio.create_task(after.run())])
            after_error = after.result.error if after.result is not None else "no result"
        await stop_and_deliver(engine)

        assert [results_received(c.handle) for c in consumers] == [1, 1, 1]
        assert alive, "the engine thread died"
        # The first reply to end made its step fail: every row of that batch failed with it.
        assert all(c.result is not None and isinstance(c.result.error, Injected) for c in consumers)
        assert engine._in_flight == 0
        assert after_error is None, "the engine did not serve the request after the failed step"

    asyncio.run(main())


def test_a_submit_racing_shutdown_is_refused_never_dropped(
    tiny_model: Model, monkeypatch: pytest.MonkeyPatch
) -> None:
    """submit() checks `alive`, then queues: a thread that ends in between must not leave the job behind."""
    model, tokenizer = tiny_model

    async def main() -> None:
        engine = make_engine(model)
        engine.start()
        await asyncio.to_thread(engine.stop)
        monkeypatch.setattr(ChatEngine, "alive", property(lambda self: True))  # the check just passed
        with pytest.raises(EngineUnavailable):
            engine.submit(make_request(tokenizer, "too late"))

    asyncio.run(main())

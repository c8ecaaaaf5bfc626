"""The engine's Outbox: a step's events reach each stream in order, in one event-loop wake-up."""

import asyncio
import threading

from app.engine.requests import GenerationHandle, GenerationRequest, GenerationResult, Job, Outbox
from model import SamplingParams


def _job(loop: asyncio.AbstractEventLoop) -> Job:
    request = GenerationRequest(state=None, feed_ids=[1], params=SamplingParams(), decoder=None)  # type: ignore[arg-type]
    return Job(request, GenerationHandle(), loop, 0.0)


def _result(text: str) -> GenerationResult:
    return GenerationResult(token_ids=[], text=text, finish_reason="stop", state=None, state_tokens=0)


def test_events_posted_from_another_thread_arrive_in_order_in_one_wake_up() -> None:
    async def scenario() -> tuple[list[str], list[str], int]:
        loop = asyncio.get_running_loop()
        first, second = _job(loop), _job(loop)
        wake_ups = 0
        original = loop.call_soon_threadsafe

        def counting(*args: object, **kwargs: object) -> asyncio.Handle:
            nonlocal wake_ups
            wake_ups += 1
            return original(*args, **kwargs)  # type: ignore[arg-type]

        loop.call_soon_threadsafe = counting  # type: ignore[method-assign]

        def engine_step() -> None:  # what the engine thread does in one step
            outbox = Outbox()
            for job, text in ((first, "a"), (second, "x"), (first, "b"), (second, "y")):
                outbox.post(job, text)
            outbox.post(first, _result("ab"))
            outbox.post(second, _result("xy"))
            outbox.flush()
            outbox.flush()  # nothing left: no second wake-up

        thread = threading.Thread(target=engine_step)
        thread.start()
        thread.join()
        texts = [[piece async for piece in job.handle.pieces()] for job in (first, second)]
        results = [(await job.handle.result()).text for job in (first, second)]
        assert results == ["ab", "xy"]
        return texts[0], texts[1], wake_ups

    first, second, wake_ups = asyncio.run(scenario())
    assert (first, second) == (["a", "b"], ["x", "y"])
    assert wake_ups == 1

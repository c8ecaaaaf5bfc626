"""ChatEngine with the real tiny model: the thread gives generate()'s tokens, continues cached states
exactly, cancels within a step, refuses work beyond capacity and survives a failing request."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
import torch

from app.engine import ChatEngine, GenerationRequest, GenerationResult
from app.errors import Overloaded
from app.metrics import Metrics
from model.generate import SamplingParams, generate
from model.reformer import ReformerLM
from model.state import DecodeState
from model.tokenizer import ChatTokenizer

Model = tuple[ReformerLM, ChatTokenizer]


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def run_engine(tiny_model: Model, body: Callable[[ChatEngine], Awaitable[None]], **kwargs: int) -> None:
    options = {
        "max_running": 4,
        "max_waiting": 4,
        "prefill_chunk": 16,
        "retry_after": 1,
    }
    engine = ChatEngine(tiny_model[0], metrics=Metrics(), **{**options, **kwargs})

    async def main() -> None:
        engine.start()
        try:
            await body(engine)
        finally:
            engine.stop()

    asyncio.run(main())


def request(
    tokenizer: ChatTokenizer, feed: list[int], state: DecodeState | None = None, **params: Any
) -> GenerationRequest:
    sampling = SamplingParams(
        **{"temperature": 0, "max_tokens": 12, "stop_token_ids": (tokenizer.end_id,), **params}
    )
    return GenerationRequest(state=state, feed_ids=feed, params=sampling, decoder=tokenizer.stream_decoder())


def banned(tokenizer: ChatTokenizer) -> dict[int, float]:
    """logit_bias that keeps the reply from ever ending by itself."""
    return {tokenizer.end_id: -100.0}


async def collect(engine: ChatEngine, req: GenerationRequest) -> tuple[list[str], GenerationResult]:
    handle = engine.submit(req)
    pieces = [piece async for piece in handle.pieces()]
    return pieces, await handle.result()


def test_engine_reply_equals_generate_and_its_text_is_exact(tiny_model: Model) -> None:
    model, tokenizer = tiny_model
    prompt = [*tokenizer.encode_turn("user", "Hello there, how are you?"), tokenizer.assistant_id]
    with torch.no_grad():
        expected = list(generate(model, model.init_state(1), prompt, request(tokenizer, prompt).params))

    async def body(engine: ChatEngine) -> None:
        pieces, result = await collect(engine, request(tokenizer, prompt))
        assert result.error is None
        assert result.token_ids == expected
        assert "".join(pieces) == result.text == tokenizer.decode(expected)
        assert result.state is not None and result.state_tokens == int(result.state.length[0])

    run_engine(tiny_model, body)


def test_a_continued_state_gives_the_same_reply_as_a_rebuilt_one(tiny_model: Model) -> None:
    """Turn 2 from turn 1's state (feeding only the stored ids it has not seen) == turn 2 from scratch."""
    _, tokenizer = tiny_model
    turn1 = [*tokenizer.encode_turn("user", "Do you like music?"), tokenizer.assistant_id]
    turn2 = [*tokenizer.encode_turn("user", "Which band?"), tokenizer.assistant_id]

    async def body(engine: ChatEngine) -> None:
        _, first = await collect(engine, request(tokenizer, turn1))
        stored = [*turn1, *first.token_ids, tokenizer.end_id]
        unseen = stored[first.state_tokens :]
        _, warm = await collect(engine, request(tokenizer, unseen + turn2, state=first.state))
        _, rebuilt = await collect(engine, request(tokenizer, stored + turn2))
        assert warm.token_ids == rebuilt.token_ids
        assert warm.state_tokens == rebuilt.state_tokens

    run_engine(tiny_model, body)


def test_cancel_stops_within_a_step_and_keeps_what_was_generated(tiny_model: Model) -> None:
    _, tokenizer = tiny_model
    prompt = [*tokenizer.encode_turn("user", "Tell me a long story."), tokenizer.assistant_id]

    async def body(engine: ChatEngine) -> None:
        handle = engine.submit(request(tokenizer, prompt, max_tokens=10_000, logit_bias=banned(tokenizer)))
        count = 0
        async for _ in handle.pieces():
            count += 1
            if count == 3:
                handle.cancel()
        result = await handle.result()
        assert result.finish_reason == "cancelled"
        assert 3 <= len(result.token_ids) < 10_000
        assert result.text == tokenizer.decode(result.token_ids)
        # The state saw the prompt and the reply, minus at most the last token: never more.
        assert (
            len(prompt) + len(result.token_ids) - 1
            <= result.state_tokens
            <= len(prompt) + len(result.token_ids)
        )

    run_engine(tiny_model, body)


def test_requests_beyond_capacity_are_refused_with_429(tiny_model: Model) -> None:
    _, tokenizer = tiny_model
    prompt = [*tokenizer.encode_turn("user", "hi"), tokenizer.assistant_id]

    async def body(engine: ChatEngine) -> None:
        endless = engine.submit(request(tokenizer, prompt, max_tokens=10_000, logit_bias=banned(tokenizer)))
        queued = engine.submit(request(tokenizer, prompt))
        with pytest.raises(Overloaded) as refused:
            engine.submit(request(tokenizer, prompt))
        assert refused.value.status == 429 and refused.value.headers["Retry-After"] == "1"
        endless.cancel()
        assert (await endless.result()).finish_reason == "cancelled"
        assert (await queued.result()).error is None
        _, again = await collect(engine, request(tokenizer, prompt))  # capacity is back
        assert again.error is None

    run_engine(tiny_model, body, max_running=1, max_waiting=1)


def test_concurrent_requests_are_interleaved_without_mixing(tiny_model: Model) -> None:
    _, tokenizer = tiny_model
    prompts = [
        [*tokenizer.encode_turn("user", text), tokenizer.assistant_id] for text in ("one", "two", "three")
    ]

    async def body(engine: ChatEngine) -> None:
        alone = [(await collect(engine, request(tokenizer, p)))[1].token_ids for p in prompts]
        together = await asyncio.gather(*(collect(engine, request(tokenizer, p)) for p in prompts))
        assert [result.token_ids for _, result in together] == alone

    run_engine(tiny_model, body)


def test_a_failing_request_fails_alone(tiny_model: Model) -> None:
    model, tokenizer = tiny_model
    out_of_vocabulary = model.config.vocab_size + 5

    async def body(engine: ChatEngine) -> None:
        _, failed = await collect(engine, request(tokenizer, [out_of_vocabulary]))
        assert isinstance(failed.error, ValueError) and failed.state is None
        _, fine = await collect(engine, request(tokenizer, [tokenizer.user_id, tokenizer.assistant_id]))
        assert fine.error is None and engine.alive

    run_engine(tiny_model, body)


def test_stop_strings_end_the_reply_before_the_match(tiny_model: Model) -> None:
    _, tokenizer = tiny_model
    prompt = [*tokenizer.encode_turn("user", "What's up?"), tokenizer.assistant_id]

    async def body(engine: ChatEngine) -> None:
        _, full = await collect(
            engine, request(tokenizer, prompt, max_tokens=24, logit_bias=banned(tokenizer))
        )
        stop = full.text[len(full.text) // 2 :][:2]
        assert stop, "the tiny model produced no text to stop on"
        pieces, cut = await collect(
            engine,
            request(tokenizer, prompt, max_tokens=24, logit_bias=banned(tokenizer), stop_strings=(stop,)),
        )
        assert cut.finish_reason == "stop"
        assert cut.text == "".join(pieces) == full.text[: full.text.index(stop)]

    run_engine(tiny_model, body)


def test_stop_cancels_what_is_in_flight_and_joins(tiny_model: Model) -> None:
    _, tokenizer = tiny_model
    prompt = [*tokenizer.encode_turn("user", "hi"), tokenizer.assistant_id]
    engine = ChatEngine(
        tiny_model[0],
        metrics=Metrics(),
        max_running=1,
        max_waiting=2,
        prefill_chunk=8,
        retry_after=1,
    )

    async def main() -> tuple[GenerationResult, GenerationResult]:
        engine.start()
        running = engine.submit(request(tokenizer, prompt, max_tokens=10_000, logit_bias=banned(tokenizer)))
        waiting = engine.submit(request(tokenizer, prompt))
        async for _ in running.pieces():
            break
        await asyncio.to_thread(engine.stop)
        return await running.result(), await waiting.result()

    running, waiting = asyncio.run(main())
    assert running.finish_reason == waiting.finish_reason == "cancelled"
    assert waiting.token_ids == []
    assert not engine.alive

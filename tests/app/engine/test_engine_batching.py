"""Continuous batching in ChatEngine with the real tiny model: sessions that share decode steps get the
replies they would get alone, one leaving does not disturb the others, and a long prompt is fed in
chunks between decode steps instead of stalling the streams."""

from __future__ import annotations

import asyncio
import random

import torch

from app.engine import ChatEngine, GenerationHandle, GenerationRequest, GenerationResult
from model import ReformerConfig, ReformerLM, SamplingParams
from model.tokenizer import ChatTokenizer
from tests.app.engine.test_engine import Model, banned, collect, one_thread, request, run_engine  # noqa: F401


def history(tokenizer: ChatTokenizer, length: int, seed: int) -> list[int]:
    """`length` stored-looking token ids ending in a user turn and the assistant prefix."""
    rng = random.Random(seed)
    body = [rng.randrange(4, tokenizer.vocab_size) for _ in range(max(0, length - 3))]
    return [tokenizer.user_id, *body, tokenizer.end_id, tokenizer.assistant_id][-length:]


class Order:
    """Which request streamed when: the event loop receives every engine event in the engine's order."""

    def __init__(self) -> None:
        self.events: list[str] = []

    async def collect(self, name: str, handle: GenerationHandle) -> GenerationResult:
        async for _ in handle.pieces():
            self.events.append(name)
        result = await handle.result()
        self.events.append(f"{name}:done")
        return result

    def interleaved(self, a: str, b: str) -> bool:
        """b streamed a piece while a was still streaming."""
        return self.events.index(b) < self.events.index(f"{a}:done")


def test_batched_greedy_replies_equal_unbatched_for_different_history_lengths(tiny_model: Model) -> None:
    """Sessions of 4 to 160 unseen tokens join a batch that is already streaming: the short ones step
    their prompt through the batch, the long ones get prefill calls; every reply equals its lone one."""
    _, tokenizer = tiny_model
    # Past the tiny model's LSH capacity (32) and local window (8), and short of both.
    feeds = [history(tokenizer, n, seed=n) for n in (4, 29, 77, 160)]

    def greedy(feed: list[int], max_tokens: int = 16) -> GenerationRequest:
        return request(tokenizer, feed, max_tokens=max_tokens, logit_bias=banned(tokenizer))

    async def body(engine: ChatEngine) -> None:
        alone = [(await collect(engine, greedy(f)))[1] for f in feeds]
        order = Order()
        anchor = engine.submit(greedy(history(tokenizer, 6, seed=0), max_tokens=10_000))
        async for _ in anchor.pieces():
            break  # streaming: the batch has a row when the others arrive
        together = await asyncio.gather(
            *(order.collect(str(i), engine.submit(greedy(f))) for i, f in enumerate(feeds))
        )
        anchor.cancel()
        assert (await anchor.result()).finish_reason == "cancelled"
        assert [r.token_ids for r in together] == [r.token_ids for r in alone]
        assert [r.state_tokens for r in together] == [r.state_tokens for r in alone]
        assert all(len(r.token_ids) == 16 for r in together)
        assert order.interleaved("0", "3") and order.interleaved("3", "0"), "the requests never overlapped"

    run_engine(tiny_model, body, prefill_chunk=32, batch_prompt_tokens=32, max_running=5)


def test_a_seeded_reply_does_not_depend_on_its_batch_companions(tiny_model: Model) -> None:
    _, tokenizer = tiny_model
    mine = history(tokenizer, 20, seed=1)
    seeded = {
        "temperature": 1.0,
        "top_p": 0.9,
        "seed": 1234,
        "max_tokens": 14,
        "logit_bias": banned(tokenizer),
    }

    async def body(engine: ChatEngine) -> None:
        _, alone = await collect(engine, request(tokenizer, mine, **seeded))
        companions = [
            request(tokenizer, history(tokenizer, 50, seed=2), temperature=1.3, top_k=5, max_tokens=20),
            request(tokenizer, history(tokenizer, 9, seed=3), repetition_penalty=1.5, max_tokens=20),
        ]
        order = Order()
        crowded, *_ = await asyncio.gather(
            order.collect("mine", engine.submit(request(tokenizer, mine, **seeded))),
            *(order.collect(f"other{i}", engine.submit(c)) for i, c in enumerate(companions)),
        )
        assert crowded.token_ids == alone.token_ids
        assert order.interleaved("mine", "other0")
        _, other_seed = await collect(engine, request(tokenizer, mine, **{**seeded, "seed": 99}))
        assert other_seed.token_ids != alone.token_ids, "the seed should matter at temperature 1"

    run_engine(tiny_model, body)


def test_cancelling_one_row_leaves_the_others_streaming(tiny_model: Model) -> None:
    _, tokenizer = tiny_model
    feeds = [history(tokenizer, n, seed=n) for n in (12, 45, 30)]

    def endless(feed: list[int]) -> GenerationRequest:
        return request(tokenizer, feed, max_tokens=24, logit_bias=banned(tokenizer))

    async def body(engine: ChatEngine) -> None:
        alone = [(await collect(engine, endless(f)))[1].token_ids for f in feeds]
        handles = [engine.submit(endless(f)) for f in feeds]

        async def cancel_after_three(handle: GenerationHandle) -> GenerationResult:
            count = 0
            async for _ in handle.pieces():
                count += 1
                if count == 3:
                    handle.cancel()
            return await handle.result()

        first, cancelled, last = await asyncio.gather(
            handles[0].result(), cancel_after_three(handles[1]), handles[2].result()
        )
        assert cancelled.finish_reason == "cancelled" and 3 <= len(cancelled.token_ids) < 24
        assert cancelled.token_ids == alone[1][: len(cancelled.token_ids)]
        assert first.finish_reason == last.finish_reason == "length"
        assert [first.token_ids, last.token_ids] == [alone[0], alone[2]]
        # The cancelled row's state is usable: it saw the prompt and all but at most its last token.
        assert cancelled.state is not None
        assert len(feeds[1]) + len(cancelled.token_ids) - 1 <= cancelled.state_tokens

    run_engine(tiny_model, body)


def test_a_long_prompt_is_fed_between_decode_steps_not_in_one_go(tiny_model: Model) -> None:
    """A 320-token rebuild at 8 tokens per step takes 40 steps; a stream that is already running gets
    its tokens during them and finishes first, although the long request wants a single token."""
    _, tokenizer = tiny_model
    streaming = request(
        tokenizer, history(tokenizer, 10, seed=4), max_tokens=12, logit_bias=banned(tokenizer)
    )
    rebuild = request(tokenizer, history(tokenizer, 320, seed=5), max_tokens=1, logit_bias=banned(tokenizer))

    async def body(engine: ChatEngine) -> None:
        order = Order()
        stream = asyncio.create_task(order.collect("stream", engine.submit(streaming)))
        while "stream" not in order.events:
            await asyncio.sleep(0)
        long = await order.collect("long", engine.submit(rebuild))
        short = await stream
        assert len(short.token_ids) == 12 and len(long.token_ids) == 1
        assert order.events.index("stream:done") < order.events.index("long:done")

    run_engine(tiny_model, body, prefill_chunk=8)


def test_full_attention_models_are_served_unbatched_with_the_same_replies(tiny_model: Model) -> None:
    """'full' states only stack at equal lengths: such a model runs one row per decode call, and its
    concurrent replies still equal the lone ones."""
    _, tokenizer = tiny_model
    torch.manual_seed(0)
    full = ReformerLM(
        ReformerConfig.tiny(vocab_size=tokenizer.vocab_size, attn_layers=("local", "full"))
    ).eval()
    feeds = [history(tokenizer, n, seed=n) for n in (6, 41)]

    def greedy(feed: list[int]) -> GenerationRequest:
        return GenerationRequest(
            state=None,
            feed_ids=feed,
            params=SamplingParams(temperature=0, max_tokens=10, logit_bias=banned(tokenizer)),
            decoder=tokenizer.stream_decoder(),
        )

    async def body(engine: ChatEngine) -> None:
        alone = [(await collect(engine, greedy(f)))[1].token_ids for f in feeds]
        together = await asyncio.gather(*(collect(engine, greedy(f)) for f in feeds))
        assert [r.token_ids for _, r in together] == alone

    run_engine((full, tokenizer), body)

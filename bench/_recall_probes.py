"""The three measurements of bench/recall.py, on one model: copy spans, facts in chat, plain-chat bits/char.

Everything a probe feeds goes through `model.decode` the way the service feeds a conversation: one decode
state per conversation, each turn's tokens prefilled in chunks (model.generate.prefill), replies greedy with
decode_step. The filler between a statement and its question is real held-out chat: test-split conversations
in their stored order (original orientation), in whole user/assistant pairs, one after another, as a long
chat would run. A probe clones the state at each gap and asks there, then keeps feeding the original, so one
pass over the longest gap answers every shorter gap too (the clone is what a cached conversation state is).
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from model import ChatTokenizer, DecodeState, ReformerLM, decode_step, prefill
from model.train.copy_spans import draw_span
from model.train.corpus import Message
from model.train.facts import KINDS, Side, make_fact, reply_has_value

# Tokens of held-out chat before a copy span's first occurrence, so it is not read at position 0 of a stream
# (where any model is at its worst) while the second occurrence sits thousands of tokens in.
COPY_LEAD_IN = 128
# Greedy reply length cap: every answer template is well under this.
REPLY_TOKENS = 24


def filler_turns(conversations: Sequence[list[Message]], start: int) -> Iterator[Message]:
    """Held-out turns from conversation `start` on, cycling, in whole user/assistant pairs (a conversation
    that ends on a user turn loses that turn, so roles keep alternating across conversation boundaries)."""
    usable = [conv for conv in conversations if len(conv) >= 2]
    if not usable:
        raise ValueError("the filler needs conversations with at least one user/assistant pair")
    index = start
    while True:
        conversation = usable[index % len(usable)]
        yield from conversation[: len(conversation) // 2 * 2]
        index += 1


class _Feeder:
    """One conversation's decode state and how many tokens went in since the probe's first occurrence."""

    def __init__(self, model: ReformerLM, tokenizer: ChatTokenizer) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.state: DecodeState = model.init_state(1)
        self.since = 0

    def feed(self, ids: list[int]) -> torch.Tensor:
        """Prefill ids; returns the last position's logits (1, V)."""
        self.since += len(ids)
        return prefill(self.model, self.state, ids)

    def feed_until(self, turns: Iterator[Message], gap: int) -> None:
        """Feed whole turns until at least `gap` tokens followed the first occurrence and an assistant turn
        has just ended (so the question opens a user turn, as in a real chat)."""
        while True:
            turn = next(turns)
            self.feed(self.tokenizer.encode_turn(turn["role"], turn["content"]))
            if turn["role"] == "assistant" and self.since >= gap:
                return


def _span_losses(model: ReformerLM, state: DecodeState, role_id: int, span: list[int]) -> torch.Tensor:
    """Per-token cross-entropy (nats) of `span` opening a user turn, given `state`; advances `state`."""
    ids = torch.tensor([[role_id, *span]], dtype=torch.long)  # (1, 1 + S)
    logits = model.decode(ids, state)[0, :-1].float()  # (S, V): position i predicts ids[i + 1]
    return F.cross_entropy(logits, ids[0, 1:], reduction="none")


@dataclass(frozen=True)
class CopyResult:
    gap: int  # tokens actually between the two occurrences
    first_nats: float  # mean cross-entropy per span token, first occurrence
    second_nats: float


@torch.no_grad()
def copy_probe(
    model: ReformerLM,
    tokenizer: ChatTokenizer,
    filler: Iterator[Message],
    rng: np.random.Generator,
    gaps: Sequence[int],
    span_words: int,
) -> list[CopyResult]:
    """One span, said once after a lead-in and again (on a clone of the state) after each gap."""
    span = tokenizer.encode(draw_span(rng, span_words) + "\n")
    feeder = _Feeder(model, tokenizer)
    feeder.feed_until(filler, COPY_LEAD_IN)
    first = _span_losses(model, feeder.state, tokenizer.user_id, span)
    feeder.since = 0  # gaps count from the span's end
    # The rest of that user turn (encode(span + "\n") + encode(text) tokenises as the joined turn would).
    opening = next(filler)
    feeder.feed([*tokenizer.encode(opening["content"]), tokenizer.end_id])
    results = []
    for gap in sorted(gaps):
        feeder.feed_until(filler, gap)
        second = _span_losses(model, feeder.state.clone(), tokenizer.user_id, span)
        results.append(CopyResult(feeder.since, float(first.mean()), float(second.mean())))
    return results


@dataclass(frozen=True)
class FactResult:
    gap: int  # tokens actually between the statement and the question
    kind: str
    value: str
    phrasing: Side
    reply: str
    correct: bool
    state_bytes: int  # the decode state's size when the question is asked
    cpu_ms_per_token: float  # CPU time per generated reply token (decode_step only)


@torch.no_grad()
def fact_probe(
    model: ReformerLM,
    tokenizer: ChatTokenizer,
    filler: Iterator[Message],
    rng: np.random.Generator,
    gaps: Sequence[int],
    phrasing: Side,
    kind_index: int,
) -> list[FactResult]:
    """An eval-side fact stated at the head of the first user turn, asked (on a clone) after each gap."""
    fact = make_fact(rng, "eval", phrasing, KINDS[kind_index % len(KINDS)])
    feeder = _Feeder(model, tokenizer)
    opening = next(filler)
    feeder.feed(tokenizer.encode_turn("user", f"{fact.statement}\n{opening['content']}"))
    feeder.since -= 1 + len(tokenizer.encode(fact.statement + "\n"))  # counted from the statement's end
    results = []
    for gap in sorted(gaps):
        feeder.feed_until(filler, gap)
        state = feeder.state.clone()
        state_bytes = state.nbytes()
        logits = prefill(
            model, state, [*tokenizer.encode_turn("user", fact.question), tokenizer.assistant_id]
        )
        reply, cpu_s = _greedy_reply(model, state, logits, tokenizer.end_id)
        text = tokenizer.decode(reply)
        results.append(FactResult(
            feeder.since, fact.kind, fact.value, phrasing, text, reply_has_value(text, fact.value),
            state_bytes, 1000.0 * cpu_s / max(1, len(reply)),
        ))  # fmt: skip
    return results


def _greedy_reply(
    model: ReformerLM, state: DecodeState, logits: torch.Tensor, end_id: int
) -> tuple[list[int], float]:
    """Argmax tokens until the end token or REPLY_TOKENS; returns (ids, CPU seconds spent in decode_step)."""
    reply: list[int] = []
    cpu = 0.0
    while len(reply) < REPLY_TOKENS:
        token = logits.argmax(dim=-1)  # (1,)
        if int(token) == end_id:
            break
        reply.append(int(token))
        started = time.process_time()
        logits = decode_step(model, state, token)
        cpu += time.process_time() - started
    return reply, cpu


@dataclass(frozen=True)
class BitsPerChar:
    bits_per_char: float
    nats_per_token: float
    tokens: int
    characters: int
    window: int


@torch.no_grad()
def bits_per_char(
    model: ReformerLM,
    tokenizer: ChatTokenizer,
    conversations: Sequence[list[Message]],
    window: int,
    max_tokens: int | None = None,
    batch: int = 8,
) -> BitsPerChar:
    """Held-out loss per character of message text, comparable across tokenizers.

    The conversations are concatenated and read in windows of `window` tokens overlapping by one, so every
    token after the first is predicted exactly once (each window starts cold, as in the train CLI's test).
    Numerator: every predicted token's loss, role and end tokens included; denominator: the characters of
    the messages' text (the first token, a role token, has none).
    """
    ids: list[int] = []
    characters = 0
    for conversation in conversations:
        if max_tokens is not None and len(ids) >= max_tokens:
            break
        ids.extend(tokenizer.encode_chat(conversation))
        characters += sum(len(turn["content"]) for turn in conversation)
    stream = torch.tensor(ids, dtype=torch.long)
    starts = list(range(0, len(stream) - 1, window))
    whole = [s for s in starts if s + window + 1 <= len(stream)]
    total = 0.0
    for i in range(0, len(whole), batch):
        rows = torch.stack([stream[s : s + window + 1] for s in whole[i : i + batch]])  # (b, window + 1)
        total += float(model.loss(rows[:, :-1], rows[:, 1:])) * rows[:, 1:].numel()
    for s in starts[len(whole) :]:  # the tail shorter than a window
        tail = stream[s:][None]  # (1, n)
        total += float(model.loss(tail[:, :-1], tail[:, 1:])) * (tail.shape[1] - 1)
    predicted = len(stream) - 1
    return BitsPerChar(total / math.log(2) / characters, total / predicted, predicted, characters, window)

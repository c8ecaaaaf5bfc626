"""Generation in small steps: sample -> prefill -> decode_step -> generate (an iterator of token ids).

Everything here works on one DecodeState that the caller owns, so a chat turn feeds only its new tokens
and the service can cache states between turns. Nothing here knows about HTTP, Redis or threads: the
service's engine drives `generate()` one `next()` at a time, which is also what makes cancellation land
within one decode step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import Tensor

from model.reformer import ReformerLM
from model.state import DecodeState

FinishReason = Literal["stop", "length", "cancelled"]

# Prompt tokens fed to model.decode() per call. Prefill cost is linear in this either way; the chunk
# bounds the peak activation memory of a long rebuild (a whole conversation re-fed after a restart).
DEFAULT_PREFILL_CHUNK = 512


@dataclass(frozen=True)
class SamplingParams:
    """How to pick each next token; validated so bad values fail here, not deep inside torch."""

    # 0 means greedy (argmax): deterministic replies, used by the tests that compare decode paths.
    temperature: float = 1.0
    # Keep only the k most likely tokens; 0 turns the filter off.
    top_k: int = 0
    # Nucleus sampling: keep the smallest set of tokens whose probability reaches top_p; 1.0 keeps all.
    top_p: float = 1.0
    # CTRL-style penalty (Keskar et al. 2019) on tokens already in this reply: > 1 discourages repeats.
    repetition_penalty: float = 1.0
    # Upper bound on generated tokens (stop tokens are not counted, they are never yielded).
    max_tokens: int = 256
    # Seeds this request's own torch.Generator, so the same context + seed gives the same reply.
    seed: int | None = None
    # Token ids that end the reply (the tokenizer's end-of-turn id goes here); never yielded.
    stop_token_ids: tuple[int, ...] = ()
    # Strings that end the reply; matched on the decoded text by StopStringMatcher (the caller decodes).
    stop_strings: tuple[str, ...] = ()
    # Added to the logits before sampling, OpenAI's logit_bias: -100 bans a token, +100 forces it.
    logit_bias: Mapping[int, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not math.isfinite(self.temperature) or self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = no top-k filter), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 = no nucleus filter), got {self.top_p}")
        if not math.isfinite(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise ValueError(
                "repetition_penalty must be > 0 (1 = off, > 1 discourages repeats), "
                f"got {self.repetition_penalty}"
            )
        if self.max_tokens < 1:
            raise ValueError(f"max_tokens must be >= 1, got {self.max_tokens}")
        if any(not s for s in self.stop_strings):
            raise ValueError("stop strings must be non-empty: drop the empty string from stop")
        if any(not math.isfinite(b) for b in self.logit_bias.values()):
            raise ValueError("logit_bias values must be finite numbers: use -100 to ban a token")
        # Normalise sequences to tuples so equal params compare (and hash their fields) equal.
        object.__setattr__(self, "stop_token_ids", tuple(self.stop_token_ids))
        object.__setattr__(self, "stop_strings", tuple(self.stop_strings))

    def make_generator(self, device: torch.device | str = "cpu") -> torch.Generator:
        """A fresh generator for one request: seeded when `seed` is set, else from OS entropy."""
        generator = torch.Generator(device=device)
        if self.seed is None:
            generator.seed()
        else:
            generator.manual_seed(self.seed)
        return generator


def _apply_repetition_penalty(logits: Tensor, history_ids: Sequence[Sequence[int]], penalty: float) -> Tensor:
    """CTRL's rule: a seen token's positive logit is divided by the penalty, a negative one multiplied.

    Dividing a negative logit would *raise* its probability, hence the two cases. Each token is penalised
    once however often it appeared, as in CTRL and HF.
    """
    for row, ids in enumerate(history_ids):
        if not ids:
            continue
        index = torch.tensor(sorted(set(ids)), device=logits.device, dtype=torch.long)
        seen = logits[row, index]
        logits[row, index] = torch.where(seen > 0, seen / penalty, seen * penalty)
    return logits


def _apply_logit_bias(logits: Tensor, logit_bias: Mapping[int, float]) -> None:
    """Add the bias to every row of logits (B, V) in place; ids outside the vocabulary are refused."""
    vocab = logits.shape[-1]
    outside = [i for i in logit_bias if not 0 <= i < vocab]
    if outside:
        raise ValueError(f"logit_bias token ids {outside} are outside the vocabulary [0, {vocab})")
    index = torch.tensor(list(logit_bias), device=logits.device, dtype=torch.long)
    bias = torch.tensor(list(logit_bias.values()), device=logits.device, dtype=logits.dtype)
    logits[:, index] += bias


def _filter_top_k(logits: Tensor, k: int) -> Tensor:
    if k <= 0 or k >= logits.shape[-1]:
        return logits
    kth = torch.topk(logits, k, dim=-1).values[:, -1:]  # (B, 1): the k-th largest logit per row
    return logits.masked_fill(logits < kth, float("-inf"))


def _filter_top_p(logits: Tensor, p: float) -> Tensor:
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
    probs = sorted_logits.softmax(dim=-1)
    # Drop a token when the tokens ranked above it already reach p; the top token is always kept.
    drop_sorted = probs.cumsum(dim=-1) - probs >= p  # (B, V)
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample(
    logits: Tensor,
    params: SamplingParams,
    generator: torch.Generator | None = None,
    history_ids: Sequence[Sequence[int]] | None = None,
) -> Tensor:
    """Pick one token per row from logits (B, V); returns a LongTensor (B,).

    Order: logit bias, repetition penalty over `history_ids` (per row: the reply generated so far; the
    prompt is deliberately left out so that role and end-of-turn tokens, which every prompt contains, are
    never penalised and replies still end), then temperature, top-k and top-p. Temperature 0 is argmax.
    """
    logits = logits.float().clone()  # (B, V)
    if params.logit_bias:
        _apply_logit_bias(logits, params.logit_bias)
    if params.repetition_penalty != 1.0 and history_ids is not None:
        if len(history_ids) != logits.shape[0]:
            raise ValueError(f"history_ids has {len(history_ids)} rows but logits has {logits.shape[0]}")
        logits = _apply_repetition_penalty(logits, history_ids, params.repetition_penalty)
    if params.temperature == 0:
        return logits.argmax(dim=-1)
    logits = _filter_top_k(logits / params.temperature, params.top_k)
    logits = _filter_top_p(logits, params.top_p)
    probs = logits.softmax(dim=-1)  # (B, V)
    return torch.multinomial(probs, num_samples=1, generator=generator).squeeze(-1)  # (B,)


def sample_rows(
    logits: Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    history_ids: Sequence[Sequence[int]],
) -> list[int]:
    """One token per row of logits (B, V), each row with its own parameters, generator and reply so far.

    The rows are different conversations that share one decode step of the continuous-batching engine.
    Row i gets exactly the token `sample(logits[i:i+1], params[i], generators[i], [history_ids[i]])`
    would give, so a seeded request draws the same reply whoever its batch companions are. The filters
    run on all rows at once; only the draw is per row, because each row owns its generator.
    """
    rows = logits.shape[0]
    if not len(params) == len(generators) == len(history_ids) == rows:
        raise ValueError(
            f"need one params, generator and history per row: {rows} rows, {len(params)} params, "
            f"{len(generators)} generators, {len(history_ids)} histories"
        )
    logits = logits.float().clone()  # (B, V)
    for row, (row_params, ids) in enumerate(zip(params, history_ids, strict=True)):
        if row_params.logit_bias:
            _apply_logit_bias(logits[row : row + 1], row_params.logit_bias)
        if row_params.repetition_penalty != 1.0 and ids:
            _apply_repetition_penalty(logits[row : row + 1], [ids], row_params.repetition_penalty)
    picks: list[int] = logits.argmax(dim=-1).tolist()  # the greedy rows' answer
    sampled = [row for row, p in enumerate(params) if p.temperature > 0]
    if not sampled:
        return picks
    device = logits.device
    index = torch.tensor(sampled, device=device)
    temperature = torch.tensor([params[r].temperature for r in sampled], device=device)[:, None]  # (S, 1)
    scaled = _filter_top_k_rows(logits[index] / temperature, [params[r].top_k for r in sampled])  # (S, V)
    scaled = _filter_top_p_rows(scaled, [params[r].top_p for r in sampled])
    probs = scaled.softmax(dim=-1)
    for i, row in enumerate(sampled):
        draw = torch.multinomial(probs[i : i + 1], num_samples=1, generator=generators[row])  # (1, 1)
        picks[row] = int(draw.item())
    return picks


def _filter_top_k_rows(logits: Tensor, ks: Sequence[int]) -> Tensor:
    """_filter_top_k with its own k per row of logits (S, V); k = 0 (or >= V) leaves a row alone."""
    vocab = logits.shape[-1]
    on = [0 < k < vocab for k in ks]
    if not any(on):
        return logits
    top = torch.topk(logits, max(k for k, o in zip(ks, on, strict=True) if o), dim=-1).values  # (S, K)
    index = torch.tensor([k - 1 if o else 0 for k, o in zip(ks, on, strict=True)], device=logits.device)
    kth = top.gather(-1, index[:, None])  # (S, 1): each row's k-th largest logit
    kth = torch.where(torch.tensor(on, device=logits.device)[:, None], kth, float("-inf"))
    return logits.masked_fill(logits < kth, float("-inf"))


def _filter_top_p_rows(logits: Tensor, ps: Sequence[float]) -> Tensor:
    """_filter_top_p with its own p per row of logits (S, V); p = 1 leaves a row alone."""
    if all(p >= 1.0 for p in ps):
        return logits
    p = torch.tensor(ps, device=logits.device, dtype=logits.dtype)[:, None]  # (S, 1)
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (S, V)
    probs = sorted_logits.softmax(dim=-1)
    drop_sorted = (probs.cumsum(dim=-1) - probs >= p) & (p < 1.0)  # (S, V)
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def prefill(
    model: ReformerLM,
    state: DecodeState,
    ids: Sequence[int],
    chunk_size: int = DEFAULT_PREFILL_CHUNK,
) -> Tensor:
    """Feed `ids` (one sequence) into `state` in chunks; returns the last position's logits (1, V).

    Chunking changes only the peak memory: decode() over a chunk is the forward pass over it given the
    state, so the result equals one big decode() call.
    """
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    device = state.length.device
    logits: Tensor | None = None
    for start in range(0, len(ids), chunk_size):
        chunk = torch.tensor(
            [list(ids[start : start + chunk_size])], dtype=torch.long, device=device
        )  # (1, T)
        logits = model.decode(chunk, state)[:, -1, :]  # (1, V)
    if logits is None:
        raise ValueError("prefill needs at least one token: a chat prompt always has the role token")
    return logits


def decode_step(model: ReformerLM, state: DecodeState, token: Tensor) -> Tensor:
    """Feed one token per row (LongTensor (B,)) and return the next logits (B, V)."""
    return model.decode(token.view(-1, 1), state)[:, -1, :]  # (B, 1) -> (B, V)


def generate(
    model: ReformerLM,
    state: DecodeState,
    prompt_ids: Sequence[int],
    params: SamplingParams,
    should_stop: Callable[[], bool] = lambda: False,
    generator: torch.Generator | None = None,
    prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
) -> Iterator[int]:
    """Yield reply token ids for one sequence; the generator's return value is the FinishReason.

    `state` must be batch-size 1 and is advanced in place: after the loop it has seen the prompt and every
    yielded token except (when the reply ran to `max_tokens` or hit a stop token) the last one, which was
    never fed back. A caller that stores `prompt + reply + [end]` and feeds the stored ids from
    `state.length` onwards next turn therefore never re-feeds nor skips a token.

    `should_stop` is checked before the first token and between all steps (and between prefill chunks),
    so a cancellation costs at most one decode step.
    """
    if state.batch_size != 1:
        raise ValueError(f"generate() drives one sequence; got a state with batch size {state.batch_size}")
    if generator is None:
        generator = params.make_generator(state.length.device)
    stop_ids = set(params.stop_token_ids)
    logits: Tensor | None = None
    for start in range(0, len(prompt_ids), prefill_chunk):
        if should_stop():
            return "cancelled"
        logits = prefill(model, state, prompt_ids[start : start + prefill_chunk], chunk_size=prefill_chunk)
    if logits is None:
        raise ValueError("generate needs a non-empty prompt: at least the assistant prefix token")
    reply: list[int] = []
    while True:
        if should_stop():
            return "cancelled"
        token = sample(logits, params, generator, [reply])  # (1,)
        token_id = int(token.item())
        if token_id in stop_ids:
            return "stop"
        reply.append(token_id)
        yield token_id
        if len(reply) >= params.max_tokens:
            return "length"
        if should_stop():
            return "cancelled"
        logits = decode_step(model, state, token)


class StopStringMatcher:
    """Streams reply text while watching for stop strings, never emitting text that a stop string removes.

    Text that might be the beginning of a stop string is held back until it is known not to be one; when a
    stop string completes, everything from its start is dropped (generation stops at the first stop string
    to complete, as a client reading character by character would see it). So the emitted pieces
    concatenate to exactly the final reply, which is what streaming clients display and the store keeps.
    """

    def __init__(self, stop_strings: Sequence[str]) -> None:
        self._stops = tuple(stop_strings)
        self._held = ""
        self.stopped = False

    def push(self, text: str) -> str:
        """Add decoded text; return the part that is now safe to show (may be empty)."""
        if self.stopped:
            return ""
        if not self._stops:
            return text
        buffer = self._held + text
        # The match that completes first (earliest end; on a tie the longer one) is the one a
        # character-by-character stream would hit, so the result does not depend on how text is split.
        hits = [(i + len(s), i) for s, i in ((s, buffer.find(s)) for s in self._stops) if i >= 0]
        if hits:
            self.stopped = True
            self._held = ""
            return buffer[: min(hits)[1]]
        keep = self._longest_partial_stop(buffer)
        self._held = buffer[len(buffer) - keep :] if keep else ""
        return buffer[: len(buffer) - keep]

    def flush(self) -> str:
        """The reply ended without a stop string: release whatever was held back."""
        held, self._held = self._held, ""
        return "" if self.stopped else held

    def _longest_partial_stop(self, buffer: str) -> int:
        """Length of the longest suffix of buffer that is a proper prefix of some stop string."""
        best = 0
        for stop in self._stops:
            for n in range(min(len(stop) - 1, len(buffer)), best, -1):
                if buffer.endswith(stop[:n]):
                    best = n
                    break
        return best

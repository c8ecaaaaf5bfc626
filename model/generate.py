"""Generation in small steps: sample -> prefill -> decode_step -> generate (an iterator of token ids).

Everything here works on one DecodeState that the caller owns, so a chat turn feeds only its new tokens
and the service can cache states between turns. Nothing here knows about HTTP, Redis or threads: the
service's engine drives `generate()` one `next()` at a time, which is also what makes cancellation land
within one decode step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Generator, Mapping, Sequence
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
    # Token ids never sampled, whatever logit_bias says: the tokenizer's special ids that carry no text
    # and end nothing (padding, unknown), which would otherwise be stored invisibly in a reply.
    suppress_ids: tuple[int, ...] = ()

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
        object.__setattr__(self, "suppress_ids", tuple(self.suppress_ids))

    def make_generator(self, device: torch.device | str = "cpu") -> torch.Generator:
        """A fresh generator for one request: seeded when `seed` is set, else from OS entropy."""
        generator = torch.Generator(device=device)
        if self.seed is None:
            generator.seed()
        else:
            generator.manual_seed(self.seed)
        return generator


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
    The rows draw from `generator` one after another.
    """
    rows = logits.shape[0]
    if history_ids is not None and len(history_ids) != rows:
        raise ValueError(f"history_ids has {len(history_ids)} rows but logits has {rows}")
    histories = history_ids if history_ids is not None else [()] * rows
    picks = sample_rows(logits, [params] * rows, [generator] * rows, histories)
    return torch.tensor(picks, dtype=torch.long, device=logits.device)


def sample_rows(
    logits: Tensor,
    params: Sequence[SamplingParams],
    generators: Sequence[torch.Generator | None],
    history_ids: Sequence[Sequence[int]],
) -> list[int]:
    """One token per row of logits (B, V), each row with its own parameters, generator and reply so far.

    The rows are different conversations that share one decode step of the continuous-batching engine,
    so a row's token must depend only on its own logits, parameters and generator: a seeded request
    then draws the same reply whoever its batch companions are. The work runs on all rows at once; each
    row's generator gives one uniform number, and the token is where it falls in the row's cumulative
    distribution (inverse-CDF sampling: one vectorised search instead of a multinomial call per row).
    """
    rows = logits.shape[0]
    if not len(params) == len(generators) == len(history_ids) == rows:
        raise ValueError(
            f"need one params, generator and history per row: {rows} rows, {len(params)} params, "
            f"{len(generators)} generators, {len(history_ids)} histories"
        )
    logits = logits.float().clone()  # (B, V)
    _apply_logit_bias(logits, [p.logit_bias for p in params])
    _apply_repetition_penalty(logits, [p.repetition_penalty for p in params], history_ids)
    # Extreme but valid parameters (a bias of 1e38, a penalty of 1e-40) can overflow float32 to inf, and
    # inf - inf is NaN; clamped, every later step stays finite or -inf.
    limit = torch.finfo(logits.dtype).max
    logits.clamp_(-limit, limit)
    _suppress(logits, [p.suppress_ids for p in params])
    picks: list[int] = logits.argmax(dim=-1).tolist()  # the greedy rows' answer
    # Rows with a top-k filter need only their k best tokens (topk is far cheaper than a full sort).
    sampled = [r for r, p in enumerate(params) if p.temperature > 0]
    cut = [r for r in sampled if 0 < params[r].top_k < logits.shape[-1]]
    whole = [r for r in sampled if not 0 < params[r].top_k < logits.shape[-1]]
    for group in (cut, whole):
        if group:
            tokens = _draw(logits, group, [params[r] for r in group], [generators[r] for r in group])
            for row, token in zip(group, tokens, strict=True):
                picks[row] = token
    return picks


def _apply_logit_bias(logits: Tensor, biases: Sequence[Mapping[int, float]]) -> None:
    """Add each row's bias to its logits (B, V) in place; ids outside the vocabulary are refused."""
    vocab = logits.shape[-1]
    outside = sorted({i for bias in biases for i in bias if not 0 <= i < vocab})
    if outside:
        raise ValueError(f"logit_bias token ids {outside} are outside the vocabulary [0, {vocab})")
    rows = [row for row, bias in enumerate(biases) for _ in bias]
    if rows:
        device = logits.device
        index = (
            torch.tensor(rows, device=device),
            torch.tensor([i for b in biases for i in b], device=device),
        )
        values = torch.tensor([v for b in biases for v in b.values()], device=device, dtype=logits.dtype)
        logits.index_put_(index, values, accumulate=True)


def _suppress(logits: Tensor, suppressed: Sequence[tuple[int, ...]]) -> None:
    """Set each row's suppressed ids to -inf in place: no bias or penalty can bring them back."""
    rows = [row for row, ids in enumerate(suppressed) for _ in ids]
    if rows:
        columns = [i for ids in suppressed for i in ids]
        logits[torch.tensor(rows, device=logits.device), torch.tensor(columns, device=logits.device)] = float(
            "-inf"
        )


def _apply_repetition_penalty(
    logits: Tensor, penalties: Sequence[float], history_ids: Sequence[Sequence[int]]
) -> None:
    """CTRL's rule, in place: a seen token's positive logit is divided by the penalty, a negative one
    multiplied (dividing a negative logit would *raise* its probability). Each token is penalised once
    however often it appeared, as in CTRL and HF."""
    rows, tokens, factors = [], [], []
    for row, (penalty, ids) in enumerate(zip(penalties, history_ids, strict=True)):
        if penalty != 1.0 and ids:
            seen = sorted(set(ids))
            rows += [row] * len(seen)
            tokens += seen
            factors += [penalty] * len(seen)
    if rows:
        device = logits.device
        index = (torch.tensor(rows, device=device), torch.tensor(tokens, device=device))
        factor = torch.tensor(factors, device=device, dtype=logits.dtype)
        seen_logits = logits[index]
        logits[index] = torch.where(seen_logits > 0, seen_logits / factor, seen_logits * factor)


def _draw(
    logits: Tensor, rows: list[int], params: list[SamplingParams], generators: list[torch.Generator | None]
) -> list[int]:
    """Temperature, top-k and top-p for these rows of logits (B, V), then one inverse-CDF draw per row.

    Works on the rows' candidates sorted best first: all tokens, or (when every row here has a top-k) the
    best max(k) of them. Top-k keeps a row's first k candidates; top-p keeps the smallest prefix whose
    probability reaches p (a candidate is dropped when those ranked above it already reach p).
    """
    device = logits.device
    temperature = torch.tensor([p.temperature for p in params], device=device)[:, None]  # (S, 1)
    chosen = logits[torch.tensor(rows, device=device)]  # (S, V)
    # Best logit first brought to 0, so any temperature (1e-45 included) divides into [-inf, 0], never
    # inf/inf or 0/0: a vanishing temperature becomes the argmax it tends to, not NaN.
    shifted = chosen - chosen.max(dim=-1, keepdim=True).values
    scaled = shifted / temperature.clamp(min=torch.finfo(temperature.dtype).tiny)  # (S, V)
    vocab = scaled.shape[-1]
    ks = [p.top_k if 0 < p.top_k < vocab else vocab for p in params]
    if max(ks) < vocab:
        values, order = torch.topk(scaled, max(ks), dim=-1)  # (S, K), best first
    else:
        values, order = torch.sort(scaled, dim=-1, descending=True)  # (S, V)
    rank = torch.arange(values.shape[-1], device=device)
    values = values.masked_fill(rank >= torch.tensor(ks, device=device)[:, None], float("-inf"))
    top_p = torch.tensor([p.top_p for p in params], device=device, dtype=values.dtype)[:, None]  # (S, 1)
    probs = values.softmax(dim=-1)
    drop = (probs.cumsum(dim=-1) - probs >= top_p) & (top_p < 1.0)
    drop[:, 0] = False  # the best candidate always stays (a top_p of 1e-300 is 0 in float32)
    cdf = values.masked_fill(drop, float("-inf")).softmax(dim=-1).cumsum(dim=-1)  # (S, K)
    total = cdf[:, -1:]
    uniform = torch.cat([torch.rand(1, generator=g, device=device) for g in generators])[:, None]  # (S, 1)
    # Strictly below the total, so the search always lands on a token with probability > 0.
    target = torch.minimum(uniform * total, torch.nextafter(total, torch.zeros_like(total)))
    position = torch.searchsorted(cdf, target, right=True)  # (S, 1): first candidate whose cdf > target
    return order.gather(-1, position).squeeze(-1).tolist()


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
) -> Generator[int, None, FinishReason]:
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

"""Generation: sampling rules, stop conditions, cancellation, and agreement with the plain forward pass."""

from __future__ import annotations

import itertools
from collections.abc import Iterator

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from model.config import ReformerConfig
from model.generate import (
    SamplingParams,
    StopStringMatcher,
    decode_step,
    generate,
    prefill,
    sample,
)
from model.reformer import ReformerLM

VOCAB = 64
PROMPT = [5, 9, 12, 3, 7, 30, 2, 11, 40, 41, 42, 8]


@pytest.fixture(scope="module")
def model() -> Iterator[ReformerLM]:
    # One intra-op thread: a tiny model's ops are too small to split, and on shared cores extra threads
    # only wait for each other.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    torch.manual_seed(1234)
    yield ReformerLM(ReformerConfig.tiny(vocab_size=VOCAB)).eval()
    torch.set_num_threads(threads)


def run(
    model: ReformerLM, params: SamplingParams, prompt: list[int] = PROMPT, **kwargs
) -> tuple[list[int], str]:
    """All yielded ids and the generator's return value (the finish reason)."""
    with torch.no_grad():
        steps = generate(model, model.init_state(1), prompt, params, **kwargs)
        ids: list[int] = []
        while True:
            try:
                ids.append(next(steps))
            except StopIteration as stop:
                return ids, stop.value


def reference_greedy(model: ReformerLM, prompt: list[int], n: int, penalty: float = 1.0) -> list[int]:
    """Greedy decoding by re-running the full forward pass on the whole sequence at every step, with
    CTRL's repetition penalty applied by hand over the reply so far."""
    sequence, reply = list(prompt), []
    with torch.no_grad():
        for _ in range(n):
            logits = model(torch.tensor([sequence]))[0, -1].clone()
            for token in set(reply):
                logits[token] = logits[token] / penalty if logits[token] > 0 else logits[token] * penalty
            token = int(logits.argmax())
            sequence.append(token)
            reply.append(token)
    return reply


def test_greedy_matches_the_forward_pass_and_is_deterministic(model: ReformerLM) -> None:
    params = SamplingParams(temperature=0, max_tokens=16)
    first, reason = run(model, params)
    second, _ = run(model, params)
    assert reason == "length"
    assert first == second == reference_greedy(model, PROMPT, 16)


def test_repetition_penalty_applies_to_the_reply_so_far(model: ReformerLM) -> None:
    # 24 tokens: the unpenalised greedy reply of this model starts repeating itself by then.
    params = SamplingParams(temperature=0, max_tokens=24, repetition_penalty=1.8)
    ids, _ = run(model, params)
    assert ids == reference_greedy(model, PROMPT, 24, penalty=1.8)
    assert ids != run(model, SamplingParams(temperature=0, max_tokens=24))[0]  # the penalty changed the reply


def test_same_seed_same_reply_other_seed_other_reply(model: ReformerLM) -> None:
    a, _ = run(model, SamplingParams(temperature=1.0, max_tokens=32, seed=7))
    b, _ = run(model, SamplingParams(temperature=1.0, max_tokens=32, seed=7))
    c, _ = run(model, SamplingParams(temperature=1.0, max_tokens=32, seed=8))
    assert a == b
    assert a != c


def test_top_k_one_and_tiny_top_p_are_greedy(model: ReformerLM) -> None:
    greedy, _ = run(model, SamplingParams(temperature=0, max_tokens=20))
    top_k, _ = run(model, SamplingParams(temperature=1.5, top_k=1, max_tokens=20, seed=3))
    top_p, _ = run(model, SamplingParams(temperature=1.5, top_p=1e-6, max_tokens=20, seed=3))
    assert top_k == greedy
    assert top_p == greedy


def test_sample_penalty_divides_positive_and_multiplies_negative_logits() -> None:
    params = SamplingParams(temperature=0, repetition_penalty=2.0)
    positive = torch.tensor([[4.0, 3.0]])
    assert sample(positive, params, history_ids=[[]]).tolist() == [0]
    assert sample(positive, params, history_ids=[[0]]).tolist() == [1]  # 4.0 / 2 = 2.0 < 3.0
    # Dividing -1.0 would raise it to -0.5 and win; CTRL multiplies instead: -2.0 < -1.5.
    negative = torch.tensor([[-1.0, -1.5]])
    assert sample(negative, params, history_ids=[[0]]).tolist() == [1]
    # Rows are penalised independently, each by its own history.
    both = torch.tensor([[4.0, 3.0], [4.0, 3.0]])
    assert sample(both, params, history_ids=[[0], []]).tolist() == [1, 0]


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=1e-45),  # a float32 denormal: logits / t overflow to +-inf
        SamplingParams(temperature=1e-300, top_p=0.5),  # 0 in float32
        SamplingParams(temperature=1.0, top_p=1e-300),  # 0 in float32: the nucleus must keep the best
        SamplingParams(temperature=1.0, repetition_penalty=1e-40),  # seen logits / 1e-40 -> inf
        SamplingParams(temperature=1.0, top_k=3, logit_bias={2: 1e38, 4: 1e38}),  # 3.4e38 + 1e38 -> inf
    ],
)
def test_extreme_valid_parameters_still_draw_a_real_token(params: SamplingParams) -> None:
    """Found by the API fuzzer: such values turned logits into inf - inf = NaN and the draw indexed
    past the vocabulary (a 500). Tiny temperatures must act as the argmax they tend to."""
    logits = torch.tensor([[0.5, 2.0, -1.0, 3.0e38, 0.0, 1.5]]).repeat(8, 1)
    generator = torch.Generator().manual_seed(0)
    picks = sample(logits, params, generator, history_ids=[[0, 1]] * 8).tolist()
    assert all(0 <= token < logits.shape[-1] for token in picks)
    if params.temperature < 1e-30 or params.top_p < 1e-30:
        assert picks == [3] * 8


def test_sample_filters_keep_only_allowed_tokens() -> None:
    logits = torch.tensor([[2.0, 1.9, 1.8, -3.0, -4.0]]).repeat(200, 1)
    generator = torch.Generator().manual_seed(0)
    top_k = sample(logits, SamplingParams(temperature=2.0, top_k=2), generator)
    assert set(top_k.tolist()) == {0, 1}
    # The top three hold ~99 % of the mass at temperature 1: top_p=0.9 keeps exactly them.
    top_p = sample(logits, SamplingParams(temperature=1.0, top_p=0.9), generator)
    assert set(top_p.tolist()) == {0, 1, 2}


def test_logit_bias_bans_and_forces_tokens(model: ReformerLM) -> None:
    greedy, _ = run(model, SamplingParams(temperature=0, max_tokens=10))
    banned, _ = run(model, SamplingParams(temperature=0, max_tokens=10, logit_bias={greedy[0]: -100}))
    assert greedy[0] not in banned
    forced, _ = run(model, SamplingParams(temperature=1.0, max_tokens=10, seed=1, logit_bias={17: 100}))
    assert forced == [17] * 10
    with pytest.raises(ValueError, match="outside the vocabulary"):
        run(model, SamplingParams(temperature=0, max_tokens=2, logit_bias={VOCAB: 1.0}))


def test_stop_token_ends_the_reply_and_is_not_yielded(model: ReformerLM) -> None:
    greedy, _ = run(model, SamplingParams(temperature=0, max_tokens=12))
    stop = greedy[5]
    first_stop = greedy.index(stop)
    ids, reason = run(model, SamplingParams(temperature=0, max_tokens=12, stop_token_ids=(stop,)))
    assert reason == "stop"
    assert ids == greedy[:first_stop]


def test_state_sees_prompt_and_all_but_the_last_token(model: ReformerLM) -> None:
    """What lets the service feed stored ids from state.length onwards without gaps or repeats."""
    with torch.no_grad():
        state = model.init_state(1)
        ids = list(generate(model, state, PROMPT, SamplingParams(temperature=0, max_tokens=6)))
    assert len(ids) == 6
    assert int(state.length[0]) == len(PROMPT) + 5


def test_cancellation_lands_within_one_step(model: ReformerLM) -> None:
    cancelled = False
    with torch.no_grad():
        state = model.init_state(1)
        steps = generate(
            model, state, PROMPT, SamplingParams(temperature=0, max_tokens=50), lambda: cancelled
        )
        got = [next(steps), next(steps), next(steps)]
        cancelled = True
        with pytest.raises(StopIteration) as stop:
            next(steps)
    assert stop.value.value == "cancelled"
    assert len(got) == 3
    # The third token was never fed back: no decode step ran after the cancel.
    assert int(state.length[0]) == len(PROMPT) + 2


def test_cancel_before_start_runs_nothing(model: ReformerLM) -> None:
    with torch.no_grad():
        state = model.init_state(1)
        ids = list(generate(model, state, PROMPT, SamplingParams(max_tokens=5), lambda: True))
    assert ids == []
    assert int(state.length[0]) == 0


def test_chunked_prefill_equals_one_call_and_decode_step_continues_it(model: ReformerLM) -> None:
    with torch.no_grad():
        whole_state, chunked_state = model.init_state(1), model.init_state(1)
        whole = prefill(model, whole_state, PROMPT, chunk_size=len(PROMPT))
        chunked = prefill(model, chunked_state, PROMPT, chunk_size=5)
        torch.testing.assert_close(chunked, whole, rtol=1e-4, atol=1e-5)
        token = whole.argmax(dim=-1)
        next_logits = decode_step(model, whole_state, token)
        expected = model(torch.tensor([[*PROMPT, int(token)]]))[:, -1]
    torch.testing.assert_close(next_logits, expected, rtol=1e-4, atol=1e-5)


def test_invalid_inputs_raise_with_the_fix() -> None:
    for kwargs, message in [
        ({"temperature": -1}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_p": 0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"stop_strings": ("",)}, "stop strings"),
        ({"logit_bias": {1: float("nan")}}, "logit_bias"),
    ]:
        with pytest.raises(ValueError, match=message):
            SamplingParams(**kwargs)


def test_generate_refuses_an_empty_prompt_and_a_batched_state(model: ReformerLM) -> None:
    with torch.no_grad(), pytest.raises(ValueError, match="non-empty prompt"):
        next(generate(model, model.init_state(1), [], SamplingParams()))
    with torch.no_grad(), pytest.raises(ValueError, match="batch size 2"):
        next(generate(model, model.init_state(2), PROMPT, SamplingParams()))


# ---- stop strings -----------------------------------------------------------------------------------
_TEXT = st.text(alphabet="abc\u00e9\U0001f600 ", max_size=40)


def _stream(text: str, cuts: list[int], stops: list[str]) -> str:
    matcher = StopStringMatcher(stops)
    bounds = sorted({0, len(text), *(c % (len(text) + 1) for c in cuts)})
    out = "".join(matcher.push(text[a:b]) for a, b in itertools.pairwise(bounds))
    return out + matcher.flush()


@settings(max_examples=300, deadline=None)
@given(
    text=_TEXT, cuts=st.lists(st.integers(0, 60), max_size=12), stops=st.lists(_TEXT.filter(bool), max_size=3)
)
def test_stop_strings_cut_at_the_first_completed_match_however_the_text_is_split(
    text: str, cuts: list[int], stops: list[str]
) -> None:
    # The first stop string to complete ends the text; it is cut at that match's start.
    hits = [(i + len(s), i) for s, i in ((s, text.find(s)) for s in stops) if i >= 0]
    expected = text[: min(hits)[1]] if hits else text
    assert _stream(text, cuts, stops) == expected


def test_stop_string_text_is_held_back_until_it_cannot_match() -> None:
    matcher = StopStringMatcher(["\nUser:"])
    assert matcher.push("Hello\nUs") == "Hello"  # "\nUs" might start the stop string
    assert matcher.push("ually") == "\nUsually"
    assert matcher.push(" fine.\nUser: hi") == " fine."
    assert matcher.stopped
    assert matcher.push("more") == ""
    assert matcher.flush() == ""

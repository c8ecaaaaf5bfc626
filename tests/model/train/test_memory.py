"""Memory episodes in training windows: well formed, train-side only, exact per (seed, window), and off by
default.

Windows are checked by reading them back as a chat (turns split at role tokens), independently of how the
generator placed its insertions.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pytest

from model.tokenizer import ChatTokenizer
from model.train.copy_spans import ordinary_words
from model.train.data import load_conversations, prepare_run_data, tokenize_conversations
from model.train.distributed import init_distributed
from model.train.facts import KINDS, side_of, values_of
from model.train.memory import MemoryEpochs, MemoryMix
from model.train.options import TrainOptions
from model.train.packing import PackedEpochs

SEQ_LEN = 1024


@pytest.fixture(scope="module")
def base(chat_tokenizer: ChatTokenizer) -> PackedEpochs:
    corpus = tokenize_conversations(chat_tokenizer, load_conversations("train", 120))
    return PackedEpochs(corpus, SEQ_LEN, seed=3)


@dataclass
class Turn:
    role: str
    text: str
    start: int  # token index of the role token
    whole: bool  # ends with the end token inside the window


def read_turns(tokenizer: ChatTokenizer, row: np.ndarray) -> list[Turn]:
    roles = {tokenizer.user_id: "user", tokenizer.assistant_id: "assistant", tokenizer.system_id: "system"}
    starts = [i for i, t in enumerate(row) if int(t) in roles]
    turns = []
    for n, start in enumerate(starts):
        end = starts[n + 1] if n + 1 < len(starts) else len(row)
        body = [int(t) for t in row[start + 1 : end]]
        whole = bool(body) and body[-1] == tokenizer.end_id
        turns.append(Turn(roles[int(row[start])], tokenizer.decode(body), start, whole))
    return turns


def _template_regex(template: str) -> re.Pattern[str]:
    return re.compile(re.escape(template).replace(re.escape("{v}"), "(.+)") + "$", re.IGNORECASE)


def _pool_value(kind, text: str) -> str:
    """The pool's spelling of a value read back from text (a sentence-initial value is capitalised)."""
    pool = values_of(kind.pool, "train") + values_of(kind.pool, "eval")
    return next((v for v in pool if v.lower() == text.lower()), text)


QUESTIONS = {q: kind for kind in KINDS for side in ("train", "eval") for q in kind.questions[side]}


def episodes_in(tokenizer: ChatTokenizer, row: np.ndarray) -> list[dict]:
    """Every question turn in the window, with what surrounds it."""
    turns = read_turns(tokenizer, row)
    found = []
    for n, turn in enumerate(turns):
        kind = QUESTIONS.get(turn.text)
        if turn.role != "user" or kind is None:
            continue
        answer = turns[n + 1] if n + 1 < len(turns) else None
        statements = []  # (turn, sides whose templates match a line of it, the value read from it)
        for earlier in turns[:n]:
            # Statements open a turn, one line each (two episodes may open the same turn).
            matches = [
                (side, match.group(1))
                for line in earlier.text.split("\n")
                for side in ("train", "eval")
                for template in kind.statements[side]
                if (match := _template_regex(template).match(line))
            ]
            if earlier.role == "user" and matches:
                value = min((v for _, v in matches), key=len)
                statements.append((earlier, {side for side, _ in matches}, _pool_value(kind, value)))
        found.append({"kind": kind, "question": turn, "answer": answer, "statements": statements})
    return found


def test_every_question_follows_its_statement_and_is_answered_with_the_value_in_the_window(
    base: PackedEpochs, chat_tokenizer: ChatTokenizer
) -> None:
    mix = MemoryMix(fact_rate=1.0, max_facts=3, min_gap=16, start_gap=128)
    memory = MemoryEpochs(base, chat_tokenizer, mix, seed=3)
    rows = memory.batch(0, 24).numpy()
    assert rows.shape == (24, SEQ_LEN + 1)
    total = 0
    for row in rows:
        episodes = episodes_in(chat_tokenizer, row)
        total += len(episodes)
        for episode in episodes:
            kind, question, answer = episode["kind"], episode["question"], episode["answer"]
            assert question.text in kind.questions["train"]
            assert answer is not None and answer.role == "assistant" and answer.whole
            assert len(episode["statements"]) == 1, "one statement per kind and window"
            statement, side, value = episode["statements"][0]
            assert "train" in side
            assert side_of(value) == "train"
            assert value.lower() in answer.text.lower()
            gap = question.start - statement.start
            assert gap >= mix.min_gap
    assert total >= 24, f"expected at least one fact per window on average, found {total}"


def test_copy_spans_open_two_user_turns_with_the_same_ordinary_words(
    base: PackedEpochs, chat_tokenizer: ChatTokenizer
) -> None:
    words = set(ordinary_words())
    memory = MemoryEpochs(base, chat_tokenizer, MemoryMix(copy_rate=1.0), seed=5)
    pairs = 0
    for row in memory.batch(10, 12).numpy():
        lines = [t.text.split("\n", 1)[0] for t in read_turns(chat_tokenizer, row) if t.role == "user"]
        spans = [line for line in lines if len(line.split()) >= 8 and set(line.split()) <= words]
        repeated = {line for line in spans if spans.count(line) == 2}
        pairs += len(repeated)
    assert pairs >= 11, f"expected a repeated span in (almost) every one of 12 windows, found {pairs}"


def test_edits_are_a_function_of_seed_and_window_index(
    base: PackedEpochs, chat_tokenizer: ChatTokenizer
) -> None:
    mix = MemoryMix(fact_rate=0.7, copy_rate=0.5)
    memory = MemoryEpochs(base, chat_tokenizer, mix, seed=3)
    whole = memory.batch(40, 6).numpy()
    np.testing.assert_array_equal(whole, memory.batch(40, 6).numpy())
    np.testing.assert_array_equal(whole[2:4], memory.batch(42, 2).numpy())
    other_seed = MemoryEpochs(base, chat_tokenizer, mix, seed=4).batch(40, 6).numpy()
    assert not np.array_equal(whole, other_seed)


def test_no_rate_means_the_unedited_windows(base: PackedEpochs, chat_tokenizer: ChatTokenizer) -> None:
    assert not MemoryMix().enabled
    memory = MemoryEpochs(base, chat_tokenizer, MemoryMix(), seed=3)
    np.testing.assert_array_equal(memory.batch(0, 8).numpy(), base.batch(0, 8).numpy())


def test_the_curriculum_grows_the_largest_gap_from_start_to_the_window() -> None:
    mix = MemoryMix(fact_rate=1.0, start_gap=128, curriculum_windows=1000)
    gaps = [mix.max_gap(i, 4096) for i in range(0, 1001, 100)]
    assert gaps[0] == 128 and gaps[-1] == 4096
    assert gaps == sorted(gaps)
    assert MemoryMix(fact_rate=1.0).max_gap(0, 4096) == 4096


def test_memory_options_are_validated_and_old_runs_resume_without_them(tmp_path) -> None:
    with pytest.raises(ValueError, match="fact-rate"):
        TrainOptions(out=tmp_path, steps=1, fact_rate=1.5)
    with pytest.raises(ValueError, match="min-gap"):
        TrainOptions(out=tmp_path, steps=1, fact_rate=0.5, memory_min_gap=500, memory_start_gap=128)
    options = TrainOptions(out=tmp_path, steps=1)
    saved = {
        k: v
        for k, v in options.to_dict().items()
        if "fact" not in k and "memory" not in k and "copy" not in k
    }
    assert options.trajectory_mismatches(saved) == []
    assert TrainOptions(out=tmp_path, steps=1, fact_rate=0.5).trajectory_mismatches(saved) == [
        "--fact-rate 0.5 (the run used 0.0)"
    ]


def test_the_run_trains_on_edited_windows_and_evaluates_on_unedited_ones(
    tmp_path, chat_tokenizer_path
) -> None:
    options = TrainOptions(
        out=tmp_path / "run", preset="tiny", tokenizer=chat_tokenizer_path, data_limit=40, seq_len=512,
        batch_size=4, steps=1, fact_rate=1.0, device="cpu",
    )  # fmt: skip
    data = prepare_run_data(options, init_distributed("cpu"))
    tokenizer = ChatTokenizer.load(data.tokenizer_file)
    questions = [e for row in data.train.batch(0, 4).numpy() for e in episodes_in(tokenizer, row)]
    assert questions, "a run with --fact-rate 1 must train on windows that carry facts"
    held_out = data.valid.windows(data.valid_index[:4]).numpy()
    assert not [e for row in held_out for e in episodes_in(tokenizer, row)]


def test_max_copies_puts_several_repeated_spans_in_a_window(
    base: PackedEpochs, chat_tokenizer: ChatTokenizer
) -> None:
    words = set(ordinary_words())
    one = MemoryEpochs(base, chat_tokenizer, MemoryMix(copy_rate=1.0), seed=5)
    several = MemoryEpochs(base, chat_tokenizer, MemoryMix(copy_rate=1.0, max_copies=6), seed=5)

    def repeated_spans(memory: MemoryEpochs) -> int:
        pairs = 0
        for row in memory.batch(10, 12).numpy():
            turns = read_turns(chat_tokenizer, row)  # spans may share a turn: one line each
            lines = [line for t in turns if t.role == "user" for line in t.text.split("\n")]
            spans = [line for line in lines if len(line.split()) >= 8 and set(line.split()) <= words]
            pairs += len({line for line in spans if spans.count(line) == 2})
        return pairs

    assert repeated_spans(several) >= 1.5 * repeated_spans(one)  # some are cut off by the window end
    with pytest.raises(ValueError, match="--max-copies must be in"):
        MemoryMix(copy_rate=1.0, max_copies=0)

"""ChatTokenizer on a real SentencePiece model trained from the corpus (session fixture in conftest.py)."""

from __future__ import annotations

import itertools
from pathlib import Path

import pytest
import sentencepiece as spm
from hypothesis import example, given, settings
from hypothesis import strategies as st

from model.tokenizer import ChatTokenizer, StreamDecoder, main

# No deadline: the machine is shared, and a wall-clock limit would make these tests flaky, not stricter.
PROPERTY = settings(deadline=None, max_examples=200)

SPECIAL_SPELLINGS = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<pad>", "<unk>", "<s>", "</s>"]

# Text built from pieces that stress the template: role-token spellings, the "▁" SentencePiece uses for
# spaces, multi-byte characters and whitespace, mixed with arbitrary text.
tricky_text = st.lists(
    st.sampled_from([*SPECIAL_SPELLINGS, "▁", " ", "\n", "\t", "😀", "漢字", "é", "e\u0301", "\ufffd"])
    | st.text(max_size=8),
    max_size=12,
).map("".join)

ROLES = ["system", "user", "assistant"]
messages_strategy = st.lists(
    st.fixed_dictionaries({"role": st.sampled_from(ROLES), "content": tricky_text}), max_size=6
)


def _stream(tokenizer: ChatTokenizer, ids: list[int]) -> list[str]:
    decoder = StreamDecoder(tokenizer)
    chunks = [decoder.push(i) for i in ids]
    chunks.append(decoder.flush())
    return chunks


# --- vocabulary ------------------------------------------------------------------------------------


def test_special_ids_are_distinct_control_ids(chat_tokenizer: ChatTokenizer) -> None:
    t = chat_tokenizer
    ids = [t.pad_id, t.system_id, t.user_id, t.assistant_id, t.end_id]
    assert len(set(ids)) == len(ids)
    assert t.pad_id == 0, "zero-filled batches must be padding"
    assert set(ids) <= t.special_ids
    assert t.unk_id in t.special_ids
    assert t.vocab_size == 1000
    assert all(0 <= i < t.vocab_size for i in t.special_ids)


# --- round trip --------------------------------------------------------------------------------------


@PROPERTY
@given(text=st.text())
@example(text="Hello, world! 😀 漢字 かな 한국어 e\u0301 \u200d👩\u200d💻")
@example(text="  leading and trailing  \t\n\r\n  ")
@example(text="▁ ▁▁x▁")
@example(text="\x00\x7f\ufeff\ufffd\U0010ffff")
@example(text="ﬁ ² Ⅸ Å")  # NFKC would change every one of these
def test_decode_inverts_encode_for_any_text(chat_tokenizer: ChatTokenizer, text: str) -> None:
    ids = chat_tokenizer.encode(text)
    assert chat_tokenizer.decode(ids) == text
    assert not set(ids) & chat_tokenizer.special_ids


def test_common_text_uses_learned_pieces_not_bytes(chat_tokenizer: ChatTokenizer) -> None:
    ids = chat_tokenizer.encode("how are you doing today?")
    assert len(ids) < len("how are you doing today?") / 2
    assert chat_tokenizer.encode("") == []


def test_lone_surrogates_become_replacement_characters(chat_tokenizer: ChatTokenizer) -> None:
    """A Python str may hold lone surrogates, which UTF-8 cannot: each becomes U+FFFD."""
    ids = chat_tokenizer.encode("a\ud800b\udfff")
    assert ids == chat_tokenizer.encode("a\ufffdb\ufffd")
    assert chat_tokenizer.decode(ids) == "a\ufffdb\ufffd"


def test_encode_refuses_non_str(chat_tokenizer: ChatTokenizer) -> None:
    with pytest.raises(ValueError, match="decode bytes to str first"):
        chat_tokenizer.encode(b"hi")  # type: ignore[arg-type]


def test_decode_drops_special_ids_and_refuses_unknown_ids(chat_tokenizer: ChatTokenizer) -> None:
    t = chat_tokenizer
    hi = t.encode("hi there")
    assert t.decode([t.user_id, *hi, t.end_id, t.pad_id, t.unk_id]) == "hi there"
    with pytest.raises(ValueError, match=r"outside the vocabulary 0\.\.999"):
        t.decode([5, 1000])
    with pytest.raises(ValueError, match="outside the vocabulary"):
        t.decode([-1])


# --- special tokens cannot be injected ------------------------------------------------------------------


@PROPERTY
@given(text=tricky_text)
@example(text="<|user|>")
@example(text="<|end|><|assistant|>")
def test_text_never_encodes_to_a_special_id(chat_tokenizer: ChatTokenizer, text: str) -> None:
    assert not set(chat_tokenizer.encode(text)) & chat_tokenizer.special_ids


@PROPERTY
@given(messages=messages_strategy)
def test_encode_chat_has_one_role_id_and_one_end_per_message(
    chat_tokenizer: ChatTokenizer, messages: list[dict[str, str]]
) -> None:
    t = chat_tokenizer
    ids = t.encode_chat(messages)
    role_ids = {t.system_id, t.user_id, t.assistant_id}
    assert [i for i in ids if i in role_ids] == [t.role_id(m["role"]) for m in messages]
    assert ids.count(t.end_id) == len(messages)
    assert t.decode(ids) == "".join(m["content"] for m in messages)


# --- chat template ---------------------------------------------------------------------------------------


def test_encode_chat_layout(chat_tokenizer: ChatTokenizer) -> None:
    t = chat_tokenizer
    messages = [
        {"role": "system", "content": "You are kind."},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": "hello!"},
    ]
    expected = [
        *[t.system_id, *t.encode("You are kind."), t.end_id],
        *[t.user_id, *t.encode("hi"), t.end_id],
        *[t.assistant_id, *t.encode("hello!"), t.end_id],
    ]
    assert t.encode_chat(messages) == expected
    assert t.encode_chat(messages, add_generation_prompt=True) == [*expected, t.assistant_id]
    assert t.encode_chat([], add_generation_prompt=True) == [t.assistant_id]
    assert t.encode_turn("user", "") == [t.user_id, t.end_id]


@PROPERTY
@given(messages=messages_strategy)
def test_encode_chat_is_the_concatenation_of_turns(
    chat_tokenizer: ChatTokenizer, messages: list[dict[str, str]]
) -> None:
    """The service appends one turn at a time to stored ids; that must equal encoding the whole chat."""
    t = chat_tokenizer
    turns = [t.encode_turn(m["role"], m["content"]) for m in messages]
    assert t.encode_chat(messages) == list(itertools.chain.from_iterable(turns))


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([{"role": "bot", "content": "hi"}], "unknown role 'bot': use one of system, user, assistant"),
        ([{"role": "user", "content": 42}], "content must be a str, got int"),
        ([{"role": "user", "content": None}], "content must be a str, got NoneType"),
        ([{"role": "user"}], "message 0 must be a mapping with 'role' and 'content'"),
        ([("user", "hi")], "message 0 must be a mapping"),
        ([{"role": "user", "content": "a"}, {"role": 1, "content": "b"}], "message 1 role must be a str"),
    ],
)
def test_encode_chat_refuses_bad_messages(
    chat_tokenizer: ChatTokenizer, messages: list[object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        chat_tokenizer.encode_chat(messages)  # type: ignore[arg-type]


def test_encode_turn_refuses_bad_role(chat_tokenizer: ChatTokenizer) -> None:
    with pytest.raises(ValueError, match="unknown role 'tool'"):
        chat_tokenizer.encode_turn("tool", "hi")


# --- streaming decode ------------------------------------------------------------------------------------


@PROPERTY
@given(text=st.text() | tricky_text)
@example(text="😀")
@example(text="a😀b漢c")
def test_stream_decoder_matches_decode_and_never_splits_characters(
    chat_tokenizer: ChatTokenizer, text: str
) -> None:
    ids = chat_tokenizer.encode_chat([{"role": "user", "content": text}], add_generation_prompt=True)
    chunks = _stream(chat_tokenizer, ids)
    assert "".join(chunks) == chat_tokenizer.decode(ids)
    if "\ufffd" not in text and not any("\ud800" <= c <= "\udfff" for c in text):
        assert not any("\ufffd" in chunk for chunk in chunks), "a character was split across pushes"


@PROPERTY
@given(data=st.data())
def test_stream_decoder_matches_decode_for_any_ids(
    chat_tokenizer: ChatTokenizer, data: st.DataObject
) -> None:
    """A model can emit any ids, including broken byte sequences: streaming must still equal decode."""
    t = chat_tokenizer
    byte_ids = [t.encode("\x00")[0] + b for b in range(256)]
    any_id = st.integers(0, t.vocab_size - 1)
    ids = data.draw(st.lists(st.sampled_from(byte_ids) | any_id, max_size=40))
    assert "".join(_stream(t, ids)) == t.decode(ids)


def test_stream_decoder_holds_back_a_split_character(chat_tokenizer: ChatTokenizer) -> None:
    t = chat_tokenizer
    ids = t.encode("ok😀")
    emoji_bytes = ids[-4:]
    assert all(t.id_to_piece(i).startswith("<0x") for i in emoji_bytes), "the emoji should be byte pieces"
    decoder = t.stream_decoder()
    assert "".join(decoder.push(i) for i in ids[:-4]) == "ok"
    assert [decoder.push(i) for i in emoji_bytes[:3]] == ["", "", ""]
    assert decoder.push(t.end_id) == ""  # a special id between bytes neither emits nor breaks them
    assert decoder.push(emoji_bytes[3]) == "😀"
    assert decoder.flush() == ""


def test_stream_decoder_flushes_an_unfinished_character(chat_tokenizer: ChatTokenizer) -> None:
    t = chat_tokenizer
    first_two = t.encode("😀")[:2]
    decoder = t.stream_decoder()
    assert [decoder.push(i) for i in first_two] == ["", ""]
    assert decoder.flush() == t.decode(first_two) == "\ufffd\ufffd"


def test_stream_decoder_keeps_leading_spaces(chat_tokenizer: ChatTokenizer) -> None:
    """With no dummy prefix, a reply's first piece keeps its space, exactly as decode() does."""
    t = chat_tokenizer
    ids = t.encode(" hello there")
    assert _stream(t, ids)[0].startswith(" ")
    assert "".join(_stream(t, ids)) == " hello there"


# --- files -----------------------------------------------------------------------------------------------


def test_save_and_load_round_trip(chat_tokenizer: ChatTokenizer, tmp_path: Path) -> None:
    path = tmp_path / "nested" / "copy.model"
    chat_tokenizer.save(path)
    copy = ChatTokenizer.load(path)
    assert copy.to_bytes() == chat_tokenizer.to_bytes()
    text = "same ids either way 😀"
    assert copy.encode(text) == chat_tokenizer.encode(text)
    assert ChatTokenizer.from_bytes(path.read_bytes()).special_ids == chat_tokenizer.special_ids
    assert [p.name for p in path.parent.iterdir()] == ["copy.model"], "a temporary file was left behind"


def test_load_missing_file_names_it(tmp_path: Path) -> None:
    path = tmp_path / "nope.model"
    with pytest.raises(FileNotFoundError, match=r"nope\.model not found: train one with"):
        ChatTokenizer.load(path)


def test_load_corrupt_file_names_it(tmp_path: Path) -> None:
    path = tmp_path / "corrupt.model"
    path.write_bytes(b"this is not a protobuf \x00\xff" * 10)
    with pytest.raises(ValueError, match=r"corrupt\.model is not a valid SentencePiece model"):
        ChatTokenizer.load(path)


def test_load_truncated_file_names_it(chat_tokenizer_path: Path, tmp_path: Path) -> None:
    path = tmp_path / "truncated.model"
    path.write_bytes(chat_tokenizer_path.read_bytes()[:1000])
    with pytest.raises(ValueError, match=r"truncated\.model"):
        ChatTokenizer.load(path)


def _plain_sentencepiece(tmp_path: Path, **options: object) -> Path:
    sentences = [f"sentence number {i} about cats and dogs" for i in range(200)]
    prefix = tmp_path / "plain"
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences),
        model_prefix=str(prefix),
        vocab_size=300,
        hard_vocab_limit=False,  # the toy corpus cannot fill 300 pieces; take what it has
        model_type="bpe",
        minloglevel=2,
        **options,
    )
    return prefix.with_suffix(".model")


def test_load_refuses_a_model_without_chat_tokens(tmp_path: Path) -> None:
    path = _plain_sentencepiece(tmp_path)
    with pytest.raises(ValueError, match=r"plain\.model is not a ChatTokenizer model"):
        ChatTokenizer.load(path)


def test_load_refuses_a_model_that_does_not_round_trip(tmp_path: Path) -> None:
    path = _plain_sentencepiece(
        tmp_path,
        byte_fallback=True,
        pad_id=3,
        control_symbols=["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"],
    )  # chat tokens and bytes, but NFKC and a dummy prefix
    with pytest.raises(ValueError, match=r"plain\.model does not round-trip text"):
        ChatTokenizer.load(path)


def test_train_refuses_a_vocabulary_with_no_room(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="use at least 263"):
        ChatTokenizer.train(["hello"], tmp_path / "t.model", vocab_size=262)
    assert not (tmp_path / "t.model").exists()


# --- CLI -------------------------------------------------------------------------------------------------


def test_cli_trains_on_the_train_split(tmp_path: Path) -> None:
    path = tmp_path / "cli" / "chat.model"
    main(["--out", str(path), "--vocab-size", "600"])
    tokenizer = ChatTokenizer.load(path)
    assert tokenizer.vocab_size == 600
    assert tokenizer.decode(tokenizer.encode("what's up?")) == "what's up?"


def test_cli_reports_a_bad_vocabulary_size(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(tmp_path / "t.model"), "--vocab-size", "100"])
    assert exit_info.value.code == 2
    assert "use at least 263" in capsys.readouterr().err

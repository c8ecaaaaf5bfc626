"""SentencePiece tokenizer and the chat template: role tokens, end-of-turn, streaming decode.

Choices, and why:

- **BPE** rather than unigram: on this corpus both compress equally well at 8 K pieces, BPE trains
  several times faster, and it is what most chat models use, so its behaviour is familiar (the
  measurements: docs/MODEL.md, "The tokenizer").
- **Default vocabulary of 8,000.** The corpus is small. Past 8 K a doubling of the vocabulary barely
  shortens sequences, while every extra piece is a row of the embedding and of the output head that the
  model must learn from fewer and fewer examples (tokens per word by vocabulary size: docs/MODEL.md).
- **Lossless text.** `normalization_rule_name="identity"` (no NFKC), `remove_extra_whitespaces=False`
  and `byte_fallback=True`, so `decode(encode(text)) == text` for any text: characters outside the
  vocabulary (emoji, most CJK) become UTF-8 byte pieces. `add_dummy_prefix=False`, so no space is
  invented at the start of a text: decoding is then a plain concatenation of pieces, which is what lets
  the service append one turn's ids to a conversation and lets `StreamDecoder` emit text piece by piece.
- **Special tokens are SentencePiece control symbols** (`<|system|>`, `<|user|>`, `<|assistant|>`,
  `<|end|>` and `<pad>`): the segmenter never produces them from text, so a user typing "<|user|>"
  gets ordinary pieces and cannot forge a turn. There is no BOS/EOS: a turn starts with its role token
  and ends with `<|end|>`, which is all the chat template needs.
- **Two characters need care.** SentencePiece writes spaces as "▁" (U+2581), so a literal "▁" in the
  text would decode as a space: `encode` spells it with its three UTF-8 byte pieces instead. Lone
  surrogates (possible in a Python str, impossible in UTF-8) are replaced by U+FFFD, each.
"""

from __future__ import annotations

import argparse
import io
import logging
import os
import re
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import sentencepiece as spm

logger = logging.getLogger(__name__)

PAD = "<pad>"
SYSTEM = "<|system|>"
USER = "<|user|>"
ASSISTANT = "<|assistant|>"
END = "<|end|>"

# pad 0 so that zero-filled batches are padding; unk 1 (SentencePiece requires one, byte fallback means
# encode never emits it); then the four control symbols, the 256 byte pieces, then learned pieces.
_PAD_ID = 0
_UNK_ID = 1
# 6 special pieces + 256 byte pieces are always in the vocabulary; learned pieces come on top.
_MIN_VOCAB_SIZE = 6 + 256 + 1

# The reservoir SentencePiece samples its training sentences into: more than the train split's ~124 K
# turns, so the whole split is used, while a bigger corpus is sampled and training stays in seconds.
_INPUT_SENTENCE_SIZE = 200_000
# Some merged turns are long (up to ~95 KB); SentencePiece would silently skip those over 4 KB.
_MAX_SENTENCE_BYTES = 1 << 17

_SPACE_SYMBOL = "\u2581"
_LONE_SURROGATE = re.compile("[\ud800-\udfff]")


class ChatTokenizer:
    """A trained SentencePiece model plus the chat template built on its control symbols."""

    def __init__(self, processor: spm.SentencePieceProcessor, source: str) -> None:
        """Wrap a loaded processor; use `load`, `from_bytes` or `train` rather than calling this."""
        self._sp = processor
        self.vocab_size: int = processor.vocab_size()
        missing = [p for p in (PAD, SYSTEM, USER, ASSISTANT, END) if not processor.is_control(processor[p])]
        if missing or not processor.is_byte(processor["<0x00>"]):
            raise ValueError(
                f"{source} is not a ChatTokenizer model (missing pieces {missing} or byte fallback): "
                "train one with `python -m model.tokenizer --out PATH`"
            )
        self.pad_id: int = processor.piece_to_id(PAD)
        self.unk_id: int = processor.unk_id()
        self.system_id: int = processor.piece_to_id(SYSTEM)
        self.user_id: int = processor.piece_to_id(USER)
        self.assistant_id: int = processor.piece_to_id(ASSISTANT)
        self.end_id: int = processor.piece_to_id(END)
        self._role_ids = {"system": self.system_id, "user": self.user_id, "assistant": self.assistant_id}
        # Ids that never stand for text: decode drops them, and so does StreamDecoder.
        self.special_ids: frozenset[int] = frozenset(
            i for i in range(self.vocab_size) if processor.is_control(i) or processor.is_unknown(i)
        )
        # id -> byte value for the 256 byte-fallback pieces, which StreamDecoder must hold back on.
        self._byte_values: dict[int, int] = {processor.piece_to_id(f"<0x{b:02X}>"): b for b in range(256)}
        self._space_symbol_ids = [processor.piece_to_id(f"<0x{b:02X}>") for b in _SPACE_SYMBOL.encode()]
        probe = " a\u2581 \ufb01\t\n"
        if self.decode(self.encode("a") + self.encode(probe)) != "a" + probe:
            raise ValueError(
                f"{source} does not round-trip text (trained with normalisation or a dummy prefix?): "
                "train it with ChatTokenizer.train"
            )

    # --- construction -------------------------------------------------------------------------------

    @classmethod
    def train(cls, texts: Iterable[str], model_path: str | Path, vocab_size: int = 8000) -> ChatTokenizer:
        """Train on `texts` (one turn's content each), write the model to `model_path`, return it.

        The file is written atomically (temporary file + rename), so an interrupted run never leaves
        a truncated model where a later `load` would find it.
        """
        if vocab_size < _MIN_VOCAB_SIZE:
            raise ValueError(
                f"vocab_size {vocab_size} leaves no room for learned pieces: "
                f"use at least {_MIN_VOCAB_SIZE} (6 special + 256 byte pieces + 1); 8000 suits the corpus"
            )
        model_path = Path(model_path)
        proto = io.BytesIO()  # the trainer writes the serialised model here rather than to a file
        spm.SentencePieceTrainer.train(
            sentence_iterator=(_to_valid_unicode(t) for t in texts),
            model_writer=proto,
            model_type="bpe",
            vocab_size=vocab_size,
            byte_fallback=True,
            # Characters rarer than this go to byte pieces instead of taking a vocabulary slot each.
            character_coverage=0.9995,
            normalization_rule_name="identity",
            remove_extra_whitespaces=False,
            add_dummy_prefix=False,
            # One token per digit: numbers are rare in chat, and it spares vocabulary slots.
            split_digits=True,
            pad_id=_PAD_ID,
            unk_id=_UNK_ID,
            bos_id=-1,
            eos_id=-1,
            control_symbols=[SYSTEM, USER, ASSISTANT, END],
            input_sentence_size=_INPUT_SENTENCE_SIZE,
            shuffle_input_sentence=True,
            max_sentence_length=_MAX_SENTENCE_BYTES,
            num_threads=1,
            minloglevel=2,
        )
        tokenizer = cls.from_bytes(proto.getvalue(), source=str(model_path))
        tokenizer.save(model_path)
        logger.info("trained a %d-piece tokenizer into %s", tokenizer.vocab_size, model_path)
        return tokenizer

    @classmethod
    def load(cls, model_path: str | Path) -> ChatTokenizer:
        """Load a model written by `train` or `save`; errors name the file and how to make one."""
        model_path = Path(model_path)
        try:
            data = model_path.read_bytes()
        except FileNotFoundError:
            raise FileNotFoundError(
                f"tokenizer model {model_path} not found: train one with "
                f"`python -m model.tokenizer --out {model_path}`"
            ) from None
        return cls.from_bytes(data, source=str(model_path))

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "<bytes>") -> ChatTokenizer:
        """Load from a serialised model (how a checkpoint can carry its tokenizer inline)."""
        processor = spm.SentencePieceProcessor()
        try:
            processor.load_from_serialized_proto(data)
        except (RuntimeError, OSError) as err:
            raise ValueError(
                f"{source} is not a valid SentencePiece model ({err}): retrain it with "
                "`python -m model.tokenizer --out PATH`"
            ) from err
        return cls(processor, source)

    def to_bytes(self) -> bytes:
        """The serialised model, exactly what `save` writes."""
        return self._sp.serialized_model_proto()

    def save(self, model_path: str | Path) -> None:
        """Write the model atomically, creating parent directories."""
        model_path = Path(model_path)
        model_path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=model_path.parent, prefix=f".{model_path.name}.")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(self.to_bytes())
            os.replace(tmp, model_path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    # --- text ---------------------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Text -> ids; never yields a special id, whatever the text contains."""
        if not isinstance(text, str):
            raise ValueError(f"encode takes a str, got {type(text).__name__}: decode bytes to str first")
        text = _to_valid_unicode(text)
        # A literal "▁" is spelled in bytes: as a learned piece it would decode as a space.
        parts = text.split(_SPACE_SYMBOL)
        ids: list[int] = list(self._sp.encode(parts[0]))
        for part in parts[1:]:
            ids.extend(self._space_symbol_ids)
            ids.extend(self._sp.encode(part))
        return ids

    def decode(self, ids: Sequence[int]) -> str:
        """Ids -> text, special ids dropped (as if absent, so byte pieces on either side still join)."""
        return self._sp.decode(self.text_ids(ids))

    def text_ids(self, ids: Sequence[int]) -> list[int]:
        """`ids` without special ids, after checking each is in the vocabulary."""
        kept: list[int] = []
        for i in ids:
            i = int(i)
            if not 0 <= i < self.vocab_size:
                raise ValueError(f"token id {i} is outside the vocabulary 0..{self.vocab_size - 1}")
            if i not in self.special_ids:
                kept.append(i)
        return kept

    def id_to_piece(self, token_id: int) -> str:
        """The piece's spelling, for debugging and tests."""
        return self._sp.id_to_piece(token_id)

    # --- chat template ------------------------------------------------------------------------------

    def role_id(self, role: str) -> int:
        """The control id that opens a turn of `role`."""
        if role not in self._role_ids:
            raise ValueError(f"unknown role {role!r}: use one of {', '.join(self._role_ids)}")
        return self._role_ids[role]

    def encode_turn(self, role: str, content: str) -> list[int]:
        """One message: `[role_id] + encode(content) + [end_id]`.

        The service appends these to a conversation's stored ids, so no turn re-tokenises history.
        """
        role_id = self.role_id(role)
        if not isinstance(content, str):
            raise ValueError(f"message content must be a str, got {type(content).__name__}")
        return [role_id, *self.encode(content), self.end_id]

    def encode_chat(
        self, messages: Iterable[Mapping[str, object]], add_generation_prompt: bool = False
    ) -> list[int]:
        """A whole conversation: the concatenation of `encode_turn` for each message.

        With `add_generation_prompt` the assistant's role id follows, the prefix a reply is sampled
        after.
        """
        ids: list[int] = []
        for index, message in enumerate(messages):
            if not isinstance(message, Mapping) or "role" not in message or "content" not in message:
                raise ValueError(f"message {index} must be a mapping with 'role' and 'content' keys")
            role, content = message["role"], message["content"]
            if not isinstance(role, str):
                raise ValueError(f"message {index} role must be a str, got {type(role).__name__}")
            ids.extend(self.encode_turn(role, content))  # type: ignore[arg-type]  # checked inside
        if add_generation_prompt:
            ids.append(self.assistant_id)
        return ids

    def ids_for_prefix(self, ids: Sequence[int], text: str) -> list[int]:
        """Token ids that decode to exactly `text`, a prefix of `decode(ids)` (a reply cut at a stop string):
        the longest prefix of `ids` whose text lies inside `text`, then the rest of `text` encoded.

        So the ids stored for a conversation are the tokens of what its user was shown, and a state rebuilt
        from them has seen no text the user never received.
        """
        for keep in range(len(ids), -1, -1):
            head = self.decode(ids[:keep])
            if text.startswith(head):
                return [*ids[:keep], *self.encode(text[len(head) :])]
        raise AssertionError("unreachable: the empty prefix decodes to ''")

    def stream_decoder(self) -> StreamDecoder:
        """A fresh incremental decoder over this tokenizer."""
        return StreamDecoder(self)


def _to_valid_unicode(text: str) -> str:
    """Replace lone surrogates, which have no UTF-8 encoding, by U+FFFD."""
    return _LONE_SURROGATE.sub("\ufffd", text)


def _incomplete_utf8_tail(data: Sequence[int]) -> int:
    """How many trailing bytes form a UTF-8 sequence that later bytes could still complete.

    Deliberately loose (lead byte C2..F4 followed by too few continuation bytes, no check of the
    stricter second-byte ranges): holding back a tail that turns out invalid only delays its U+FFFD,
    whereas releasing a tail too early would split a character.
    """
    for back in range(1, min(4, len(data)) + 1):
        byte = data[-back]
        if 0x80 <= byte <= 0xBF:
            continue  # a continuation byte: keep looking for its lead byte
        if 0xC2 <= byte <= 0xDF:
            needed = 2
        elif 0xE0 <= byte <= 0xEF:
            needed = 3
        elif 0xF0 <= byte <= 0xF4:
            needed = 4
        else:
            return 0  # ASCII or a byte that starts nothing: the tail is final
        return back if back < needed else 0
    return 0


class StreamDecoder:
    """Turns ids arriving one at a time into text, never splitting a character.

    Everything `push` and `flush` return, concatenated, equals `tokenizer.decode(all ids)`. While the
    ids seen end in byte pieces forming an incomplete UTF-8 character, that text is held back (else
    the client would see U+FFFD where an emoji is about to arrive). Once the tail is complete (or
    can no longer be), the pending ids are decoded, the new text emitted and the ids dropped: with no
    dummy prefix decoding is a concatenation of pieces, so each push costs O(1), not O(history).
    """

    def __init__(self, tokenizer: ChatTokenizer) -> None:
        """Start with nothing pending."""
        self._tokenizer = tokenizer
        self._pending: list[int] = []  # text ids since the last point where all text was final
        self._pending_bytes: list[int] = []  # byte values of the trailing run of byte pieces

    def push(self, token_id: int) -> str:
        """Feed one id; return the text that is now final (often "" while a character is split)."""
        tokenizer = self._tokenizer
        if not tokenizer.text_ids([token_id]):
            return ""  # a special id: no text, and it does not break a byte sequence (as in decode)
        self._pending.append(token_id)
        byte = tokenizer._byte_values.get(token_id)
        if byte is not None:
            self._pending_bytes.append(byte)
            if _incomplete_utf8_tail(self._pending_bytes):
                return ""
        return self.flush()

    def flush(self) -> str:
        """Return whatever is still held back (at the end of a stream, incomplete bytes as U+FFFD)."""
        text = self._tokenizer._sp.decode(self._pending)
        self._pending.clear()
        self._pending_bytes.clear()
        return text


def main(argv: Sequence[str] | None = None) -> None:
    """CLI: train the project's tokenizer on the train split (both roles' turns) and write it."""
    parser = argparse.ArgumentParser(
        prog="python -m model.tokenizer", description="Train the chat tokenizer on the corpus's train split."
    )
    parser.add_argument("--out", type=Path, required=True, help="where to write the .model file")
    parser.add_argument(
        "--vocab-size", type=int, default=8000, help="pieces in the vocabulary (default 8000)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    from model.train.corpus import texts

    try:
        tokenizer = ChatTokenizer.train(texts("train"), args.out, vocab_size=args.vocab_size)
    except ValueError as err:
        parser.error(str(err))
    sample = "Hi! How was your weekend? 😀"
    pieces = [tokenizer.id_to_piece(i) for i in tokenizer.encode(sample)]
    logger.info("wrote %s (%d pieces); %r -> %s", args.out, tokenizer.vocab_size, sample, pieces)


if __name__ == "__main__":
    main()

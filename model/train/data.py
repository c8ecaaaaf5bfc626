"""From the corpus to cached token streams for training: tokenizer, chat template, both role orientations.

Each conversation is encoded twice, as it happened and with user and assistant swapped
(corpus.swap_roles), so every utterance of the corpus is once an assistant reply: the model learns to
answer from both sides of every chat, which doubles the reply data of a small corpus.

Tokenising the corpus takes far longer than loading arrays, so each split's token stream is cached in the
run directory under a name that hashes everything it depends on (tokenizer file, split, conversation limit,
cache version): a resumed run or a re-evaluation loads it in milliseconds, and a changed tokenizer can never
pick up a stale cache.
"""

from __future__ import annotations

import hashlib
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model.tokenizer import ChatTokenizer
from model.train import corpus
from model.train.corpus import Message, Split
from model.train.distributed import DistContext
from model.train.memory import MemoryEpochs
from model.train.options import TrainOptions
from model.train.packing import CORPUS_CACHE_VERSION, PackedEpochs, PackedWindows, TokenizedCorpus

logger = logging.getLogger(__name__)


def load_conversations(split: Split, limit: int | None) -> list[list[Message]]:
    """The split's conversations in their fixed order, only the first `limit` when given (for tests)."""
    conversations = corpus.conversations(split)
    if limit is not None:
        if limit < 1:
            raise ValueError(f"--data-limit must be >= 1 conversation, got {limit}")
        conversations = conversations[:limit]
    if not conversations:
        raise ValueError(f"the {split} split has no conversations: check model.train.corpus")
    return conversations


def both_orientations(conversations: list[list[Message]]) -> list[list[Message]]:
    """Each conversation as it happened, followed by its role-swapped twin."""
    return [oriented for conv in conversations for oriented in (conv, corpus.swap_roles(conv))]


def prepare_tokenizer(
    run_dir: Path,
    source: Path | None,
    vocab_size: int,
    train_conversations: list[list[Message]],
    resume: bool,
) -> Path:
    """Put the run's tokenizer at `<run_dir>/tokenizer.model` and return that path.

    With `source`, the existing model is copied (so the run directory is self-contained and a later change
    to the source file cannot silently change a resumed run); without, one is trained on the train split's
    texts. A resumed run keeps the tokenizer it started with.
    """
    target = run_dir / "tokenizer.model"
    if resume:
        if not target.is_file():
            raise ValueError(f"{target} is missing: the run cannot be resumed with another tokenizer")
        return target
    run_dir.mkdir(parents=True, exist_ok=True)
    if source is not None:
        if not source.is_file():
            raise ValueError(f"--tokenizer {source} does not exist: give the path of a SentencePiece model")
        shutil.copyfile(source, target)
        logger.info("using tokenizer %s (copied into the run directory)", source)
        return target
    texts = [turn["content"] for conv in train_conversations for turn in conv]
    logger.info("training a %d-piece tokenizer on %d train-split texts", vocab_size, len(texts))
    ChatTokenizer.train(texts, target, vocab_size)
    return target


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def corpus_cache_path(cache_dir: Path, split: Split, tokenizer_file: Path, limit: int | None) -> Path:
    """Where the tokenised split lives; the name changes whenever anything the tokens depend on changes."""
    key = f"v{CORPUS_CACHE_VERSION}|{split}|{limit}|{_file_digest(tokenizer_file)}"
    digest = hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]
    return cache_dir / f"{split}-{digest}.npz"


def tokenize_conversations(tokenizer: ChatTokenizer, conversations: list[list[Message]]) -> TokenizedCorpus:
    """Encode every conversation (both orientations) with the chat template, one token list each."""
    return TokenizedCorpus.from_token_lists(
        tokenizer.encode_chat(conv) for conv in both_orientations(conversations)
    )


def build_corpus(
    split: Split,
    tokenizer_file: Path,
    cache_dir: Path,
    limit: int | None,
    conversations: list[list[Message]] | None = None,
) -> Path:
    """Tokenise `split` into its cache file unless it is already there; return the cache path.

    Call on one process only (rank 0), then load with TokenizedCorpus.load on every rank.
    """
    path = corpus_cache_path(cache_dir, split, tokenizer_file, limit)
    if path.is_file():
        return path
    if conversations is None:
        conversations = load_conversations(split, limit)
    tokenizer = ChatTokenizer.load(tokenizer_file)
    tokenized = tokenize_conversations(tokenizer, conversations)
    tokenized.save(path)
    logger.info(
        "%s split: %d conversations (x2 orientations) -> %d tokens, cached at %s",
        split,
        len(conversations),
        tokenized.num_tokens,
        path,
    )
    return path


def spread(count: int, available: int) -> np.ndarray:
    """`count` window indices spread evenly over `available` (all of them when count >= available).

    Evenly spread rather than the first `count`: the split is sorted by conversation id, and a prefix
    would measure a few long conversations instead of the split.
    """
    if count >= available:
        return np.arange(available)
    return np.unique(np.linspace(0, available - 1, count).round().astype(np.int64))


@dataclass(frozen=True)
class RunData:
    """Everything a run reads: its tokenizer, shuffled training windows and fixed evaluation windows."""

    tokenizer_file: Path
    vocab_size: int
    train: PackedEpochs | MemoryEpochs
    valid: PackedWindows
    valid_index: np.ndarray  # the windows of `valid` every evaluation uses
    test: PackedWindows
    test_index: np.ndarray


def prepare_run_data(options: TrainOptions, ctx: DistContext) -> RunData:
    """Rank 0 trains (or copies) the tokenizer and tokenises the splits into caches; every rank loads them."""
    run_dir, limit = options.out, options.data_limit
    tokenizer_file, cache_dir = run_dir / "tokenizer.model", run_dir / "cache"
    splits: tuple[Split, ...] = ("train", "valid", "test")
    if ctx.is_main:
        train_conversations = load_conversations("train", limit)
        prepare_tokenizer(run_dir, options.tokenizer, options.vocab_size, train_conversations, options.resume)
        for split in splits:
            conversations = train_conversations if split == "train" else None
            build_corpus(split, tokenizer_file, cache_dir, limit, conversations)
    ctx.barrier()
    corpora = {
        split: TokenizedCorpus.load(corpus_cache_path(cache_dir, split, tokenizer_file, limit))
        for split in splits
    }
    valid = PackedWindows(corpora["valid"].stream(), options.seq_len)
    test = PackedWindows(corpora["test"].stream(), options.seq_len)
    test_count = len(test) if options.test_batches is None else options.test_batches * options.batch_size
    tokenizer = ChatTokenizer.load(tokenizer_file)
    packed = PackedEpochs(corpora["train"], options.seq_len, options.seed)
    mix = options.memory_mix()
    # Episodes edit the training windows only: validation and test stay unedited held-out chat.
    train = MemoryEpochs(packed, tokenizer, mix, options.seed) if mix.enabled else packed
    data = RunData(
        tokenizer_file=tokenizer_file,
        vocab_size=tokenizer.vocab_size,
        train=train,
        valid=valid,
        valid_index=spread(options.eval_batches * options.batch_size, len(valid)),
        test=test,
        test_index=spread(test_count, len(test)),
    )
    if len(data.valid_index) == 0 or len(data.test_index) == 0:
        raise ValueError(
            f"the valid or test split has fewer than seq_len + 1 = {options.seq_len + 1} tokens: "
            "raise --data-limit or lower --seq-len"
        )
    return data

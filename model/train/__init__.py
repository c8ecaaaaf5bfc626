"""Training: everything `python -m model.train` needs and inference does not.

    trainer      Trainer (setup, loop, evaluation, finish) and main(), the CLI behind `python -m model.train`
    options      TrainOptions: the command line, parsed once into a frozen dataclass
    corpus       the Chit-Chat corpus as chat conversations, with its deterministic train/valid/test split
    data         corpus -> tokenizer -> cached token streams -> the run's windows (RunData)
    packing      conversations back to back in one stream, cut into windows; a step's batch from (seed, step)
    memory       memory episodes (facts, copy spans) inserted into training windows, with a gap curriculum
    facts        the facts of those episodes, values and phrasings split train/eval (the bench asks eval)
    copy_spans   spans of the train split's most frequent words, said twice
    warm_start   --init-from: a run's weights from a checkpoint, attention projections mapped between kinds
    distributed  DistContext: rank, world size and the few collectives, the identity on one process
    optim        AdamW with decay on matrices only, linear warmup + cosine decay
    metrics      metrics.jsonl (survives resume) and the loss-curve plot
    signals      SIGINT/SIGTERM as a stop request honoured at the next step boundary
    resume       train_state.pt (optimizer, step, every rank's RNG state) for an exact --resume

The checkpoint a run ships (weights + config + tokenizer) is inference's format and lives in
model/checkpoint.py.
"""

from model.train.data import RunData, prepare_run_data
from model.train.distributed import DistContext, init_distributed
from model.train.metrics import MetricsLog, plot_loss_curve
from model.train.optim import WarmupCosine, build_optimizer
from model.train.options import TrainOptions, parse_options
from model.train.packing import PackedEpochs, PackedWindows, TokenizedCorpus
from model.train.resume import (
    TRAIN_STATE_FILE,
    capture_rng_state,
    load_training_state,
    restore_rng_state,
    save_training_state,
)
from model.train.signals import StopSignal
from model.train.trainer import Trainer, main

__all__ = [
    "TRAIN_STATE_FILE",
    "DistContext",
    "MetricsLog",
    "PackedEpochs",
    "PackedWindows",
    "RunData",
    "StopSignal",
    "TokenizedCorpus",
    "TrainOptions",
    "Trainer",
    "WarmupCosine",
    "build_optimizer",
    "capture_rng_state",
    "init_distributed",
    "load_training_state",
    "main",
    "parse_options",
    "plot_loss_curve",
    "prepare_run_data",
    "restore_rng_state",
    "save_training_state",
]

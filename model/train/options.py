"""Command-line options of `python -m model.train`, parsed once into a frozen TrainOptions.

The trainer receives TrainOptions, never an argparse Namespace: every option has a type and a default in one
place, and a resumed run can compare the options it was started with against the ones it is given.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from model.config import ReformerConfig
from model.precision import PRECISIONS
from model.train.memory import MemoryMix

PRESETS = ("tiny", "small", "base")

# Options that override a field of the preset's ReformerConfig when given.
MODEL_FIELDS = (
    "d_model", "n_layers", "attn_layers", "bucket_size", "n_buckets", "n_hashes", "dropout", "reversible",
)  # fmt: skip

# Options that decide the training trajectory (data order, batch, schedule): a resumed run must use the
# values it was started with, or it would not continue the same run. The rest (device, threads, how often
# to evaluate or log, the time budget) may change between the interrupted run and its resumption.
TRAJECTORY_FIELDS = (
    "preset", "d_model", "n_layers", "attn_layers", "bucket_size", "n_buckets", "n_hashes", "dropout",
    "reversible", "seq_len", "batch_size", "lr", "weight_decay", "grad_clip", "warmup_steps", "steps",
    "seed", "vocab_size", "data_limit", "fact_rate", "max_facts", "copy_rate", "max_copies", "memory_min_gap",
    "memory_start_gap", "memory_curriculum_steps", "init_from", "embed_std",
)  # fmt: skip


@dataclass(frozen=True)
class TrainOptions:
    out: Path
    preset: str = "small"
    # Model overrides on top of the preset; None keeps the preset's value.
    d_model: int | None = None
    n_layers: int | None = None
    attn_layers: tuple[str, ...] | None = None
    bucket_size: int | None = None
    n_buckets: int | None = None
    n_hashes: int | None = None
    dropout: float | None = None
    reversible: bool | None = None
    # 512 tokens hold a typical whole chit-chat conversation (both roles, template tokens included), so the
    # model learns from whole chats; longer contexts are what the bounded LSH state is for at serving time.
    seq_len: int = 512
    # Sequences per optimizer step over all ranks and accumulation steps together, so the same command
    # trains the same model on one process or eight: each rank takes batch_size / world_size of them.
    batch_size: int = 32
    grad_accum: int = 1
    lr: float = 1e-3
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    warmup_steps: int = 200
    steps: int | None = None
    time_budget_min: float | None = None
    eval_every: int = 500
    # Validation uses eval_batches * batch_size fixed windows spread evenly over the valid split.
    eval_batches: int = 8
    # Test perplexity uses this many batches at the end; None evaluates the whole test split.
    test_batches: int | None = None
    log_every: int = 10
    seed: int = 0
    # Standard deviation of a fresh token embedding; None keeps the model's own (0.02, as GPT-2). A larger
    # one (PyTorch's default is 1.0) makes the copying circuit form hundreds of steps earlier on the copy
    # task (docs/BENCHMARKS.md, "Copy task"). Ignored for a warm start, whose embedding is the checkpoint's.
    embed_std: float | None = None
    vocab_size: int = 8000
    tokenizer: Path | None = None
    # Only the first N conversations of each split: for tests and quick experiments.
    data_limit: int | None = None
    # Memory episodes mixed into the training windows (model/train/memory.py says what and why). Off by
    # default, so a run without these flags trains exactly as before.
    fact_rate: float = 0.0
    max_facts: int = 3
    copy_rate: float = 0.0
    max_copies: int = 1
    memory_min_gap: int = 16
    memory_start_gap: int = 128
    # Optimizer steps over which the largest gap grows from memory_start_gap to seq_len; 0: at once.
    memory_curriculum_steps: int = 0
    # Start from this checkpoint's weights instead of a fresh initialisation (model/train/warm_start.py).
    init_from: Path | None = None
    resume: bool = False
    device: str = "auto"
    # bf16 autocast with fp32 master weights where the hardware multiplies bf16 natively (CUDA, AMX or
    # AVX-512 BF16 CPUs), fp32 elsewhere (model/precision.py). Not a trajectory option: a run may resume in
    # another precision, as on another device.
    precision: str = "auto"
    threads: int | None = None

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"unknown --preset {self.preset!r}: use one of {', '.join(PRESETS)}")
        if self.embed_std is not None and not self.embed_std > 0:
            raise ValueError(f"--embed-std must be > 0, got {self.embed_std}")
        if self.steps is None and self.time_budget_min is None:
            raise ValueError("give --steps N or --time-budget-min M (or both) so the run knows when to stop")
        for name in ("seq_len", "batch_size", "grad_accum", "eval_every", "eval_batches", "log_every"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(self, name)}")
        if self.steps is not None and self.steps < 1:
            raise ValueError(f"--steps must be >= 1, got {self.steps}")
        if self.time_budget_min is not None and self.time_budget_min <= 0:
            raise ValueError(f"--time-budget-min must be > 0, got {self.time_budget_min}")
        if self.warmup_steps < 0 or self.grad_clip < 0:
            raise ValueError("--warmup-steps and --grad-clip must be >= 0 (0 turns them off)")
        if self.precision not in PRECISIONS:
            raise ValueError(f"--precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.test_batches is not None and self.test_batches < 1:
            raise ValueError(f"--test-batches must be >= 1, got {self.test_batches}")
        self.memory_mix()  # validates the memory options

    def memory_mix(self) -> MemoryMix:
        """The memory-episode mix these options ask for (disabled unless a rate is > 0)."""
        return MemoryMix(
            fact_rate=self.fact_rate,
            max_facts=self.max_facts,
            copy_rate=self.copy_rate,
            max_copies=self.max_copies,
            min_gap=self.memory_min_gap,
            start_gap=self.memory_start_gap,
            curriculum_windows=self.memory_curriculum_steps * self.batch_size,
        )

    def model_config(self, vocab_size: int) -> ReformerConfig:
        """The preset with the overrides applied, sized to the tokenizer and the training length."""
        overrides: dict[str, Any] = {
            name: getattr(self, name) for name in MODEL_FIELDS if getattr(self, name) is not None
        }
        if self.n_layers is not None and self.attn_layers is None:
            # Keep the preset's local/LSH alternation, stretched or cut to the new depth.
            preset_layers = ReformerConfig.from_name(self.preset).attn_layers
            n = self.n_layers
            overrides["attn_layers"] = tuple(preset_layers[i % len(preset_layers)] for i in range(n))
        if self.attn_layers is not None and self.n_layers is None:
            overrides["n_layers"] = len(self.attn_layers)
        overrides["max_train_len"] = self.seq_len
        return ReformerConfig.from_name(self.preset, vocab_size=vocab_size, **overrides)

    def micro_batch_size(self, world_size: int) -> int:
        """Sequences per forward/backward on one rank; the global batch must split evenly."""
        parts = world_size * self.grad_accum
        if self.batch_size % parts:
            raise ValueError(
                f"--batch-size {self.batch_size} does not split over {world_size} process(es) x "
                f"--grad-accum {self.grad_accum}: use a multiple of {parts}"
            )
        return self.batch_size // parts

    def to_dict(self) -> dict[str, Any]:
        """JSON- and weights_only-safe form (paths as strings, tuples as lists)."""
        data = dataclasses.asdict(self)
        for key, value in data.items():
            if isinstance(value, Path):
                data[key] = str(value)
            elif isinstance(value, tuple):
                data[key] = list(value)
        return data

    def trajectory_mismatches(self, saved: dict[str, Any]) -> list[str]:
        """The trajectory options that differ from a saved run's, as "--flag now (was then)" strings."""
        now = self.to_dict()
        # A run saved before an option existed ran with that option's default.
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        return [
            f"--{name.replace('_', '-')} {now[name]!r} (the run used {saved.get(name, defaults[name])!r})"
            for name in TRAJECTORY_FIELDS
            if now[name] != saved.get(name, defaults[name])
        ]


def _layer_kinds(text: str) -> tuple[str, ...]:
    kinds = tuple(part.strip() for part in text.split(",") if part.strip())
    if not kinds:
        raise argparse.ArgumentTypeError("give a comma-separated list such as local,lsh")
    return kinds


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m model.train",
        description="Train a Reformer chat model on the Chit-Chat corpus. Run under torchrun for "
        "data-parallel training on several GPUs (or CPU processes).",
    )
    add = parser.add_argument
    add("--out", type=Path, required=True, help="run directory: checkpoint, metrics, plot, resume state")
    add("--preset", choices=PRESETS, default="small", help="model to start from (default %(default)s)")
    model = parser.add_argument_group("model overrides (default: the preset's value)")
    model.add_argument("--d-model", type=int, help="residual stream width")
    model.add_argument("--n-layers", type=int, help="depth; keeps the preset's local/lsh alternation")
    model.add_argument("--attn-layers", type=_layer_kinds, help="per layer, e.g. local,lsh,local,lsh")
    model.add_argument("--bucket-size", type=int, help="keys per query per hash round")
    model.add_argument("--n-buckets", type=int, help="LSH buckets per round (even)")
    model.add_argument("--n-hashes", type=int, help="LSH hash rounds")
    model.add_argument("--dropout", type=float, help="dropout probability")
    model.add_argument("--reversible", action=argparse.BooleanOptionalAction, help="reversible layers")
    opt = parser.add_argument_group("optimisation").add_argument
    opt("--seq-len", type=int, default=512, help="tokens per sequence (default %(default)s)")
    opt("--batch-size", type=int, default=32, help="sequences per step, all ranks (%(default)s)")
    opt("--grad-accum", type=int, default=1, help="micro-batches per step and rank (%(default)s)")
    opt("--lr", type=float, default=1e-3, help="peak learning rate (%(default)s)")
    opt("--weight-decay", type=float, default=0.1, help="AdamW decay of matrices (%(default)s)")
    opt("--grad-clip", type=float, default=1.0, help="max gradient norm, 0 = off (%(default)s)")
    opt("--warmup-steps", type=int, default=200, help="linear warmup steps (%(default)s)")
    opt("--steps", type=int, help="optimizer steps to train")
    opt("--time-budget-min", type=float, help="stop cleanly after this many minutes")
    opt("--seed", type=int, default=0, help="init, data order, dropout (%(default)s)")
    opt("--embed-std", type=float, help="std of a fresh token embedding (default: the model's, 0.02)")
    evaluation = parser.add_argument_group("evaluation and logging")
    evaluation.add_argument("--eval-every", type=int, default=500, help="steps between evals (%(default)s)")
    evaluation.add_argument("--eval-batches", type=int, default=8, help="batches per eval (%(default)s)")
    evaluation.add_argument("--test-batches", type=int, help="test batches at the end (default: all)")
    evaluation.add_argument("--log-every", type=int, default=10, help="steps between rows (%(default)s)")
    data = parser.add_argument_group("data")
    data.add_argument("--vocab-size", type=int, default=8000, help="pieces of a new tokenizer (%(default)s)")
    data.add_argument("--tokenizer", type=Path, help="reuse this SentencePiece model instead of training one")
    data.add_argument("--init-from", type=Path, help="start from this checkpoint's weights (warm start)")
    data.add_argument("--data-limit", type=int, help="use only the first N conversations of each split")
    memory = parser.add_argument_group("memory episodes (model/train/memory.py)").add_argument
    memory("--fact-rate", type=float, default=0.0, help="share of windows with facts (%(default)s)")
    memory("--max-facts", type=int, default=3, help="facts per such window, at most (%(default)s)")
    memory("--copy-rate", type=float, default=0.0, help="share of windows with copy spans (%(default)s)")
    memory("--max-copies", type=int, default=1, help="copy spans per such window, at most (%(default)s)")
    memory("--memory-min-gap", type=int, default=16, help="fewest tokens statement->question (%(default)s)")
    memory("--memory-start-gap", type=int, default=128, help="largest gap at step 0 (%(default)s)")
    memory("--memory-curriculum-steps", type=int, default=0,
           help="steps until the largest gap reaches --seq-len; 0: at once (%(default)s)")  # fmt: skip
    run = parser.add_argument_group("run").add_argument
    run("--resume", action="store_true", help="continue the run in --out from train_state.pt")
    run("--device", choices=("auto", "cpu", "cuda"), default="auto", help="(default %(default)s)")
    run(
        "--precision",
        choices=PRECISIONS,
        default="auto",
        help="matrix products in bf16 (autocast, fp32 master weights) or fp32; auto: bf16 where the CUDA "
        "GPU or the CPU (AMX, AVX-512 BF16) multiplies bf16 natively (default %(default)s)",
    )
    run("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    return parser


def parse_options(argv: Sequence[str] | None = None) -> TrainOptions:
    """Parse the command line; invalid combinations exit with argparse's usage message."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return TrainOptions(**vars(args))
    except ValueError as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits

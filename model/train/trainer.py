"""python -m model.train: train a ReformerLM on the Chit-Chat corpus, on one process or under torchrun.

    python -m model.train --preset small --seq-len 512 --steps 4000 --out runs/small
    torchrun --nproc_per_node=8 -m model.train --preset base --steps 20000 --out runs/base

Choices, and why:

- **Loss on every token**, not only the assistant's. Sequences are packed windows cut anywhere in the
  stream, and every conversation appears in both role orientations, so each user token is an assistant
  token in the swapped twin: masking would throw away half of every batch's gradient and teach nothing
  new. Predicting the role and end-of-turn tokens also teaches the model when a turn ends.
- **The global batch is fixed by --batch-size** whatever the number of processes; rank r takes the r-th
  contiguous block of every step's batch, so one process and N processes follow the same trajectory.
- **The batch of step s is a function of (seed, s)** (model/train/packing.py), and train_state.pt holds the
  weights, optimizer, step, elapsed time and every rank's RNG state: `--resume` continues exactly where the
  interrupted run stopped.
- **RUN_DIR/checkpoint is the best checkpoint so far** (lowest validation loss), written at each evaluation
  that improves on it; train_state.pt always holds the latest step. Test perplexity at the end is measured on
  the best checkpoint, the one that ships.
- **Evaluation never touches the training RNG** (fork_rng), so how often one evaluates does not change what
  is trained.
- **--precision auto** trains in bf16 (autocast: bf16 matrix products, fp32 master weights, optimizer and
  loss reductions) where the hardware multiplies bf16 natively, fp32 elsewhere; every metrics row and
  training.json record which one ran.
- **--time-budget-min** stops at the first step boundary after the budget, then still evaluates, saves and
  measures test perplexity. Without --steps the cosine decay follows elapsed time instead of steps.
"""

from __future__ import annotations

import contextlib
import logging
import math
import random
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from model.checkpoint import WEIGHTS_FILE, save_checkpoint, update_training_info
from model.config import ReformerConfig
from model.precision import autocast, resolve_precision
from model.reformer import ReformerLM
from model.train.data import prepare_run_data
from model.train.distributed import DistContext, init_distributed
from model.train.metrics import MetricsLog, plot_loss_curve
from model.train.optim import WarmupCosine, build_optimizer
from model.train.options import TrainOptions, parse_options
from model.train.packing import PackedWindows
from model.train.resume import (
    TRAIN_STATE_FILE,
    capture_rng_state,
    load_training_state,
    restore_rng_state,
    save_training_state,
)
from model.train.signals import StopSignal
from model.train.warm_start import warm_start

logger = logging.getLogger("model.train")

TRAIN_STATE_VERSION = 1


class _LossModule(nn.Module):
    """Makes ReformerLM.loss the forward() of a module, because DDP synchronises through forward()."""

    def __init__(self, model: ReformerLM) -> None:
        super().__init__()
        self.model = model

    def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return self.model.loss(inputs, targets)


def _perplexity(loss: float) -> float:
    """exp(loss), capped so that a diverged run logs a huge number rather than inf (invalid JSON)."""
    return math.exp(min(loss, 50.0))


def _derived_seed(*parts: int) -> int:
    """A well-mixed seed from several integers (plain sums would make (seed, rank) pairs collide)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(1)[0])


class Trainer:
    """One training run: setup from options (or from train_state.pt on resume), the loop, the finish."""

    def __init__(self, options: TrainOptions, ctx: DistContext) -> None:
        self.options = options
        self.ctx = ctx
        self.run_dir = options.out
        self.device = ctx.device
        self.precision = resolve_precision(options.precision, self.device)
        self.micro_batch = options.micro_batch_size(ctx.world_size)
        self.stop = StopSignal()
        self.saved: dict[str, Any] | None = None
        if options.resume:
            self.saved = load_training_state(self.run_dir)
            mismatches = options.trajectory_mismatches(self.saved["options"])
            if mismatches:
                raise ValueError("--resume needs the interrupted run's options: " + "; ".join(mismatches))
        elif (self.run_dir / TRAIN_STATE_FILE).exists():
            raise ValueError(
                f"{self.run_dir} already holds a run: pass --resume to continue it or change --out"
            )
        self.data = prepare_run_data(options, ctx)
        self.tokenizer_file = self.data.tokenizer_file
        self._build_model()
        self.step: int = self.saved["step"] if self.saved else 0
        self.elapsed_before: float = self.saved["elapsed_s"] if self.saved else 0.0
        self.best_val: float = self.saved["best_val_loss"] if self.saved else math.inf
        self.best_step: int | None = self.saved["best_step"] if self.saved else None
        self.last_eval_step: int | None = self.saved["last_eval_step"] if self.saved else None
        # Only rank 0 owns the metrics file; the others never open it.
        self.metrics: MetricsLog | None = None
        if ctx.is_main:
            self.metrics = MetricsLog(self.run_dir / "metrics.jsonl", self.step if self.saved else None)
        self.schedule = WarmupCosine(options.lr, options.warmup_steps)

    def _autocast(self) -> torch.autocast:
        """bf16: autocast (fp32 weights and optimizer, bf16 matrix products); fp32: nothing changes."""
        return autocast(self.precision, self.device)

    # ---- setup ----------------------------------------------------------------------------------------
    def _build_model(self) -> None:
        opts = self.options
        if self.saved:
            config = ReformerConfig.from_dict(self.saved["config"])
        else:
            config = opts.model_config(self.data.vocab_size)
        torch.manual_seed(opts.seed)
        random.seed(opts.seed)
        self.model = ReformerLM(config)
        if opts.embed_std is not None and not self.saved:
            torch.nn.init.normal_(self.model.embed.weight, std=opts.embed_std)
        if opts.init_from is not None and not self.saved:
            started = warm_start(self.model, opts.init_from, self.tokenizer_file)
            if self.ctx.is_main:
                logger.info("warm start from %s: %d tensors copied, %d mapped (%s), %d fresh (%s)",
                            started.source, started.copied, len(started.mapped), ", ".join(started.mapped),
                            len(started.fresh), ", ".join(started.fresh))  # fmt: skip
        self.model = self.model.to(self.device)
        self.optimizer = build_optimizer(self.model, opts.lr, opts.weight_decay)
        if self.saved:
            self.model.load_state_dict(self.saved["model"])
            self.optimizer.load_state_dict(self.saved["optimizer"])
            rng_states = self.saved["rng"]
            if len(rng_states) == self.ctx.world_size:
                restore_rng_state(rng_states[self.ctx.rank], self.device)
            else:
                logger.warning(
                    "resuming on %d processes, saved on %d: dropout RNG reseeded, not replayed",
                    self.ctx.world_size,
                    len(rng_states),
                )
                torch.manual_seed(_derived_seed(opts.seed, self.ctx.rank, self.saved["step"]))
        else:
            # Same initial weights on every rank (seeded above); a distinct dropout stream per rank.
            torch.manual_seed(_derived_seed(opts.seed, self.ctx.rank))
        module: nn.Module = _LossModule(self.model)
        self.ddp: DistributedDataParallel | None = None
        if self.ctx.distributed:
            # static_graph: the reversible backward and the chunked feed-forward accumulate some parameters'
            # gradients several times per step (re-entrant backward), which DDP supports only in this mode.
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            module = self.ddp = DistributedDataParallel(module, device_ids=device_ids, static_graph=True)
        self.train_module = module
        self._ddp_warm = False
        if self.ctx.is_main:
            logger.info(
                "model: %s parameters, precision %s, %s",
                f"{self.model.num_parameters():,}",
                self.precision,
                config.to_dict(),
            )

    # ---- one optimizer step ---------------------------------------------------------------------------
    def _lr(self, elapsed: float) -> float:
        opts = self.options
        if opts.steps is not None:
            progress = self.schedule.step_progress(self.step, opts.steps)
        else:  # TrainOptions guarantees a time budget when there is no step count
            progress = elapsed / (float(opts.time_budget_min or 0.0) * 60.0)
        return self.schedule(self.step, progress)

    def _train_step(self, lr: float) -> tuple[torch.Tensor, torch.Tensor]:
        """One optimizer step on this rank's share of the global batch; returns (mean loss, grad norm)."""
        opts, ctx = self.options, self.ctx
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        batch = self.data.train.batch(self.step * opts.batch_size, opts.batch_size)  # (B, L + 1)
        per_rank = opts.batch_size // ctx.world_size
        mine = batch[ctx.rank * per_rank : (ctx.rank + 1) * per_rank].to(self.device, non_blocking=True)
        micro_batches = mine.split(self.micro_batch)
        loss_sum = torch.zeros((), device=self.device)
        for index, micro in enumerate(micro_batches):
            last = index == len(micro_batches) - 1
            # Gradients are averaged over ranks only on the last micro-batch; the others just accumulate.
            # Not in this process's first step: DDP's static graph is recorded then, and must see a sync.
            ddp = self.ddp if not last and self._ddp_warm else None
            with ddp.no_sync() if ddp is not None else contextlib.nullcontext():
                with self._autocast():
                    loss = self.train_module(micro[:, :-1], micro[:, 1:]) / len(micro_batches)
                loss.backward()
            loss_sum += loss.detach()
        params = self.model.parameters()
        max_norm = opts.grad_clip if opts.grad_clip > 0 else math.inf
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self._ddp_warm = True
        return loss_sum, grad_norm

    # ---- evaluation -----------------------------------------------------------------------------------
    @torch.no_grad()
    def evaluate(self, windows: PackedWindows, index: np.ndarray) -> float:
        """Mean cross-entropy per token over `index`'s windows, shared out over ranks."""
        batch = self.options.batch_size // self.ctx.world_size
        mine = index[self.ctx.rank :: self.ctx.world_size]
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)  # (sum of losses, tokens)
        self.model.eval()
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            for start in range(0, len(mine), batch):
                rows = windows.windows(mine[start : start + batch]).to(self.device)
                with self._autocast():
                    loss = self.model.loss(rows[:, :-1], rows[:, 1:])
                tokens = rows[:, 1:].numel()
                totals[0] += loss.double() * tokens  # every window has seq_len targets
                totals[1] += tokens
        self.model.train()
        self.ctx.all_reduce(totals)
        return float(totals[0] / totals[1])

    def _evaluate_and_save(self) -> None:
        # The loss is reduced over ranks, so every rank takes the same "is it the best?" decision.
        val_loss = self.evaluate(self.data.valid, self.data.valid_index)
        row = {
            "kind": "eval", "step": self.step, "val_loss": val_loss, "val_ppl": _perplexity(val_loss),
            "precision": self.precision,
        }  # fmt: skip
        self.last_eval_step = self.step
        improved = val_loss < self.best_val
        if improved:
            self.best_val, self.best_step = val_loss, self.step
        if self.metrics is not None:
            self.metrics.append(row)
            logger.info("step %d: val loss %.4f, val ppl %.2f", self.step, val_loss, row["val_ppl"])
            if improved:
                save_checkpoint(self.run_dir / "checkpoint", self.model, self.tokenizer_file, self._info(row))
            plot_loss_curve(self.metrics, self.run_dir / "loss.png", title=self.run_dir.name)
        self._save_state()

    def _info(self, eval_row: dict[str, Any]) -> dict[str, Any]:
        """training.json of a checkpoint: how it was made, and how good it was."""
        opts = self.options
        return {
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "step": self.step,
            "tokens_seen": self.step * opts.batch_size * opts.seq_len,
            "epochs": self.data.train.epoch_of(self.step * opts.batch_size),
            "val_loss": eval_row["val_loss"],
            "val_ppl": eval_row["val_ppl"],
            "data": {
                "corpus": "chitchat-dataset",
                "train_split": "train",
                "orientations": ["original", "swapped"],
                "data_limit": opts.data_limit,
                "train_conversations": self.data.train.corpus.num_conversations,
                "train_tokens": self.data.train.corpus.num_tokens,
                "valid_windows": len(self.data.valid_index),
            },
            "world_size": self.ctx.world_size,
            "device": str(self.device),
            "precision": self.precision,
            "parameters": self.model.num_parameters(),
            "options": opts.to_dict(),
        }

    def _save_state(self) -> None:
        """Write train_state.pt (every rank's RNG included); every rank must call this together."""
        rng = self.ctx.gather_objects(capture_rng_state(self.device))
        if self.ctx.is_main:
            save_training_state(self.run_dir, {
                "version": TRAIN_STATE_VERSION,
                "step": self.step,
                "elapsed_s": self._elapsed(),
                "best_val_loss": self.best_val,
                "best_step": self.best_step,
                "last_eval_step": self.last_eval_step,
                "windows_consumed": self.step * self.options.batch_size,
                "config": self.model.config.to_dict(),
                "options": self.options.to_dict(),
                "model": self.model.state_dict(),
                "optimizer": self.optimizer.state_dict(),
                "rng": rng,
            })  # fmt: skip
        self.ctx.barrier()

    # ---- the run --------------------------------------------------------------------------------------
    def _elapsed(self) -> float:
        return self.elapsed_before + (time.monotonic() - self.start_time)

    def _should_stop(self) -> tuple[bool, float]:
        """(stop now?, elapsed seconds), agreed by every rank so all leave the loop at the same step."""
        opts = self.options
        flags = torch.tensor([float(self.stop.signum is not None), self._elapsed()], device=self.device)
        stop_flag, elapsed = self.ctx.all_reduce(flags, "max").tolist()
        over_budget = opts.time_budget_min is not None and elapsed >= opts.time_budget_min * 60.0
        done = opts.steps is not None and self.step >= opts.steps
        return bool(stop_flag) or over_budget or done, elapsed

    def run(self, on_step: Callable[[Trainer], None] | None = None) -> int:
        """Train until --steps, the time budget or a signal; returns the process exit code.

        `on_step` is called after every optimizer step (and its logging/evaluation): a place for callers
        that watch or steer a run in-process, such as a test that interrupts it at a chosen step.
        """
        opts = self.options
        self.start_time = time.monotonic()
        tokens_per_step = opts.batch_size * opts.seq_len
        bar = tqdm(
            total=opts.steps, initial=self.step, unit="step", dynamic_ncols=True, disable=self.metrics is None
        )
        with self.stop.installed(), logging_redirect_tqdm(), bar:
            window_start, window_steps = time.monotonic(), 0
            while True:
                stop, elapsed = self._should_stop()
                if stop:
                    break
                lr = self._lr(elapsed)
                loss, grad_norm = self._train_step(lr)
                bar.update(1)
                window_steps += 1
                if self.step % opts.log_every == 0:
                    loss_value = float(self.ctx.all_reduce(loss.clone())) / self.ctx.world_size
                    speed = window_steps * tokens_per_step / max(time.monotonic() - window_start, 1e-9)
                    self._log_train(loss_value, lr, speed, float(grad_norm), bar)
                    window_start, window_steps = time.monotonic(), 0
                if self.step % opts.eval_every == 0:
                    self._evaluate_and_save()
                    window_start, window_steps = time.monotonic(), 0
                if on_step is not None:
                    on_step(self)
        if self.stop.signum is not None:
            self._save_state()
            logger.warning("interrupted at step %d; state saved: continue with --resume", self.step)
            return 128 + self.stop.signum
        return self._finish()

    def _log_train(self, loss: float, lr: float, speed: float, grad_norm: float, bar: tqdm) -> None:
        if self.metrics is None:
            return
        epoch = self.data.train.epoch_of(self.step * self.options.batch_size)
        row = {
            "kind": "train", "step": self.step, "loss": loss, "lr": lr, "tokens_per_s": speed,
            "grad_norm": grad_norm, "epoch": epoch, "elapsed_s": self._elapsed(), "precision": self.precision,
        }  # fmt: skip
        if self.device.type == "cuda":  # peak tensor memory so far: what a bigger batch or model has left
            row["cuda_max_allocated_bytes"] = torch.cuda.max_memory_allocated(self.device)
        self.metrics.append(row)
        postfix = {"loss": f"{loss:.3f}", "tok/s": f"{speed:,.0f}", "lr": f"{lr:.2e}"}
        if self.options.steps is None and self.options.time_budget_min is not None:
            postfix["left"] = f"{max(0.0, self.options.time_budget_min * 60 - self._elapsed()) / 60:.1f}m"
        bar.set_postfix(postfix)

    def _finish(self) -> int:
        """After the last step: evaluate, checkpoint, test perplexity on the best checkpoint, plot."""
        if self.last_eval_step != self.step:
            self._evaluate_and_save()
        if self.best_step is None:
            logger.error("no evaluation gave a finite validation loss (diverged?): no checkpoint written")
            return 1
        checkpoint_dir = self.run_dir / "checkpoint"
        if self.best_step != self.step:
            # train_state.pt already holds the latest weights; measure the checkpoint that ships.
            self.model.load_state_dict(load_file(str(checkpoint_dir / WEIGHTS_FILE)), strict=False)
        test_loss = self.evaluate(self.data.test, self.data.test_index)
        test_ppl = _perplexity(test_loss)
        if self.metrics is not None:
            row = {
                "kind": "test", "step": self.best_step, "test_loss": test_loss, "test_ppl": test_ppl,
                "precision": self.precision,
            }  # fmt: skip
            self.metrics.append(row)
            update_training_info(checkpoint_dir, {"test_loss": test_loss, "test_ppl": test_ppl})
            plot_loss_curve(self.metrics, self.run_dir / "loss.png", title=self.run_dir.name)
            logger.info("done at step %d: best val loss %.4f (step %s), test ppl %.2f; checkpoint in %s",
                        self.step, self.best_val, self.best_step, test_ppl, checkpoint_dir)  # fmt: skip
        self.ctx.barrier()
        return 0


def main(argv: Sequence[str] | None = None) -> int:
    options = parse_options(argv)
    ctx = init_distributed(options.device)
    logging.basicConfig(
        level=logging.INFO if ctx.is_main else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if options.threads is not None:
        torch.set_num_threads(options.threads)
    if ctx.device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    try:
        return Trainer(options, ctx).run()
    finally:
        ctx.close()


if __name__ == "__main__":
    sys.exit(main())

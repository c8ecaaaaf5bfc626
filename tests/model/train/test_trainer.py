"""python -m model.train end to end on a tiny model: it learns, resumes exactly, and DDP matches one process.

Every run uses the real corpus (first conversations of each split), the session's real tokenizer and a
tiny real model on the CPU; the data-parallel run is a real two-process gloo job under torchrun.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from model.checkpoint import CheckpointError, load_checkpoint, read_training_info
from model.config import ReformerConfig
from model.reformer import ReformerLM
from model.tokenizer import ChatTokenizer
from model.train.distributed import init_distributed
from model.train.metrics import MetricsLog
from model.train.optim import WarmupCosine, build_optimizer
from model.train.options import TrainOptions, parse_options
from model.train.resume import load_training_state
from model.train.trainer import Trainer, main


def _args(out: Path, tokenizer: Path, *extra: str) -> list[str]:
    """A tiny, fast run: 12 conversations per split, 32-token windows, 4 windows per step, one thread, fp32
    (runs are compared to 1e-4: one process vs DDP, resumed vs not; --precision auto would pick bf16 on a
    CPU with AMX; bf16 training is tested in tests/model/test_precision.py)."""
    return [
        "--out", str(out), "--tokenizer", str(tokenizer), "--preset", "tiny", "--data-limit", "12",
        "--seq-len", "32", "--batch-size", "4", "--eval-batches", "1", "--test-batches", "1",
        "--log-every", "1", "--warmup-steps", "2", "--lr", "3e-3", "--threads", "1", "--device", "cpu",
        "--precision", "fp32", *extra,
    ]  # fmt: skip


def _rows(run_dir: Path, kind: str) -> list[dict[str, Any]]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [row for row in map(json.loads, lines) if row["kind"] == kind]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory: pytest.TempPathFactory, chat_tokenizer_path: Path) -> Path:
    """One 30-step run, shared by the tests that inspect what a finished run leaves behind."""
    out = tmp_path_factory.mktemp("train") / "run"
    assert main(_args(out, chat_tokenizer_path, "--steps", "30", "--eval-every", "15")) == 0
    return out


def test_loss_decreases(finished_run: Path) -> None:
    losses = [row["loss"] for row in _rows(finished_run, "train")]
    assert len(losses) == 30
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < first - 0.5, f"training loss went from {first:.3f} to {last:.3f}"
    vocab = ReformerConfig.from_dict(load_training_state(finished_run)["config"]).vocab_size
    val = [row["val_loss"] for row in _rows(finished_run, "eval")]
    assert val[-1] < math.log(vocab) - 0.5, "validation loss must fall well below a uniform guess"


def test_metrics_plot_and_state_are_written(finished_run: Path) -> None:
    train = _rows(finished_run, "train")
    assert [row["step"] for row in train] == list(range(1, 31))
    for row in train:
        assert row["loss"] > 0 and row["lr"] > 0 and row["tokens_per_s"] > 0
    evals = _rows(finished_run, "eval")
    assert [row["step"] for row in evals] == [15, 30]
    for row in evals:
        assert row["val_ppl"] == pytest.approx(math.exp(row["val_loss"]))
    (test,) = _rows(finished_run, "test")
    assert test["test_ppl"] == pytest.approx(math.exp(test["test_loss"]))
    assert (finished_run / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    state = load_training_state(finished_run)
    assert state["step"] == 30 and state["last_eval_step"] == 30
    # The learning rate warms up over 2 steps, then decays along the cosine to 10% of the peak.
    lrs = [row["lr"] for row in train]
    assert lrs[0] == pytest.approx(1.5e-3) and lrs[1] == pytest.approx(3e-3)
    assert lrs[-1] == pytest.approx(3e-4)
    assert all(a >= b for a, b in itertools.pairwise(lrs[1:]))


def test_checkpoint_is_the_best_evaluation_and_loads(finished_run: Path) -> None:
    evals = _rows(finished_run, "eval")
    best = min(evals, key=lambda row: row["val_loss"])
    info = read_training_info(finished_run / "checkpoint")
    assert info is not None
    assert info["step"] == best["step"] and info["val_loss"] == pytest.approx(best["val_loss"])
    assert info["test_ppl"] == pytest.approx(_rows(finished_run, "test")[0]["test_ppl"])
    model, tokenizer = load_checkpoint(finished_run / "checkpoint", device="cpu")
    assert tokenizer.vocab_size == model.config.vocab_size
    assert model.config.max_train_len == 32
    if best["step"] == 30:  # the checkpoint then holds exactly the final weights
        final = load_training_state(finished_run)["model"]
        for name, tensor in model.state_dict().items():
            assert torch.equal(tensor, final[name]), name


def test_resume_refuses_changed_options_and_new_runs_refuse_an_occupied_directory(
    finished_run: Path, chat_tokenizer_path: Path
) -> None:
    ctx = init_distributed("cpu")
    changed = parse_options(
        _args(finished_run, chat_tokenizer_path, "--steps", "30", "--seq-len", "64", "--resume")
    )
    with pytest.raises(ValueError, match=r"--seq-len 64 \(the run used 32\)"):
        Trainer(changed, ctx)
    again = parse_options(_args(finished_run, chat_tokenizer_path, "--steps", "30"))
    with pytest.raises(ValueError, match="--resume"):
        Trainer(again, ctx)
    nothing = parse_options(_args(finished_run / "fresh", chat_tokenizer_path, "--steps", "3", "--resume"))
    with pytest.raises(CheckpointError, match="nothing to resume"):
        Trainer(nothing, ctx)


def test_resume_after_a_signal_continues_the_same_run(tmp_path: Path, chat_tokenizer_path: Path) -> None:
    # Dropout on, so an exact match also proves the RNG state is restored, not just weights and data.
    common = ["--steps", "12", "--eval-every", "5", "--dropout", "0.1"]
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    assert main(_args(straight, chat_tokenizer_path, *common)) == 0

    def interrupt_at_step_7(trainer: Trainer) -> None:
        if trainer.step == 7:
            os.kill(os.getpid(), signal.SIGINT)  # a real signal through the real handler

    options = parse_options(_args(interrupted, chat_tokenizer_path, *common))
    assert Trainer(options, init_distributed("cpu")).run(on_step=interrupt_at_step_7) == 128 + signal.SIGINT
    assert load_training_state(interrupted)["step"] == 7
    assert main(_args(interrupted, chat_tokenizer_path, *common, "--resume")) == 0

    a, b = load_training_state(straight), load_training_state(interrupted)
    assert a["step"] == b["step"] == 12
    for name, tensor in a["model"].items():
        assert torch.equal(tensor, b["model"][name]), f"{name} differs after resume"
    for kind, key in (("train", "loss"), ("eval", "val_loss"), ("test", "test_loss")):
        # Every step appears once in the resumed run's log, with the uninterrupted run's value.
        assert [(r["step"], r[key]) for r in _rows(interrupted, kind)] == [
            (r["step"], r[key]) for r in _rows(straight, kind)
        ]


def test_sigterm_saves_the_state_and_exits_with_its_code(tmp_path: Path, chat_tokenizer_path: Path) -> None:
    out = tmp_path / "terminated"

    def terminate_at_step_2(trainer: Trainer) -> None:
        if trainer.step == 2:
            os.kill(os.getpid(), signal.SIGTERM)

    options = parse_options(_args(out, chat_tokenizer_path, "--steps", "50", "--eval-every", "10"))
    previous = signal.getsignal(signal.SIGTERM)
    assert Trainer(options, init_distributed("cpu")).run(on_step=terminate_at_step_2) == 128 + signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is previous, "the handler must be removed after the run"
    assert load_training_state(out)["step"] == 2
    assert not (out / "checkpoint").exists(), "no evaluation ran, so there is no best checkpoint yet"


def test_without_a_tokenizer_one_is_trained_on_the_train_split(tmp_path: Path) -> None:
    out = tmp_path / "own-tokenizer"
    args = _args(out, Path("unused"), "--steps", "2", "--eval-every", "2", "--vocab-size", "400")
    index = args.index("--tokenizer")
    del args[index : index + 2]
    assert main(args) == 0
    tokenizer = ChatTokenizer.load(out / "tokenizer.model")
    assert tokenizer.vocab_size == 400
    model, shipped = load_checkpoint(out / "checkpoint", device="cpu")
    assert shipped.to_bytes() == tokenizer.to_bytes() and model.config.vocab_size == 400


def test_two_process_ddp_matches_one_process(tmp_path: Path, chat_tokenizer_path: Path) -> None:
    # Same global batch of 4: one process x 1 micro-batch of 4, versus 2 ranks x 2 micro-batches of 1
    # (which also exercises gradient accumulation without synchronisation).
    common = ["--steps", "4", "--eval-every", "2"]
    single, ddp = tmp_path / "single", tmp_path / "ddp"
    assert main(_args(single, chat_tokenizer_path, *common)) == 0
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
        "-m", "model.train", *_args(ddp, chat_tokenizer_path, *common, "--grad-accum", "2"),
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, env=env, capture_output=True, text=True, check=False)
    assert result.returncode == 0, result.stderr[-4000:]
    # Rank 0 alone writes: one row per step, not two.
    assert [r["step"] for r in _rows(ddp, "train")] == [1, 2, 3, 4]
    for kind, key in (("train", "loss"), ("eval", "val_loss")):
        one, two = [r[key] for r in _rows(single, kind)], [r[key] for r in _rows(ddp, kind)]
        assert two == pytest.approx(one, rel=1e-4, abs=1e-5), kind
    ddp_model, _ = load_checkpoint(ddp / "checkpoint", device="cpu")
    single_model, _ = load_checkpoint(single / "checkpoint", device="cpu")
    for name, tensor in single_model.state_dict().items():
        torch.testing.assert_close(ddp_model.state_dict()[name], tensor, rtol=1e-4, atol=1e-5)


def test_time_budget_stops_cleanly_and_still_evaluates(tmp_path: Path, chat_tokenizer_path: Path) -> None:
    out = tmp_path / "budget"
    assert main(_args(out, chat_tokenizer_path, "--time-budget-min", "0.003", "--eval-every", "1000")) == 0
    state = load_training_state(out)
    assert state["step"] >= 1 and state["last_eval_step"] == state["step"]
    assert [r["step"] for r in _rows(out, "eval")] == [state["step"]]
    assert len(_rows(out, "test")) == 1
    load_checkpoint(out / "checkpoint", device="cpu")


# ---- the pieces -----------------------------------------------------------------------------------------
def test_warmup_cosine_schedule() -> None:
    schedule = WarmupCosine(peak_lr=1.0, warmup_steps=4, min_ratio=0.1)
    assert [schedule(s, 0.0) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    steps = 20
    rates = [schedule(s, schedule.step_progress(s, steps)) for s in range(4, steps)]
    assert rates[0] == pytest.approx(1.0) and rates[-1] == pytest.approx(0.1)
    assert all(a > b for a, b in itertools.pairwise(rates))
    assert schedule(10, 0.5) == pytest.approx(0.55) and schedule(10, 7.0) == pytest.approx(0.1)
    with pytest.raises(ValueError, match="must be > 0"):
        WarmupCosine(peak_lr=0.0, warmup_steps=1)


def test_weight_decay_applies_to_matrices_only() -> None:
    model = ReformerLM(ReformerConfig.tiny(vocab_size=64))
    optimizer = build_optimizer(model, lr=1e-3, weight_decay=0.1)
    decay, no_decay = optimizer.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"]) and all(p.dim() < 2 for p in no_decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
    assert any(p is model.embed.weight for p in decay["params"])


def test_options_build_the_model_config_and_refuse_bad_combinations(tmp_path: Path) -> None:
    deeper = TrainOptions(out=tmp_path, preset="tiny", steps=1, n_layers=3, seq_len=48).model_config(300)
    assert deeper.attn_layers == ("local", "lsh", "local") and deeper.max_train_len == 48
    assert deeper.vocab_size == 300
    kinds = TrainOptions(out=tmp_path, preset="tiny", steps=1, attn_layers=("lsh",) * 3).model_config(300)
    assert kinds.n_layers == 3
    with pytest.raises(ValueError, match="use a multiple of 4"):
        TrainOptions(out=tmp_path, steps=1, batch_size=6, grad_accum=2).micro_batch_size(world_size=2)
    with pytest.raises(ValueError, match="--steps N or --time-budget-min"):
        TrainOptions(out=tmp_path)
    with pytest.raises(SystemExit):
        parse_options(["--out", str(tmp_path), "--steps", "0"])


def test_metrics_log_drops_rows_after_the_resumed_step(tmp_path: Path) -> None:
    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    for step in range(1, 6):
        log.append({"kind": "train", "step": step, "loss": float(step)})
    with open(path, "a") as handle:
        handle.write('{"kind": "train", "step": 6, "lo')  # a write cut short by a crash
    resumed = MetricsLog(path, resume_step=3)
    assert [r["step"] for r in resumed.rows] == [1, 2, 3]
    assert [json.loads(line)["step"] for line in path.read_text().splitlines()] == [1, 2, 3]
    assert resumed.series("train", "loss") == ([1, 2, 3], [1.0, 2.0, 3.0])


def test_embed_std_sets_a_fresh_embedding_and_is_refused_when_not_positive(
    tmp_path: Path, chat_tokenizer_path: Path
) -> None:
    """--embed-std draws the token embedding at that scale (lr 1e-30: the weights stay where they start)."""
    stds = {}
    for name, extra in (("default", ()), ("wide", ("--embed-std", "1.0"))):
        out = tmp_path / name
        args = _args(out, chat_tokenizer_path, "--steps", "1", "--eval-every", "1", "--lr", "1e-30", *extra)
        assert main(args) == 0
        model, _ = load_checkpoint(out / "checkpoint", device="cpu")
        stds[name] = model.embed.weight.std().item()
    assert stds["default"] == pytest.approx(0.02, rel=0.1)
    assert stds["wide"] == pytest.approx(1.0, rel=0.1)
    with pytest.raises(ValueError, match="--embed-std must be > 0"):
        TrainOptions(out=tmp_path, steps=1, embed_std=0.0)

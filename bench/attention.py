"""Training step and forward pass, time and peak memory, vs sequence length: ours against the peers.

Why: the Reformer's claim is that LSH attention makes long sequences affordable. This measures it side
by side in one run (same machine, same load, same sizes) and checks the issue's targets as ratios, every
subject in each of --precisions (fp32, and bf16 autocast; a rival is judged by its best precision):
- training step at 16K and 32K: ours >= 2x faster than the fastest of HF, reformer-pytorch and our exact
  "full" layers, at <= half the peak memory of the fastest peer;
- training step at 4K and 16K: ours in bf16 >= 3x faster than ours in fp32 (issue 12);
- forward time per token at 64K within 1.5x of that at 4K (cost linear in length).

Run from the repository root: ``python -m bench.attention`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from bench import peers
from bench._common import (
    GB,
    LOG,
    Panel,
    Series,
    add_common_args,
    autocast,
    find,
    fmt_bytes,
    fmt_time,
    kilo,
    label,
    markdown_table,
    measure_step,
    plot,
    setup_child,
    start_payload,
    sweep,
    sweep_options,
    target,
    targets_table,
    write_json,
)

DEFAULT_LENGTHS = (1024, 4096, 16384, 32768, 65536)
QUICK_LENGTHS = (1024, 2048)
DEFAULT_MODELS = ("ours-lsh", "ours-local-lsh", "ours-full", "hf", "rp")
OURS = ("ours-lsh", "ours-local-lsh")
# "Peers" for the speed target: the two libraries and our own exact attention.
SPEED_RIVALS = ("hf", "rp", "ours-full")
MEMORY_RIVALS = ("hf", "rp")
MODES = ("train", "forward")


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Child side: build one subject, run one mode at one length, return time and peak memory."""
    device = setup_child(spec)
    subject = peers.build(spec["model"], spec["depth"], spec["vocab"], spec["length"])
    module = subject.module.to(device)
    shape = (spec["batch"], spec["length"])
    # Ids from 3 up: 0-2 are HF's pad/eos ids, which it treats specially.
    ids = torch.randint(3, spec["vocab"], shape, device=device)
    targets = torch.randint(3, spec["vocab"], shape, device=device)
    if spec["mode"] == "train":
        module.train()

        def step() -> None:
            module.zero_grad(set_to_none=True)
            with autocast(spec, device):
                loss = subject.train_loss(ids, targets)
            loss.backward()
    else:
        module.eval()

        def step() -> None:
            with torch.no_grad(), autocast(spec, device):
                subject.forward(ids)

    result = measure_step(step, device, spec["reps"])
    result["settings"] = subject.settings
    result["parameters"] = sum(p.numel() for p in module.parameters())
    return result


def _ratio(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float]:
    """a / b for wall and CPU time."""
    return {"wall": a["time_s"] / b["time_s"], "cpu": a["cpu_s"] / b["cpu_s"]}


def _best(rows: list[dict[str, Any]], model: str, mode: str, length: int) -> dict[str, Any] | None:
    """A subject's cell in its best precision (least CPU time), or None when none was measured."""
    cells = [find(rows, model=model, mode=mode, length=length, precision=p) for p in ("fp32", "bf16")]
    measured = [c for c in cells if c and "cpu_s" in c]
    return min(measured, key=lambda c: c["cpu_s"]) if measured else None


def _precision_targets(rows: list[dict[str, Any]], ours: str) -> list[dict[str, Any]]:
    """Issue 12: our training step in bf16 against ours in fp32."""
    out = []
    for length in (4096, 16384):
        fp32 = find(rows, model=ours, mode="train", length=length, precision="fp32")
        bf16 = find(rows, model=ours, mode="train", length=length, precision="bf16")
        if fp32 and bf16 and "time_s" in fp32 and "time_s" in bf16:
            speedup = {k: 1 / v for k, v in _ratio(bf16, fp32).items()}
            out.append(target(f"train step {kilo(length)}: bf16 vs fp32", f"{ours} bf16", f"{ours} fp32",
                              speedup, ">= 3"))  # fmt: skip
    return out


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets, each a ratio of cells of this run (left out where a cell is missing). Ours and
    every rival are each taken in their best precision."""
    out = []
    for ours in OURS:
        out += _precision_targets(rows, ours)
        for length in (16384, 32768):
            mine = _best(rows, ours, "train", length)
            cells = [_best(rows, m, "train", length) for m in SPEED_RIVALS]
            rivals = [r for r in cells if r and "time_s" in r]
            if mine is None or "time_s" not in mine or not rivals:
                continue
            # Each metric against its own fastest rival (wall and CPU may disagree under load).
            fastest = min(rivals, key=lambda r: r["time_s"])
            fastest_cpu = min(rivals, key=lambda r: r["cpu_s"])
            against = label(fastest)
            if fastest_cpu is not fastest:
                against += f" (cpu: {label(fastest_cpu)})"
            speedup = {
                "wall": fastest["time_s"] / mine["time_s"],
                "cpu": fastest_cpu["cpu_s"] / mine["cpu_s"],
            }
            out.append(
                target(
                    f"train step {kilo(length)}: faster than the fastest rival",
                    label(mine),
                    against,
                    speedup,
                    ">= 2",
                )
            )
            peers_ = [r for r in rivals if r["model"] in MEMORY_RIVALS]
            if peers_:
                fastest_peer = min(peers_, key=lambda r: r["time_s"])
                ratio = mine["peak_bytes"] / fastest_peer["peak_bytes"]
                out.append(
                    target(
                        f"train peak memory {kilo(length)}: vs the fastest peer's",
                        label(mine),
                        label(fastest_peer),
                        {"memory": ratio},
                        "<= 0.5",
                    )
                )
        for precision in ("fp32", "bf16"):
            at4k = find(rows, model=ours, mode="forward", length=4096, precision=precision)
            at64k = find(rows, model=ours, mode="forward", length=65536, precision=precision)
            if at4k and at64k and "time_s" in at4k and "time_s" in at64k:
                # per-token cost ratio: (t64 / 65536) / (t4 / 4096)
                per_token = {k: v * 4096 / 65536 for k, v in _ratio(at64k, at4k).items()}
                name = f"{ours} {precision}"
                out.append(target("forward time per token, 64K vs 4K", name, name, per_token, "<= 1.5"))
    return out


def tables(
    rows: list[dict[str, Any]], lengths: list[int], models: list[str], modes: list[str], precisions: list[str]
) -> str:
    parts = []
    for mode in modes:
        body = []
        for model, precision in ((m, p) for m in models for p in precisions):
            found = [find(rows, model=model, mode=mode, length=n, precision=precision) for n in lengths]
            if not any(found):
                continue
            cells = []
            for row in found:
                if row is None or "skipped" in row:
                    cells.append(fmt_time(row))
                else:
                    cold = " (cold)" if row["timed_cold"] else ""
                    cells.append(f"{fmt_time(row)}{cold} / {fmt_time(row, 'cpu_s')} / {fmt_bytes(row)}")
            if cells:
                body.append([f"{model} {precision}", *cells])
        title = "training step (forward + loss + backward)" if mode == "train" else "forward (no grad)"
        parts.append(
            f"**{title}: wall time / CPU time / peak memory**\n\n"
            + markdown_table(["model", *[kilo(n) for n in lengths]], body)
        )
    parts.append("**targets**\n\n" + targets_table(targets(rows)))
    return "\n\n".join(parts)


def plot_rows(rows: list[dict[str, Any]], models: list[str], path: Path) -> None:
    names = list(dict.fromkeys(label(r) for m in models for r in rows if r["model"] == m))

    def series(mode: str, key: str, scale: Callable[[dict[str, Any]], float]) -> Series:
        return {
            n: [(r["length"], scale(r)) for r in rows if label(r) == n and r["mode"] == mode and key in r]
            for n in names
        }

    panels = [
        Panel("training step, wall time", "seconds", series("train", "time_s", lambda r: r["time_s"])),
        Panel("training step, CPU time", "CPU seconds", series("train", "cpu_s", lambda r: r["cpu_s"])),
        Panel(
            "training step, peak memory", "GB", series("train", "peak_bytes", lambda r: r["peak_bytes"] / GB)
        ),
        Panel(
            # CPU time: on a shared machine the wall clock per token mostly tracks other users' load.
            "forward, CPU time per token",
            "CPU µs/token",
            series("forward", "cpu_s", lambda r: r["cpu_s"] / r["length"] * 1e6),
        ),
    ]
    plot(path, panels, xlabel="sequence length (tokens)")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_args(parser, "bench/results/attention.json")
    parser.add_argument("--lengths", type=int, nargs="+", help=f"default {DEFAULT_LENGTHS}")
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), choices=peers.SUBJECTS)
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.replot:
        payload = json.loads(args.out.read_text())
        rows = payload["rows"]
    else:
        payload, rows = run(args)
    lengths = sorted({r["length"] for r in rows})
    present = {r["model"] for r in rows}  # default order first: a --resume may append out of order
    models = [m for m in DEFAULT_MODELS if m in present] + sorted(present - set(DEFAULT_MODELS))
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    precisions = [p for p in ("fp32", "bf16") if any(r.get("precision", "fp32") == p for r in rows)]
    payload["targets"] = targets(rows)
    write_json(args.out, payload)
    plot_rows(rows, models, args.out.with_suffix(".png"))
    print(tables(rows, lengths, models, modes, precisions))


def run(args: argparse.Namespace) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Measure every (length, mode, model) cell in its own child, lengths ascending, models interleaved."""
    lengths = sorted(args.lengths or (QUICK_LENGTHS if args.quick else DEFAULT_LENGTHS))
    specs = [
        {
            "model": m, "mode": mode, "length": n, "precision": p,
            "depth": args.depth, "batch": args.batch, "vocab": args.vocab,
        }
        for n in lengths
        for mode in args.modes
        for m in args.models
        for p in args.precisions
    ]  # fmt: skip
    payload, done = start_payload(args, "attention")

    def on_row(row: dict[str, Any]) -> None:
        LOG.info("%s %s L=%d: %s %s", label(row), row["mode"], row["length"], fmt_time(row), fmt_bytes(row))
        payload["rows"].append(row)
        write_json(args.out, payload)  # after every case, so a long run can be inspected while it goes

    return payload, sweep("bench.attention:measure", specs, "length", sweep_options(args), on_row, done=done)


if __name__ == "__main__":
    main()

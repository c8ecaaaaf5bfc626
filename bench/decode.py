"""Milliseconds per generated token vs history length, and prefill throughput: why a chat turn stays flat.

Subjects, each at histories 1K..64K tokens, one child process per cell:
- ``ours-lsh`` / ``ours-local-lsh``: prefill the history with ``model.decode`` in chunks (the parallel
  prefill path), then time single-token ``decode`` steps on the bounded state.
- ``ours-full``: the same with our exact SDPA layers, whose KV cache grows with the history.
- ``hf``: Hugging Face's cached generation: one ``use_cache=True`` forward over the history, then the step
  loop that ``generate`` runs (last token + ``past_buckets_states``), greedy.
- ``recompute``: the stateless baseline: our LSH forward over the whole context for every new token.
Every subject runs in each of --precisions: fp32, and bf16 (ours: load-time bf16 decode weights and
state, ReformerLM.set_inference_precision; HF and the recompute baseline: bf16 autocast).
The issue's targets: ours at 64K within 1.2x of ours at 1K, and >= 10x faster than HF's cache at 16K (each
in its best precision); issue 12: ours in bf16 <= 0.6x of ours in fp32 per token at 1K and 64K.

Run from the repository root: ``python -m bench.decode`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from bench import peers
from bench._common import (
    LOG,
    Panel,
    PeakMemory,
    Series,
    add_common_args,
    autocast,
    find,
    fmt_bytes,
    kilo,
    label,
    markdown_table,
    measure_step,
    plot,
    setup_child,
    start_payload,
    sweep,
    sweep_options,
    sync,
    target,
    targets_table,
    write_json,
)

DEFAULT_HISTORIES = (1024, 4096, 16384, 65536)
QUICK_HISTORIES = (1024, 2048)
DEFAULT_MODELS = ("ours-lsh", "ours-local-lsh", "ours-full", "hf", "recompute")
OURS = ("ours-lsh", "ours-local-lsh")
WARMUP_STEPS = 3
# Tokens of a throwaway prefill before the timed one, so lazy initialisation is not billed to throughput.
WARMUP_PREFILL = 256


def _time_steps(
    step: Callable[[Tensor], Tensor], token: Tensor, n: int, device: torch.device
) -> tuple[list[float], list[float]]:
    """Greedy single-token steps; each step's output picks the next input, as generation does.
    Returns wall and CPU seconds per step, warm-up steps dropped."""
    times, cpu_times = [], []
    for _ in range(WARMUP_STEPS + n):
        start, cpu_start = time.perf_counter(), time.process_time()
        logits = step(token)  # (1, 1, vocab)
        sync(device)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
        token = logits[:, -1:].argmax(-1)
    return times[WARMUP_STEPS:], cpu_times[WARMUP_STEPS:]


def _hf_past_bytes(past: Any) -> int:
    """Bytes of HF's cache (per layer: buckets and all hidden states so far); walks nested tuples/lists."""
    if isinstance(past, Tensor):
        return past.numel() * past.element_size()
    if isinstance(past, (list, tuple)):
        return sum(_hf_past_bytes(p) for p in past)
    tensors = [v for v in vars(past).values() if isinstance(v, (Tensor, list, tuple))] if past else []
    return sum(_hf_past_bytes(t) for t in tensors)


def _decode_ours(spec: dict[str, Any], history: Tensor, device: torch.device) -> dict[str, Any]:
    model = peers.build_ours(spec["model"], spec["depth"], spec["vocab"]).module.to(device).eval()
    model.set_inference_precision(spec.get("precision", "fp32"))
    state = model.init_state(1)
    meter = PeakMemory(device)
    with torch.no_grad():
        model.decode(history[:, :WARMUP_PREFILL], model.init_state(1))  # first-call costs out of the timing
        meter.start()
        start, cpu_start = time.perf_counter(), time.process_time()
        for chunk in history.split(spec["prefill_chunk"], dim=1):  # (1, <=chunk)
            logits = model.decode(chunk, state)
        sync(device)
        prefill_s, prefill_cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
        peak = meter.peak()
        times, cpu_times = _time_steps(
            lambda tok: model.decode(tok, state), logits[:, -1:].argmax(-1), spec["steps"], device
        )
    return {
        "prefill_s": prefill_s,
        "prefill_cpu_s": prefill_cpu_s,
        "prefill_peak_bytes": peak,
        "step_times_s": times,
        "step_cpu_s": cpu_times,
        "state_bytes": state.nbytes(),
    }


def _decode_hf(spec: dict[str, Any], history: Tensor, device: torch.device) -> dict[str, Any]:
    from transformers import ReformerModelWithLMHead

    needed = history.shape[1] + WARMUP_STEPS + spec["steps"] + 1
    positions = 1 << (needed - 1).bit_length()  # axial positions must cover the whole generated sequence
    config = peers.hf_config(spec["depth"], spec["vocab"], positions, ff_chunk=0)
    model = ReformerModelWithLMHead(config).to(device).eval()
    meter = PeakMemory(device)
    with torch.no_grad():
        model(input_ids=history[:, :WARMUP_PREFILL], use_cache=True)  # first-call costs out of the timing
        meter.start()
        start, cpu_start = time.perf_counter(), time.process_time()
        out = model(input_ids=history, use_cache=True)
        sync(device)
        prefill_s, prefill_cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
        peak = meter.peak()
        cache = {"past": out.past_buckets_states}

        def step(token: Tensor) -> Tensor:
            result = model(input_ids=token, past_buckets_states=cache["past"], use_cache=True)
            cache["past"] = result.past_buckets_states
            return result.logits

        times, cpu_times = _time_steps(step, out.logits[:, -1:].argmax(-1), spec["steps"], device)
    return {
        "prefill_s": prefill_s,
        "prefill_cpu_s": prefill_cpu_s,
        "prefill_peak_bytes": peak,
        "step_times_s": times,
        "step_cpu_s": cpu_times,
        "state_bytes": _hf_past_bytes(cache["past"]),
        "num_buckets": model.config.num_buckets,
    }


def _recompute(spec: dict[str, Any], history: Tensor, device: torch.device) -> dict[str, Any]:
    model = peers.build_ours("ours-lsh", spec["depth"], spec["vocab"]).module.to(device).eval()

    def step() -> None:
        with torch.no_grad():
            model(history)  # the whole context again, for one new token's logits

    result = measure_step(step, device, spec["reps"])
    return {
        "prefill_s": None,
        "prefill_cpu_s": None,
        "prefill_peak_bytes": result["peak_bytes"],
        "step_times_s": result["times_s"] or [result["cold_s"]],
        "step_cpu_s": [result["cpu_s"]],
        "state_bytes": 0,
    }


def measure(spec: dict[str, Any]) -> dict[str, Any]:
    """Child side: one subject at one history length."""
    device = setup_child(spec)
    history = torch.randint(3, spec["vocab"], (1, spec["history"]), device=device)
    if spec["model"] == "hf":
        with autocast(spec, device):
            result = _decode_hf(spec, history, device)
    elif spec["model"] == "recompute":
        with autocast(spec, device):
            result = _recompute(spec, history, device)
    else:  # ours carry their precision in the model (bf16 weights), as the service loads them
        result = _decode_ours(spec, history, device)
    ms = statistics.median(result["step_times_s"]) * 1000
    cpu_ms = statistics.median(result["step_cpu_s"]) * 1000
    prefill_s = result["prefill_s"]
    return {
        **result,
        "ms_per_token": ms,
        "cpu_ms_per_token": cpu_ms,
        "prefill_tok_s": spec["history"] / prefill_s if prefill_s else None,
        "prefill_cpu_tok_s": spec["history"] / result["prefill_cpu_s"] if prefill_s else None,
        # The costliest single piece of work, which the sweep extrapolates to skip what cannot finish.
        "time_s": prefill_s if prefill_s else ms / 1000,
        "cpu_s": result["prefill_cpu_s"] if prefill_s else cpu_ms / 1000,
    }


def _ratio(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float]:
    """a / b in wall and CPU milliseconds per token."""
    return {
        "wall": a["ms_per_token"] / b["ms_per_token"],
        "cpu": a["cpu_ms_per_token"] / b["cpu_ms_per_token"],
    }


def _best(rows: list[dict[str, Any]], model: str, history: int) -> dict[str, Any] | None:
    """A subject's cell in its best precision (least CPU per token), or None when none was measured."""
    cells = [find(rows, model=model, history=history, precision=p) for p in ("fp32", "bf16")]
    measured = [c for c in cells if c and "ms_per_token" in c]
    return min(measured, key=lambda c: c["cpu_ms_per_token"]) if measured else None


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's decode targets, each a ratio of cells of this run (left out where a cell is missing)."""
    out = []
    hf16 = _best(rows, "hf", 16384)
    for ours in OURS:
        for precision in ("fp32", "bf16"):
            at1k = find(rows, model=ours, history=1024, precision=precision)
            at64k = find(rows, model=ours, history=65536, precision=precision)
            if at1k and at64k and "ms_per_token" in at1k and "ms_per_token" in at64k:
                name = f"{ours} {precision}"
                out.append(target("ms/token, 64K history vs 1K", name, name, _ratio(at64k, at1k), "<= 1.2"))
        for history in (1024, 65536):
            fp32 = find(rows, model=ours, history=history, precision="fp32")
            bf16 = find(rows, model=ours, history=history, precision="bf16")
            if fp32 and bf16 and "ms_per_token" in fp32 and "ms_per_token" in bf16:
                name = f"ms/token at {kilo(history)}: bf16 vs fp32"
                out.append(target(name, f"{ours} bf16", f"{ours} fp32", _ratio(bf16, fp32), "<= 0.6"))
        mine = _best(rows, ours, 16384)
        if mine and hf16:
            speedup = _ratio(hf16, mine)
            out.append(
                target("speedup over HF cached generate at 16K", label(mine), label(hf16), speedup, ">= 10")
            )
    return out


def _cell(rows: list[dict[str, Any]], name: str, history: int) -> dict[str, Any] | None:
    """The row of series `name` ("ours-lsh bf16") at `history`."""
    return next((r for r in rows if label(r) == name and r["history"] == history), None)


def tables(rows: list[dict[str, Any]], histories: list[int], names: list[str]) -> str:
    def cell(row: dict[str, Any] | None, key: str, fmt: Callable[[dict[str, Any]], str]) -> str:
        if row is None:
            return "-"
        if "skipped" in row:
            return f"skipped: {row['skipped']}"
        return fmt(row) if row.get(key) is not None else "n/a"

    heads = ["model", *[kilo(h) for h in histories]]
    sections = (
        (
            "ms per generated token (median): wall / CPU",
            "ms_per_token",
            lambda r: f"{r['ms_per_token']:.1f} / {r['cpu_ms_per_token']:.1f}",
        ),
        (
            "prefill tokens per second: wall / CPU",
            "prefill_tok_s",
            lambda r: (
                f"{r['prefill_tok_s']:.0f} / {r['prefill_cpu_tok_s']:.0f}"
                if r.get("prefill_cpu_tok_s")
                else f"{r['prefill_tok_s']:.0f} / n/a"
            ),
        ),
        ("state held per conversation", "state_bytes", lambda r: fmt_bytes(r, "state_bytes")),
    )
    parts = []
    for title, key, fmt in sections:
        body = [[n, *[cell(_cell(rows, n, h), key, fmt) for h in histories]] for n in names]
        parts.append(f"**{title}**\n\n" + markdown_table(heads, body))
    parts.append("**targets**\n\n" + targets_table(targets(rows)))
    return "\n\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_args(parser, "bench/results/decode.json")
    parser.add_argument(
        "--lengths", type=int, nargs="+", help=f"history lengths, default {DEFAULT_HISTORIES}"
    )
    parser.add_argument(
        "--models", nargs="+", default=list(DEFAULT_MODELS), choices=[*peers.SUBJECTS, "recompute"]
    )
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--steps", type=int, default=16, help="timed decode steps per cell")
    parser.add_argument("--prefill-chunk", type=int, default=4096, help="tokens per decode() call in prefill")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.replot:
        payload = json.loads(args.out.read_text())
        rows = payload["rows"]
    else:
        payload, rows = run(args)
    histories = sorted({r["history"] for r in rows})
    # The default order first (a --resume can append cells out of order), then anything else.
    present = {r["model"] for r in rows}
    models = [m for m in DEFAULT_MODELS if m in present] + sorted(present - set(DEFAULT_MODELS))
    names = list(dict.fromkeys(label(r) for m in models for r in rows if r["model"] == m))
    payload["targets"] = targets(rows)
    write_json(args.out, payload)

    def series(key: str, scale: float) -> Series:
        return {
            n: [(r["history"], r[key] / scale) for r in rows if label(r) == n and r.get(key)] for n in names
        }

    panels = [
        Panel("time per generated token (wall)", "ms/token", series("ms_per_token", 1.0)),
        Panel("time per generated token (CPU)", "CPU ms/token", series("cpu_ms_per_token", 1.0)),
        Panel("prefill throughput (per CPU second)", "tokens per CPU s", series("prefill_cpu_tok_s", 1.0)),
        Panel("state per conversation", "MB", series("state_bytes", 2**20)),
    ]
    plot(args.out.with_suffix(".png"), panels, xlabel="history (tokens)")
    print(tables(rows, histories, names))


def run(args: argparse.Namespace) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One child per (history, subject) cell, histories ascending, subjects interleaved."""
    histories = sorted(args.lengths or (QUICK_HISTORIES if args.quick else DEFAULT_HISTORIES))
    steps = 4 if args.quick else args.steps
    specs = [
        {
            "model": m,
            "history": h,
            "precision": p,
            "depth": args.depth,
            "vocab": args.vocab,
            "steps": steps,
            "prefill_chunk": args.prefill_chunk,
        }
        for h in histories
        for m in args.models
        for p in args.precisions
    ]
    payload, done = start_payload(args, "decode")

    def on_row(row: dict[str, Any]) -> None:
        done = row.get("skipped") or f"{row['ms_per_token']:.1f} ms/token"
        LOG.info("%s history=%d: %s", label(row), row["history"], done)
        payload["rows"].append(row)
        write_json(args.out, payload)

    return payload, sweep("bench.decode:measure", specs, "history", sweep_options(args), on_row, done=done)


if __name__ == "__main__":
    main()

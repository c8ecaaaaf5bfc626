"""Training-step peak memory vs depth: reversible against standard execution, ours and the peers.

Why: reversible residual layers are the Reformer's second memory claim: activations are recomputed in the
backward pass instead of stored, so a deeper model should not need more activation memory. The issue's
target (item 5): at L = 4096, the extra peak memory of going from 2 to 8 layers in reversible mode is under
a quarter of the extra in standard mode. Each cell is one training step (forward + loss + backward) in its
own process, measured exactly as in ``bench.attention`` (whose child function this reuses).

Run from the repository root: ``python -m bench.depth`` (``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import json
import logging
from typing import Any

from bench import peers
from bench._common import (
    GB,
    LOG,
    Panel,
    Series,
    add_common_args,
    find,
    fmt_bytes,
    fmt_time,
    markdown_table,
    plot,
    start_payload,
    sweep,
    sweep_options,
    write_json,
)

DEFAULT_DEPTHS = (2, 4, 8, 16)
QUICK_DEPTHS = (2, 4)
# ours-full / ours-full-std can be added with --models; left out by default to keep the run short.
DEFAULT_MODELS = ("ours-lsh", "ours-lsh-std", "hf", "rp", "rp-std")
# (reversible, standard) pairs whose growth with depth is compared; only ours is held to the target.
PAIRS = (("ours-lsh", "ours-lsh-std", True), ("ours-full", "ours-full-std", False), ("rp", "rp-std", False))


def growth_ratios(rows: list[dict[str, Any]], low: int, high: int) -> list[dict[str, Any]]:
    """(peak(high) - peak(low)) reversible / the same standard, for each pair present in the run."""
    out = []
    for rev, std, is_target in PAIRS:
        cells = [find(rows, model=m, depth=d) for m in (rev, std) for d in (low, high)]
        if any(c is None or "peak_bytes" not in c for c in cells):
            continue
        rev_low, rev_high, std_low, std_high = (c["peak_bytes"] for c in cells)  # type: ignore[index]
        extra_rev, extra_std = rev_high - rev_low, std_high - std_low
        ratio = extra_rev / extra_std if extra_std > 0 else float("inf")
        out.append(
            {
                "target": f"extra peak {low}->{high} layers: reversible / standard < 0.25",
                "subject": rev,
                "against": std,
                "extra_reversible_bytes": extra_rev,
                "extra_standard_bytes": extra_std,
                "value": ratio,
                "goal": "< 0.25",
                "met": ratio < 0.25,
                "is_target": is_target,
            }
        )
    return out


def tables(rows: list[dict[str, Any]], depths: list[int], models: list[str], length: int) -> str:
    body = []
    for model in models:
        cells = []
        for depth in depths:
            row = find(rows, model=model, depth=depth)
            cells.append(
                fmt_time(row)
                if row is None or "skipped" in row
                else f"{fmt_bytes(row)} / {fmt_time(row)} / {fmt_time(row, 'cpu_s')}"
            )
        body.append([model, *cells])
    parts = [
        f"**training step at L = {length}: peak memory / wall / CPU time of that (cold) step, by depth**\n\n"
        + markdown_table(["model", *[f"{d} layers" for d in depths]], body)
    ]
    goal_rows = []
    low, high = (2, 8) if {2, 8} <= set(depths) else (depths[0], depths[-1])
    for t in growth_ratios(rows, low, high):
        verdict = ("met" if t["met"] else "MISSED") if t["is_target"] else "(info)"
        goal_rows.append(
            [
                t["target"],
                t["subject"],
                fmt_bytes(t, "extra_reversible_bytes"),
                fmt_bytes(t, "extra_standard_bytes"),
                f"{t['value']:.3f}",
                verdict,
            ]
        )
    parts.append(
        "**target**\n\n"
        + markdown_table(["ratio", "reversible", "extra (rev)", "extra (std)", "value", ""], goal_rows)
    )
    return "\n\n".join(parts)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_common_args(parser, "bench/results/depth.json")
    parser.add_argument("--depths", type=int, nargs="+", help=f"default {DEFAULT_DEPTHS}")
    parser.add_argument("--length", type=int, help="sequence length (default 4096; --quick: 1024)")
    parser.add_argument("--models", nargs="+", default=list(DEFAULT_MODELS), choices=peers.SUBJECTS)
    parser.add_argument("--batch", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.replot:
        payload = json.loads(args.out.read_text())
        rows = payload["rows"]
    else:
        payload, rows = run(args)
    depths = sorted({r["depth"] for r in rows})
    present = {r["model"] for r in rows}  # default order first: a --resume may append out of order
    models = [m for m in DEFAULT_MODELS if m in present] + sorted(present - set(DEFAULT_MODELS))
    length = payload["length"]
    low, high = (2, 8) if {2, 8} <= set(depths) else (depths[0], depths[-1])
    payload["targets"] = growth_ratios(rows, low, high)
    write_json(args.out, payload)

    def series(key: str, scale: float) -> Series:
        return {
            m: [(r["depth"], r[key] / scale) for r in rows if r["model"] == m and key in r] for m in models
        }

    panels = [
        # Linear y: memory grows linearly with depth, and the slope is the point.
        Panel(f"training step peak memory (L={length})", "GB", series("peak_bytes", GB), logy=False),
        Panel(f"training step CPU time (L={length}, cold step)", "CPU seconds", series("cpu_s", 1.0)),
    ]
    plot(args.out.with_suffix(".png"), panels, xlabel="layers")
    print(tables(rows, depths, models, length))


def run(args: argparse.Namespace) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One training step per (depth, model) cell, each in its own child, depths ascending."""
    depths = sorted(args.depths or (QUICK_DEPTHS if args.quick else DEFAULT_DEPTHS))
    length = args.length or (1024 if args.quick else 4096)
    specs = [
        {"model": m, "mode": "train", "length": length, "depth": d, "batch": args.batch, "vocab": args.vocab}
        for d in depths
        for m in args.models
    ]
    payload, done = start_payload(args, "depth", length=length)

    def on_row(row: dict[str, Any]) -> None:
        LOG.info("%s depth=%d: %s %s", row["model"], row["depth"], fmt_bytes(row), fmt_time(row))
        payload["rows"].append(row)
        write_json(args.out, payload)

    # Memory is what this measures, from the cold step; timing it alone (reps=0) keeps depth 16 affordable.
    return payload, sweep(
        "bench.attention:measure", specs, "depth", sweep_options(args), on_row, reps=0, done=done
    )


if __name__ == "__main__":
    main()

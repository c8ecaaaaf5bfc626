"""Quality of bf16 training: the same run (config, data, steps, seed) trained in fp32 and in bf16.

    python -m model.train --out runs/q-fp32 --precision fp32 <the shipped command, fewer steps>
    python -m model.train --out runs/q-bf16 --precision bf16 <the same>
    python -m bench.precision_quality --fp32 runs/q-fp32 --bf16 runs/q-bf16

Reads both runs' metrics.jsonl and compares validation loss at every evaluation and the final test loss;
issue 12's target: bf16's validation loss within 1 % of fp32's. Prints a table and writes JSON (`--out`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from bench._common import markdown_table, write_json


def _rows(run: Path, kind: str) -> list[dict[str, Any]]:
    lines = (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()
    return [row for row in map(json.loads, lines) if row.get("kind") == kind]


def compare(fp32: Path, bf16: Path) -> dict[str, Any]:
    """Per evaluation step and for the test split: both losses and bf16's relative difference."""
    evals = {row["step"]: row for row in _rows(bf16, "eval")}
    points = []
    for row in _rows(fp32, "eval"):
        other = evals.get(row["step"])
        if other is not None:
            points.append(("val", row["step"], row["val_loss"], other["val_loss"]))
    tests = (_rows(fp32, "test"), _rows(bf16, "test"))
    if all(tests):
        points.append(("test", tests[0][-1]["step"], tests[0][-1]["test_loss"], tests[1][-1]["test_loss"]))
    rows = [
        {"split": split, "step": step, "fp32": a, "bf16": b, "relative": (b - a) / a}
        for split, step, a, b in points
    ]
    last_val = [r for r in rows if r["split"] == "val"][-1]
    speed = {
        name: sum(r["tokens_per_s"] for r in _rows(run, "train")) / max(1, len(_rows(run, "train")))
        for name, run in (("fp32", fp32), ("bf16", bf16))
    }
    return {
        "runs": {"fp32": str(fp32), "bf16": str(bf16)},
        "rows": rows,
        "target": {"goal": "|relative| <= 0.01", "relative": last_val["relative"]},
        "met": abs(last_val["relative"]) <= 0.01,
        "mean_train_tokens_per_s": speed,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--fp32", type=Path, required=True, help="a run trained with --precision fp32")
    parser.add_argument("--bf16", type=Path, required=True, help="the same run with --precision bf16")
    parser.add_argument("--out", type=Path, default=Path("bench/results/precision_quality.json"))
    args = parser.parse_args()
    result = compare(args.fp32, args.bf16)
    write_json(args.out, result)
    body = [
        [r["split"], str(r["step"]), f"{r['fp32']:.4f}", f"{r['bf16']:.4f}", f"{100 * r['relative']:+.2f} %"]
        for r in result["rows"]
    ]
    print(markdown_table(["split", "step", "fp32 loss", "bf16 loss", "bf16 vs fp32"], body))
    verdict = "met" if result["met"] else "MISSED"
    print(f"\nlast validation loss within 1 %: {verdict} ({100 * result['target']['relative']:+.2f} %)")


if __name__ == "__main__":
    main()

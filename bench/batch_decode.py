"""Cost of one batched decode step vs the number of rows: what continuous batching can gain at most.

    python -m bench.batch_decode                       # shipped checkpoint, 1..32 rows, one thread
    python -m bench.batch_decode --rows 1 16 --steps 100

The engine decodes every streaming reply in one `model.decode` call per step (app/engine/batching.py). Here
the same call runs alone: each row first gets `--history` tokens of its own (random ids, the parallel
prefill path), then `--steps` single-token steps are timed. The per-row gain at N rows, (step time at 1 row)
/ (step time at N rows / N), is the ceiling on the serving benchmark's throughput ratio: everything the
server does per token besides this call (sampling, detokenizing, websocket frames) only lowers it.
With `--precisions fp32 bf16` each row count runs in each precision (load_checkpoint(precision=...)), the
checkpoint loaded once per precision, side by side. Prints a table and writes JSON (`--out`).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch

from model import ReformerLM, load_checkpoint

DEFAULT_ROWS = (1, 2, 4, 8, 16, 32)


def measure(model: ReformerLM, rows: int, history: int, steps: int, seed: int) -> dict[str, Any]:
    generator = torch.Generator().manual_seed(seed)
    vocab = model.config.vocab_size
    state = model.init_state(rows)
    with torch.inference_mode():
        model.decode(torch.randint(3, vocab, (rows, history), generator=generator), state)
        token = torch.randint(3, vocab, (rows, 1), generator=generator)
        for _ in range(5):  # warm-up: first-use allocations and kernels
            model.decode(token, state)
        cpu, wall = [], []
        for _ in range(steps):
            c0, w0 = time.process_time(), time.perf_counter()
            model.decode(token, state)
            cpu.append(time.process_time() - c0)
            wall.append(time.perf_counter() - w0)
    return {
        "precision": model.precision,
        "rows": rows,
        "cpu_ms": 1000 * statistics.median(cpu),
        "wall_ms": 1000 * statistics.median(wall),
        "state_bytes_per_row": state.nbytes() // rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", type=Path, default=Path("checkpoints/reformer-chat-small"))
    parser.add_argument("--rows", type=int, nargs="+", default=list(DEFAULT_ROWS))
    parser.add_argument("--history", type=int, default=2048, help="tokens each row holds before timing")
    parser.add_argument("--steps", type=int, default=50, help="timed single-token steps (median reported)")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads (bench/serve.py gives its servers 1)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--precisions", nargs="+", default=["fp32"], choices=["fp32", "bf16"])
    parser.add_argument("--out", type=Path, default=Path("bench/results/batch_decode.json"))
    args = parser.parse_args()

    torch.set_num_threads(args.threads)
    models = [load_checkpoint(args.checkpoint, device="cpu", precision=p)[0] for p in args.precisions]
    results = [measure(m, rows, args.history, args.steps, args.seed) for rows in args.rows for m in models]
    print("| precision | rows | CPU ms per step | wall ms per step | CPU ms per row | per-row gain vs 1 |")
    print("|---|---|---|---|---|---|")
    for r in results:
        one = next((o for o in results if o["rows"] == 1 and o["precision"] == r["precision"]), None)
        per_row = r["cpu_ms"] / r["rows"]
        r["per_row_gain"] = one["cpu_ms"] / per_row if one else None
        gain = f"{r['per_row_gain']:.1f}x" if one else "n/a"
        times = [f"{r['cpu_ms']:.2f}", f"{r['wall_ms']:.2f}", f"{per_row:.2f}"]
        cells = [r["precision"], str(r["rows"]), *times, gain]
        print("| " + " | ".join(cells) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    environment = {"torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    args.out.write_text(
        json.dumps({"settings": settings, "environment": environment, "results": results}, indent=2)
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

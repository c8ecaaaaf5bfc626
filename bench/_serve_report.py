"""Tables, targets and plots of the serving benchmark (bench/serve.py), from its JSON payload."""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

from bench._common import Panel, fmt_seconds, kilo, markdown_table, plot, target, targets_table

MB = 1024**2
BASELINES = ("refeed", "full", "full-refeed")


def _median(turns: list[dict[str, Any]], mode: str, history: int, key: str) -> float | None:
    values = [t[key] for t in turns if t["mode"] == mode and t["history"] == history and t[key] is not None]
    return statistics.median(values) if values else None


def _fmt(value: float | None) -> str:
    return "-" if value is None else fmt_seconds(value)


def _ratio(a: float | None, b: float | None) -> str:
    return "-" if a is None or b is None or b == 0 else f"{a / b:.1f}x"


# How a baseline's turn grows with the history L: a warm "full" turn attends over (and copies) its
# whole KV state, a + b*L; a re-fed turn without the cache prefills L tokens, and "full" attention
# makes that a + b*L^2 (lsh/local prefill is linear: a + b*L).
GROWTH = {"full": 1, "full-refeed": 2, "refeed": 1}


def _extend(turns: list[dict[str, Any]], mode: str, history: int, key: str) -> float | None:
    """A baseline's turn latency beyond its longest measured history: y = a + b * L^p through the last
    two measured points (p from GROWTH). Only for lengths past the measured ones, and marked as such."""
    measured = sorted({t["history"] for t in turns if t["mode"] == mode})
    if len(measured) < 2 or history <= measured[-1]:
        return None
    (x0, x1), p = measured[-2:], GROWTH[mode]
    y0, y1 = _median(turns, mode, x0, key), _median(turns, mode, x1, key)
    if y0 is None or y1 is None:
        return None
    b = (y1 - y0) / (x1**p - x0**p)
    return y1 + b * (history**p - x1**p)


def _versus_warm(turns: list[dict[str, Any]], mode: str, h: int, key: str) -> str:
    """A mode's median at h and its ratio to the warm turn's; extrapolated past its measured range."""
    warm = _median(turns, "warm", h, key)
    value = _median(turns, mode, h, key)
    if value is not None:
        return f"{_fmt(value)} ({_ratio(value, warm)})"
    guess = _extend(turns, mode, h, key) if mode in GROWTH else None
    return f"~{_fmt(guess)} ({_ratio(guess, warm)}), extrapolated" if guess is not None else "-"


def flat_table(turns: list[dict[str, Any]]) -> str:
    """What the client sees: wall-clock turn latency and time to first token."""
    rows = [
        [
            kilo(h),
            _fmt(_median(turns, "warm", h, "latency_s")),
            _fmt(_median(turns, "warm", h, "ttft_s")),
            _versus_warm(turns, "cold", h, "latency_s"),
            _fmt(_median(turns, "cold", h, "ttft_s")),
            *(_versus_warm(turns, mode, h, "latency_s") for mode in BASELINES),
        ]
        for h in sorted({t["history"] for t in turns})
    ]
    headers = [
        "history",
        "warm turn",
        "warm TTFT",
        "cold turn (x warm)",
        "cold TTFT",
        "refeed turn (x warm)",
        "full warm turn (x warm)",
        "full refeed turn (x warm)",
    ]
    return markdown_table(headers, rows)


def cpu_table(turns: list[dict[str, Any]]) -> str:
    """The server process's CPU time per turn: what the turn costs, much less moved by other tenants."""
    rows = [
        [kilo(h), _fmt(_median(turns, "warm", h, "server_cpu_s"))]
        + [_versus_warm(turns, mode, h, "server_cpu_s") for mode in ("cold", *BASELINES)]
        for h in sorted({t["history"] for t in turns})
    ]
    headers = [
        "history",
        "warm",
        "cold (x warm)",
        "refeed (x warm)",
        "full warm (x warm)",
        "full refeed (x warm)",
    ]
    return markdown_table(headers, rows)


def memory_table(memory: list[dict[str, Any]]) -> str:
    """Each stateful row is a freshly started server after one cold turn: it holds just that conversation."""
    histories = sorted({m["history"] for m in memory})

    def cell(mode: str, h: int, key: str) -> str:
        found = [m[key] for m in memory if m["mode"] == mode and m["history"] == h and m.get(key) is not None]
        return f"{found[-1] / MB:.1f} MB" if found else "-"

    rows = [
        [
            kilo(h),
            cell("stateful", h, "state_bytes"),
            cell("stateful", h, "rss_bytes"),
            cell("stateful", h, "peak_rss_bytes"),
            cell("stateful-fixed-mmap", h, "rss_bytes"),
            cell("stateful-fixed-mmap", h, "peak_rss_bytes"),
            cell("full", h, "state_bytes"),
            cell("full", h, "rss_bytes"),
        ]
        for h in histories
    ]
    headers = [
        "history",
        "decode state cached",
        "RSS after the cold turn",
        "peak RSS",
        "RSS, fixed mmap threshold",
        "peak RSS, fixed mmap threshold",
        "full: KV state cached",
        "full: RSS",
    ]
    return markdown_table(headers, rows)


def crowd_table(rows: list[dict[str, Any]]) -> str:
    body = []
    for r in rows:
        # "x one": against one conversation on the same server (same precision).
        base = next((b["tokens_per_s"] for b in rows if b.get("precision") == r.get("precision")), None)
        ttft, itl = r["ttft_s"], r["itl_s"]
        body.append(
            [
                r.get("precision", "-"),
                str(r["conversations"]),
                f"{r['tokens_per_s']:.1f}",
                _ratio(r["tokens_per_s"], base),
                f"{r['tokens_per_cpu_s']:.1f}" if r["tokens_per_cpu_s"] else "-",
                " / ".join(_fmt(ttft[p]) for p in ("p50", "p95", "p99")),
                " / ".join(_fmt(itl[p]) for p in ("p50", "p95", "p99")),
                f"{r['rows_per_step']:.1f}" if r.get("rows_per_step") else "-",
                str(r["errors"]),
            ]
        )
    headers = [
        "precision",
        "conversations",
        "tokens/s",
        "x one",
        "tokens per server CPU s",
        "TTFT p50 / p95 / p99",
        "inter-token p50 / p95 / p99",
        "rows per decode step",
        "errors",
    ]
    return markdown_table(headers, body)


TURN_OPS = ("get", "lock", "read_ids", "append_turn", "unlock", "renew_lock")


def redis_table(groups: list[dict[str, Any]]) -> str:
    """Per group of measured turns: Redis time per turn, and the slowest operation's p99.

    The app's histogram times each store call from the coroutine's side, so it also counts waiting for
    the event loop and the GIL (shared with the websocket streams and the engine thread), not only Redis.
    Per-turn p50 adds the operations' p50s; the p99 column adds their p99s (an upper bound).
    """
    rows = []
    for group in groups:
        ops, turns = group["operations"], group["turns"]
        used = [op for op in TURN_OPS if op in ops]
        if not used or not turns:
            continue
        slowest = max(used, key=lambda op: ops[op]["p99_s"])
        rows.append(
            [
                group["label"],
                str(turns),
                _fmt(sum(ops[op]["sum_s"] for op in used) / turns),
                f"~{_fmt(sum(ops[op]['p50_s'] for op in used))}",
                f"<= {_fmt(sum(ops[op]['p99_s'] for op in used))}",
                f"{slowest} {_fmt(ops[slowest]['p99_s'])}",
            ]
        )
    headers = ["measured turns", "count", "mean per turn", "p50 per turn", "p99 per turn", "slowest op p99"]
    return markdown_table(headers, rows)


def targets(payload: dict[str, Any]) -> list[dict[str, Any]]:
    turns, memory, crowd = payload["turns"], payload["memory"], payload["concurrency"]
    found = []
    histories = sorted({t["history"] for t in turns if t["mode"] == "warm"})
    if len(histories) > 1:
        low, high = histories[0], histories[-1]
        values = {
            "wall": _median(turns, "warm", high, "latency_s") / _median(turns, "warm", low, "latency_s"),
            "cpu": _median(turns, "warm", high, "server_cpu_s") / _median(turns, "warm", low, "server_cpu_s"),
        }
        found.append(
            target("warm turn flat", f"warm at {kilo(high)}", f"warm at {kilo(low)}", values, "<= 1.2")
        )
    for mode, label in (
        ("stateful", "memory flat"),
        ("stateful-fixed-mmap", "memory flat, fixed mmap threshold"),
    ):
        rss = {m["history"]: m["rss_bytes"] for m in memory if m["mode"] == mode}
        if 1024 in rss and len(rss) > 1:
            high = max(rss)
            values = {"memory": rss[high] / rss[1024]}
            found.append(target(label, f"server RSS at {kilo(high)}", "at 1K", values, "<= 1.05"))
    busy = sorted({t["history"] for t in turns if t["mode"] == "busy"})
    if len(busy) > 1:
        low, high = busy[0], busy[-1]
        slow, fast = _median(turns, "busy", high, "latency_s"), _median(turns, "busy", low, "latency_s")
        values = {"wall": slow / fast} if slow and fast else {}
        label = f"turn at {kilo(high)}, others streaming"
        found.append(target("busy turn flat", label, f"at {kilo(low)}", values, "<= 1.2"))
    by_count = {r["conversations"]: r for r in crowd}
    for count, goal in ((16, ">= 6"), (64, ">= 8")):
        if 1 not in by_count or count not in by_count:
            continue
        one, many = by_count[1], by_count[count]
        values = {"wall": many["tokens_per_s"] / one["tokens_per_s"]}
        if one["tokens_per_cpu_s"] and many["tokens_per_cpu_s"]:
            values["cpu"] = many["tokens_per_cpu_s"] / one["tokens_per_cpu_s"]
        found.append(target("batching", f"{count} conversations tokens/s", "1 conversation", values, goal))
    return found


def report(payload: dict[str, Any]) -> str:
    errors = sum(r["errors"] for r in payload["concurrency"])
    parts = [
        "### Flat turns: wall clock at the client (20-token message, 32-token reply; medians)",
        flat_table(payload["turns"]),
        "### Flat turns: server CPU time per turn",
        cpu_table(payload["turns"]),
        "### Server memory",
        memory_table(payload["memory"]),
        "### Concurrency",
        crowd_table(payload["concurrency"]),
        f"errors across all concurrency levels: {errors}",
        "### Redis time per measured turn (from the server's own histograms)",
        redis_table(payload["redis"]),
        "### Targets",
        targets_table(targets(payload)),
    ]
    return "\n\n".join(parts) + "\n"


def plots(payload: dict[str, Any], out: Path, name: str) -> None:
    turns = payload["turns"]

    def series(key: str, modes: tuple[str, ...]) -> dict[str, list[tuple[float, float]]]:
        found: dict[str, list[tuple[float, float]]] = {}
        for mode in modes:
            for h in sorted({t["history"] for t in turns if t["mode"] == mode}):
                value = _median(turns, mode, h, key)
                if value is not None:
                    found.setdefault(mode, []).append((h, value))
        return found

    modes = ("warm", "cold", *BASELINES)
    memory = {
        mode: [(m["history"], m["rss_bytes"] / MB) for m in payload["memory"] if m["mode"] == mode]
        for mode in ("stateful", "stateful-fixed-mmap", "full")
    }
    if any(t["mode"] in modes for t in turns):  # the busy phase's turns alone have no flat curve
        plot(
            out / f"{name}_flat.png",
            [
                Panel(
                    "Turn latency (20-token message, 32-token reply)", "seconds", series("latency_s", modes)
                ),
                Panel("Time to first token", "seconds", series("ttft_s", modes)),
                Panel("Server resident memory", "MB", memory, logy=False),
            ],
            "conversation history (tokens)",
        )
    crowd = payload["concurrency"]
    if crowd:
        plot(
            out / f"{name}_concurrency.png",
            [
                Panel(
                    "Aggregate generation",
                    "tokens per second",
                    {
                        "per wall-clock second": [(r["conversations"], r["tokens_per_s"]) for r in crowd],
                        "per server CPU second": [
                            (r["conversations"], r["tokens_per_cpu_s"])
                            for r in crowd
                            if r["tokens_per_cpu_s"]
                        ],
                    },
                ),
                Panel(
                    "Latency percentiles",
                    "seconds",
                    {
                        f"{what} {p}": [
                            (r["conversations"], r[f"{what}_s"][p]) for r in crowd if r[f"{what}_s"][p]
                        ]
                        for what in ("ttft", "itl")
                        for p in ("p50", "p99")
                    },
                ),
            ],
            "concurrent conversations",
        )

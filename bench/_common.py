"""Measurement harness shared by the benchmarks: isolated child runs, peak memory, timing, skip rules, output.

Why a child process per measurement: one OOM, crash or hang costs one table cell, not the run; and the
child's peak memory is its own, not inflated by whatever an earlier measurement left in the allocator.

Peak memory on the CPU: the child resets its resident-set high-water mark (``echo 5 >
/proc/self/clear_refs``), reads its RSS right before the step, runs the step, and reports ``VmHWM -
RSS_before`` (from /proc/self/status): the extra resident memory the step needed at its peak. Not
``ru_maxrss``: Linux carries the parent's high-water mark into a child across fork/exec, so it can never
read below the launcher's size. It is measured
on the first (cold) step of a fresh process, because later steps reuse memory that glibc kept from earlier
ones, which would hide part of the peak. On CUDA: ``max_memory_allocated() - memory_allocated()`` around the
step, after ``reset_peak_memory_stats()``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

import torch

LOG = logging.getLogger("bench")
RESULT_MARK = "BENCH_RESULT "
GB = 1024**3
REPO_ROOT = Path(__file__).resolve().parent.parent


# ---- inside the child ----------------------------------------------------------------------------------
class PeakMemory:
    """Extra peak memory of one region of code, on the CPU (RSS high-water mark) or CUDA (allocator)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.baseline = 0

    def start(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.baseline = torch.cuda.memory_allocated(self.device)
            return
        # Without the reset, the high-water mark could come from model construction instead of the step.
        Path("/proc/self/clear_refs").write_text("5")
        self.baseline = _rss_bytes()

    def peak(self) -> int:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            return torch.cuda.max_memory_allocated(self.device) - self.baseline
        return _status_bytes("VmHWM") - self.baseline


def _rss_bytes(pid: int | str = "self") -> int:
    return _status_bytes("VmRSS", pid)


def _status_bytes(field: str, pid: int | str = "self") -> int:
    """A memory field of /proc/<pid>/status (VmRSS, VmHWM, ...) in bytes; 0 if absent."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    return 0


def sync(device: torch.device) -> None:
    """Wait for queued kernels, so a timer measures work rather than launch."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_step(step: Callable[[], None], device: torch.device, reps: int) -> dict[str, Any]:
    """Peak memory from the cold first step, then the median time of ``reps`` more (or the cold one if 0)."""
    meter = PeakMemory(device)
    load_before = os.getloadavg()[0]
    meter.start()
    start, cpu_start = time.perf_counter(), time.process_time()
    step()
    sync(device)
    cold_s, cold_cpu_s = time.perf_counter() - start, time.process_time() - cpu_start
    peak = meter.peak()
    times, cpu_times = [], []
    for _ in range(reps):
        start, cpu_start = time.perf_counter(), time.process_time()
        step()
        sync(device)
        times.append(time.perf_counter() - start)
        cpu_times.append(time.process_time() - cpu_start)
    return {
        "time_s": statistics.median(times) if times else cold_s,
        # CPU seconds of all the child's threads: less sensitive than wall time to other users' load.
        "cpu_s": statistics.median(cpu_times) if cpu_times else cold_cpu_s,
        "times_s": times,
        "cold_s": cold_s,
        "timed_cold": not times,
        "peak_bytes": peak,
        # 1-minute load average around the measurement: above --threads means others shared the cores.
        "load": [load_before, os.getloadavg()[0]],
    }


def setup_child(spec: dict[str, Any]) -> torch.device:
    """Threads and seed exactly as the parent asked, the same for every subject."""
    torch.set_num_threads(int(spec["threads"]))
    torch.manual_seed(int(spec.get("seed", 0)))
    return torch.device(spec["device"])


# ---- in the parent -------------------------------------------------------------------------------------
def run_isolated(target: str, spec: dict[str, Any], timeout_s: float, mem_limit_bytes: int) -> dict[str, Any]:
    """Run ``target`` ("module:function") on ``spec`` in a fresh interpreter and return its result dict.

    A watchdog kills the child when its RSS passes ``mem_limit_bytes`` or it runs past ``timeout_s``; the
    result then says ``{"skipped": reason}`` so the table shows why the cell is empty.
    """
    env = dict(os.environ, OMP_NUM_THREADS=str(spec["threads"]), PYTHONPATH=str(REPO_ROOT))
    cmd = [sys.executable, "-m", "bench._worker", target, json.dumps(spec)]
    # Files, not pipes: a chatty child must never block on a full pipe while the parent only polls.
    with tempfile.TemporaryFile("w+") as out_file, tempfile.TemporaryFile("w+") as err_file:
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=out_file, stderr=err_file, text=True)
        try:
            reason = _watch(proc, timeout_s, mem_limit_bytes)
        finally:
            if proc.poll() is None:  # the parent is being stopped: never leave an orphan computing
                proc.kill()
                proc.wait()
        out_file.seek(0)
        err_file.seek(0)
        out, err = out_file.read(), err_file.read()
    if reason:
        return {"skipped": reason}
    for line in reversed(out.splitlines()):
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK) :])
    tail = " | ".join(err.strip().splitlines()[-3:])
    return {"skipped": f"crashed (exit {proc.returncode}): {tail[-300:]}"}


def _watch(proc: subprocess.Popen[str], timeout_s: float, mem_limit_bytes: int) -> str | None:
    """Poll the child until it exits; kill it and say why if it passes the memory or time limit."""
    start = time.monotonic()
    max_rss = 0
    while proc.poll() is None:
        with contextlib.suppress(FileNotFoundError, ProcessLookupError):
            max_rss = max(max_rss, _rss_bytes(proc.pid))
        reason = None
        if max_rss > mem_limit_bytes:
            reason = f"memory guard: RSS passed {mem_limit_bytes / GB:.1f} GB"
        elif time.monotonic() - start > timeout_s:
            reason = f"timeout after {timeout_s:.0f} s"
        if reason:
            proc.kill()
            proc.wait()
            return reason
        time.sleep(0.05)
    return None


def extrapolate(points: list[tuple[float, float]], x: float) -> float | None:
    """Power-law guess at ``x`` from the last two (x, y) points: enough to skip a case that cannot fit."""
    usable = [(px, py) for px, py in points if py and py > 0]
    if not usable:
        return None
    if len(usable) == 1:
        (x0, y0) = usable[0]
        return y0 * x / x0
    (x0, y0), (x1, y1) = usable[-2], usable[-1]
    exponent = max(1.0, math.log(y1 / y0) / math.log(x1 / x0)) if x1 != x0 else 1.0
    return y1 * (x / x1) ** exponent


def plan_reps(predicted_s: float | None, quick: bool) -> int:
    """Timed repetitions after the cold step: several for fast steps, none once one step is long."""
    if quick:
        return 1
    if predicted_s is None or predicted_s < 5:
        return 3
    return 2 if predicted_s < 30 else 0


@dataclass(frozen=True)
class SweepOptions:
    """The parent's limits, from the command line; the same for every subject so skips are comparable."""

    device: str
    threads: int
    quick: bool
    timeout_s: float
    mem_limit_bytes: int
    max_step_s: float


def add_common_args(parser: argparse.ArgumentParser, default_out: str) -> None:
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    parser.add_argument(
        "--precisions",
        nargs="+",
        default=["fp32", "bf16"],
        choices=["fp32", "bf16"],
        help="run every subject in each: fp32, and bf16 (autocast; ours also with bf16 decode weights)",
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads in each child (CPU)")
    parser.add_argument("--quick", action="store_true", help="small smoke run: short lengths, one rep")
    parser.add_argument("--out", type=Path, default=Path(default_out), help="JSON path; the PNG goes beside")
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument(
        "--mem-limit-gb",
        type=float,
        default=16.0,
        help="skip (or kill) a case whose resident memory would pass this",
    )
    parser.add_argument(
        "--case-timeout", type=float, default=3600.0, help="kill one case after this many wall-clock seconds"
    )
    parser.add_argument(
        "--resume", action="store_true", help="keep the measured cells already in --out, measure the rest"
    )
    parser.add_argument(
        "--replot", action="store_true", help="re-render the tables and PNG from --out; measure nothing"
    )
    parser.add_argument(
        "--max-step-s",
        type=float,
        default=240.0,
        help="skip a case whose predicted single step needs more than this many CPU seconds",
    )


def sweep_options(args: argparse.Namespace) -> SweepOptions:
    return SweepOptions(
        device=args.device,
        threads=args.threads,
        quick=args.quick,
        timeout_s=args.case_timeout,
        mem_limit_bytes=int(args.mem_limit_gb * GB),
        max_step_s=args.max_step_s,
    )


# What makes cells one series (one line of a plot), apart from the swept size.
SERIES_KEYS = ("model", "mode", "precision")


def sweep(
    target: str,
    specs: list[dict[str, Any]],
    x_key: str,
    opts: SweepOptions,
    on_row: Callable[[dict[str, Any]], None],
    reps: int | None = None,
    done: list[dict[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """Run each spec in its own child, in order, skipping what earlier sizes show cannot fit.

    Specs of one series (same SERIES_KEYS) must come in increasing ``x_key``: the last two results predict
    the next one's step time and peak memory (power law), and a series that was skipped or failed at a
    smaller size is not retried at a bigger one. ``reps`` fixes the timed repetitions after
    the cold step (0: time only the cold step) instead of planning them from the predicted step time.
    ``done`` holds rows of an earlier run of the same command (--resume): a measured cell is kept as it is,
    a skipped one is judged again under the current limits.
    """
    # SIGTERM (kill PID) -> SystemExit, so run_isolated's cleanup stops the running child too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    rows: list[dict[str, Any]] = []
    for spec in specs:
        earlier = [
            r for r in done or [] if "skipped" not in r and all(r.get(k) == v for k, v in spec.items())
        ]
        if earlier and earlier[0].get("device") == opts.device and earlier[0].get("threads") == opts.threads:
            rows.append(earlier[0])
            on_row(earlier[0])
            continue
        # Earlier sizes of this series, from this invocation or the run it resumes, smallest first.
        seen = [r for r in rows + (done or []) if r[x_key] < spec[x_key]]
        series = sorted(
            (r for r in seen if all(r.get(k) == spec.get(k) for k in SERIES_KEYS)),
            key=lambda r: r[x_key],
        )
        x = spec[x_key]
        # Predict CPU seconds (the work), not wall time: on a shared machine wall time is mostly others' load.
        t_pred = extrapolate([(r[x_key], r["cpu_s"]) for r in series if "cpu_s" in r], x)
        m_pred = extrapolate([(r[x_key], r["peak_bytes"]) for r in series if "peak_bytes" in r], x)
        reason = None
        failed = [r for r in series if "skipped" in r]
        if failed:
            reason = f"not run: skipped at {x_key} {failed[0][x_key]}"
        elif t_pred is not None and t_pred > opts.max_step_s:
            reason = f"predicted ~{t_pred:.0f} CPU s per step > {opts.max_step_s:.0f} s limit"
        elif m_pred is not None and m_pred > opts.mem_limit_bytes:
            reason = f"predicted ~{m_pred / GB:.1f} GB > {opts.mem_limit_bytes / GB:.0f} GB limit"
        full = dict(
            spec,
            device=opts.device,
            threads=opts.threads,
            reps=plan_reps(t_pred, opts.quick) if reps is None else reps,
        )
        result = (
            {"skipped": reason}
            if reason
            else run_isolated(target, full, opts.timeout_s, opts.mem_limit_bytes)
        )
        row = {**full, **result}
        rows.append(row)
        on_row(row)
    # Cells of the earlier run that this invocation did not ask for (a narrower --models/--lengths) stay.
    for old in done or []:
        if not any(all(r.get(k) == old.get(k) for k in (*SERIES_KEYS, x_key)) for r in rows):
            rows.append(old)
            on_row(old)
    return rows


def start_payload(args: argparse.Namespace, benchmark: str, **extra: Any) -> tuple[dict[str, Any], list]:
    """The JSON document a run fills, and the rows to keep from an earlier run when --resume is given."""
    env = environment(args.device, args.threads)
    if args.resume and args.out.exists():
        old = json.loads(args.out.read_text())
        payload = {**old, "rows": []}
        payload.setdefault("resumes", []).append(env)  # when and how the missing cells were measured
        return payload, old["rows"]
    return {"benchmark": benchmark, **extra, "environment": env, "rows": []}, []


def autocast(spec: dict[str, Any], device: torch.device) -> torch.autocast:
    """The cell's precision as an autocast context (disabled for fp32; rows from before the precision axis
    are fp32)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=spec.get("precision") == "bf16")


def label(row: dict[str, Any]) -> str:
    """A subject and its precision, as tables and plots name a series: "hf bf16"."""
    return f"{row['model']} {row.get('precision', 'fp32')}"


def find(rows: list[dict[str, Any]], **match: Any) -> dict[str, Any] | None:
    """The row whose fields equal ``match`` (None when that case is not in the run); a row without a
    precision (measured before the precision axis) is fp32."""
    for row in rows:
        if all(row.get(k, "fp32" if k == "precision" else None) == v for k, v in match.items()):
            return row
    return None


def environment(device: str, threads: int) -> dict[str, Any]:
    """What produced the numbers, stored next to them."""
    import importlib.metadata as md

    versions = {}
    for dist in ("torch", "transformers", "reformer-pytorch"):
        try:
            versions[dist] = md.version(dist)
        except md.PackageNotFoundError:
            versions[dist] = None
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            check=False,
        ).stdout.strip()
    except OSError:
        commit = ""
    cpu = platform.processor()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [
            ln.split(":", 1)[1].strip()
            for ln in cpuinfo.read_text().splitlines()
            if ln.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    return {
        "device": device,
        "threads": threads,
        "cpu": cpu,
        "python": platform.python_version(),
        "versions": versions,
        "git_commit": commit,
        "argv": sys.argv,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
        # Inherited by every child: a fixed glibc mmap threshold changes what RSS-based peaks measure.
        "malloc_mmap_threshold": os.environ.get("MALLOC_MMAP_THRESHOLD_"),
    }


def markdown_table(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def kilo(n: int) -> str:
    """Column label for a length: 16384 -> "16K", 512 -> "512"."""
    return f"{n // 1024}K" if n >= 1024 and n % 1024 == 0 else str(n)


def fmt_time(result: dict[str, Any] | None, key: str = "time_s") -> str:
    if result is None:
        return "-"
    if "skipped" in result:
        return f"skipped: {result['skipped']}"
    return fmt_seconds(result[key])


def fmt_seconds(value: float) -> str:
    return f"{value * 1000:.1f} ms" if value < 1 else f"{value:.2f} s"


def fmt_bytes(result: dict[str, Any] | None, key: str = "peak_bytes") -> str:
    if result is None or "skipped" in result:
        return "-"
    value = result[key]
    return f"{value / 1024**2:.0f} MB" if value < GB else f"{value / GB:.2f} GB"


_GOAL_OPS: dict[str, Callable[[float, float], bool]] = {
    ">=": lambda a, b: a >= b,
    "<=": lambda a, b: a <= b,
    "<": lambda a, b: a < b,
}


def target(name: str, subject: str, against: str, values: dict[str, float], goal: str) -> dict[str, Any]:
    """One of the issue's targets as a ratio per metric (e.g. ``{"wall": 2.3, "cpu": 2.1}``).

    Both wall and CPU time are judged because this machine's cores are shared: wall time carries other
    users' load, CPU time (all the child's threads) much less of it.
    """
    op, threshold = goal.split()
    if op not in _GOAL_OPS:
        raise ValueError(f"goal {goal!r} must start with one of {sorted(_GOAL_OPS)}, e.g. '>= 2'")
    met = {k: _GOAL_OPS[op](v, float(threshold)) for k, v in values.items()}
    return {
        "target": name,
        "subject": subject,
        "against": against,
        "values": values,
        "goal": goal,
        "met": met,
    }


def targets_table(targets: list[dict[str, Any]]) -> str:
    metrics = sorted({k for t in targets for k in t["values"]}, key=["wall", "cpu", "memory"].index)
    body = [
        [t["target"], t["subject"], t["against"], t["goal"]]
        + [
            f"{t['values'][k]:.2f} ({'met' if t['met'][k] else 'MISSED'})" if k in t["values"] else ""
            for k in metrics
        ]
        for t in targets
    ]
    return markdown_table(["target", "ours", "against", "goal", *metrics], body)


def write_json(path: Path, payload: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2) + "\n")


Series = dict[str, list[tuple[float, float]]]


class Panel(NamedTuple):
    """One plot panel: lines of (x, y) points by subject name."""

    title: str
    ylabel: str
    series: Series
    logy: bool = True


def plot(path: Path, panels: list[Panel], xlabel: str) -> None:
    """Side-by-side panels; x is log2 because lengths and depths double from point to point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.5), squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        for name, points in panel.series.items():
            if points:
                xs, ys = zip(*sorted(points), strict=True)
                ax.plot(xs, ys, marker="o", label=name)
        ax.set_xscale("log", base=2)
        if panel.logy:
            ax.set_yscale("log")
        else:
            ax.set_ylim(bottom=0)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(panel.ylabel)
        ax.set_title(panel.title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)

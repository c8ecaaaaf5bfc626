"""Training metrics: a JSON-lines log that survives resume, and the loss-curve plot drawn from it.

metrics.jsonl has one object per line and a "kind" saying what it measures:

    {"kind": "train", "step": 120, "loss": 4.21, "lr": 0.0006, "tokens_per_s": 5400.0, "grad_norm": 0.8, ...}
    {"kind": "eval",  "step": 500, "val_loss": 3.95, "val_ppl": 51.9}
    {"kind": "test",  "step": 2000, "test_loss": 3.90, "test_ppl": 49.4}

JSON lines rather than one JSON document: appending a line is cheap and a run killed mid-write loses at most
its last line; any tool (jq, pandas.read_json(lines=True)) reads it.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)


class MetricsLog:
    """Appends metric rows to `<run dir>/metrics.jsonl` and keeps them in memory for plotting."""

    def __init__(self, path: Path, resume_step: int | None = None) -> None:
        """Open the log; on resume keep only rows up to `resume_step`.

        Rows after the step the resumed state was saved at describe steps that will be trained again;
        keeping them would draw the same steps twice in the loss curve.
        """
        self.path = path
        self.rows: list[dict[str, Any]] = []
        if resume_step is not None and path.is_file():
            for line in path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    logger.warning("%s: skipping an unreadable line (a write cut short): %.60s", path, line)
                    continue
                if isinstance(row, dict) and row.get("step", 0) <= resume_step and row.get("kind") != "test":
                    self.rows.append(row)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_text("".join(json.dumps(row) + "\n" for row in self.rows), encoding="utf-8")
        tmp.replace(path)

    def append(self, row: Mapping[str, Any]) -> None:
        record = dict(row)
        self.rows.append(record)
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def series(self, kind: str, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of one metric, skipping rows where it is missing or not finite."""
        steps: list[int] = []
        values: list[float] = []
        for row in self.rows:
            value = row.get(key)
            if row.get("kind") == kind and isinstance(value, int | float) and math.isfinite(value):
                steps.append(int(row["step"]))
                values.append(float(value))
        return steps, values


def plot_loss_curve(log: MetricsLog, path: Path, title: str = "") -> None:
    """Draw training and validation loss against the step into a PNG.

    Uses matplotlib's object API with the Agg canvas (no pyplot): no display is needed and no global
    figure state is touched, so this is safe on a headless GPU box and inside tests.
    """
    # Imported here: matplotlib takes about a second to import and only the writer of the plot needs it.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(8, 4.5), dpi=100)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot(1, 1, 1)
    train_steps, train_loss = log.series("train", "loss")
    val_steps, val_loss = log.series("eval", "val_loss")
    if train_steps:
        axes.plot(train_steps, train_loss, label="train loss", linewidth=1.0, alpha=0.8)
    if val_steps:
        axes.plot(val_steps, val_loss, label="validation loss", marker="o", linewidth=1.5)
    axes.set_xlabel("optimizer step")
    axes.set_ylabel("cross-entropy (nats / token)")
    axes.set_title(title or "training curve")
    axes.grid(True, alpha=0.3)
    if train_steps or val_steps:
        axes.legend()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp.png")
    figure.savefig(tmp)
    tmp.replace(path)

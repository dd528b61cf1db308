"""What a run tells its user: train.log (and the same lines on stdout), metrics.jsonl and curves.png.

Only rank 0 writes. metrics.jsonl and curves.png are rewritten whole, atomically, after every epoch from
the run's history, so a resumed run's files hold every epoch from the first.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

__all__ = ["RunLog", "epoch_line", "write_metrics"]


class RunLog:
    """train.log (rank 0 only) plus the same lines on stdout."""

    def __init__(self, path: Path, enabled: bool, append: bool):
        self.enabled = enabled
        self._file = open(path, "a" if append else "w", encoding="utf-8") if enabled else None  # noqa: SIM115

    def __call__(self, line: str) -> None:
        if not self.enabled:
            return
        stamp = time.strftime("%Y-%m-%d %H:%M:%S")
        self._file.write(f"{stamp} {line}\n")
        self._file.flush()
        print(line, flush=True)

    def first(self, line: str) -> None:
        """A line without a time stamp (the log's header)."""
        if self.enabled:
            self._file.write(line + "\n")
            self._file.flush()
            print(line, flush=True)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()


def write_metrics(out: Path, history: Sequence[dict[str, Any]], class_names: Sequence[str]) -> None:
    """metrics.jsonl (one record per epoch) and curves.png in ``out``; ``class_names`` are the foreground's."""
    from napari_medcl.atomic import atomic_path, write_text_atomic

    lines = "".join(json.dumps(r, allow_nan=True) + "\n" for r in history)
    write_text_atomic(out / "metrics.jsonl", lines)
    figure = _curves(history, class_names)
    with atomic_path(out / "curves.png") as tmp:
        figure.savefig(tmp, format="png", dpi=100)


def epoch_line(record: dict[str, Any], epochs: int) -> str:
    """The log line of one metrics record."""
    train = record["train"]
    extra = ", ".join(
        f"{k} {v:.3g}" if k.endswith("_ratio") else f"{k} {v:.4f}" for k, v in train.items() if k != "loss"
    )
    line = f"epoch {record['epoch']}/{epochs}: loss {train['loss']:.4f} ({extra})"
    if record["val"] is not None:
        val = record["val"]
        per_class = ", ".join(f"{k} {v:.4f}" for k, v in val["dice"].items())
        line += f"; val mean Dice {val['mean_dice']:.4f} ({per_class})"
    return line + f"; lr {record['lr']:.3g}; {record['seconds']:.1f} s"


def _curves(history: Sequence[dict[str, Any]], class_names: Sequence[str]) -> Any:
    """A matplotlib Figure (Agg canvas, no pyplot state): loss terms and validation Dice per epoch."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 4), layout="constrained")
    FigureCanvasAgg(figure)
    left, right = figure.subplots(1, 2)
    epochs = [r["epoch"] for r in history]
    for key in history[-1]["train"] if history else ():
        if key.endswith("_ratio"):  # a diagnostic (pdcr_grad_ratio), not a loss term
            continue
        left.plot(epochs, [r["train"].get(key, math.nan) for r in history], marker=".", label=key)
    left.set_xlabel("epoch")
    left.set_title("training loss terms")
    left.legend(fontsize="small")
    val = [(r["epoch"], r["val"]) for r in history if r["val"] is not None]
    if val:
        xs = [e for e, _ in val]
        right.plot(xs, [v["mean_dice"] for _, v in val], marker="o", color="black", label="mean")
        for name in class_names:
            right.plot(xs, [v["dice"].get(name, math.nan) for _, v in val], marker=".", label=name)
        right.legend(fontsize="small")
    right.set_ylim(0, 1)
    right.set_xlabel("epoch")
    right.set_title("validation Dice")
    return figure

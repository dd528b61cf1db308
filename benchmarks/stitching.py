"""Stitching speed: milliseconds per window that ``napari_medcl.tiling.Accumulator`` spends adding window
outputs, by number of threads, with the weighting done by the accumulator or beforehand (as ``predict`` does
it, in the thread that runs the model).

    .venv/bin/python benchmarks/stitching.py                      # the bundled 3D model's window on a CT grid
    .venv/bin/python benchmarks/stitching.py --threads 1 2 4 8 --windows 400

The grid, window, classes and maps default to what the bundled 3D model meets on a 512x512x300 CT at 0.8 x
0.8 x 1.5 mm (its 1 mm grid, 24x80x80 windows, 4 classes, 7 UAFR maps). Only the first ``--windows`` windows
(in z order) are added; the rows they finish are reduced as in a prediction. Random outputs, no model.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from napari_medcl.tiling import Accumulator, gaussian_importance, window_boxes


def time_adds(grid, window, classes, maps, threads, windows, weighted) -> float:
    """Milliseconds per window of ``Accumulator.add`` (and the reductions it triggers)."""
    rng = np.random.default_rng(0)
    probs = rng.random((classes, *window), dtype=np.float32)
    probs /= probs.sum(axis=0)
    extra = rng.random((maps, *window), dtype=np.float32)
    weight = gaussian_importance(window)
    if weighted:
        probs, extra = probs * weight, extra * weight
    boxes = window_boxes(grid, window, 0.5)[:windows]
    accumulator = Accumulator(grid, window, classes, maps, reduce=False, threads=threads)
    try:
        spent = 0.0
        for box in boxes:
            p, m = probs.copy(), extra.copy()  # the model's fresh outputs, not counted
            start = time.perf_counter()
            accumulator.add(box, p, m if maps else None, weighted=weighted)
            spent += time.perf_counter() - start
    finally:
        accumulator.close()
    return 1000.0 * spent / len(boxes)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--grid", type=int, nargs=3, default=(450, 410, 410))
    parser.add_argument("--window", type=int, nargs=3, default=(24, 80, 80))
    parser.add_argument("--classes", type=int, default=4)
    parser.add_argument("--maps", type=int, default=7)
    parser.add_argument("--threads", type=int, nargs="+", default=(1, 2, 4))
    parser.add_argument("--windows", type=int, default=600, help="windows added per setting")
    args = parser.parse_args(argv)
    grid, window = tuple(args.grid), tuple(args.window)
    print(f"grid {grid}, window {window}, {args.classes} classes + {args.maps} maps, "
          f"{args.windows} windows per setting, {os.cpu_count()} CPUs")  # fmt: skip
    print(f"{'threads':>7} {'weighting':>12} {'ms/window':>10}")
    for threads in args.threads:
        for weighted in (False, True):
            ms = time_adds(grid, window, args.classes, args.maps, threads, args.windows, weighted)
            print(f"{threads:>7} {'beforehand' if weighted else 'in add':>12} {ms:>10.2f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Engine (a) against two threshold rules that set their threshold without the truth, under the oracle clicker.

    PYTHONPATH=$PWD .venv/bin/python scripts/click_rules.py [--blocks 1 2] [--held-out] [--clicks 10]

Cases: training blocks of mni152-tissue, each perturbed as the accuracy benchmark perturbs (bias field,
contrast, noise) with its own seed (2000 + block), so the bundled 3D model errs on them as on a new scanner;
``--held-out`` adds the held-out block's perturbed copy (benchmarks/interactive.py's case). Each click is the
oracle's (``benchmarks/interactive.deepest_error``), a voxel labelled ``v`` whose true class is ``c``; the
rules relabel ``c``, within ``radius`` mm of it, the voxels labelled ``v`` that are:

- ``click intensity``: at least as ``c``-like as the clicked voxel in smoothed intensity (1 mm Gaussian; the
  direction from the two labels' medians nearby), connected to the click;
- ``midpoint``: nearer the median intensity of ``c`` than of ``v`` among the labels within the radius.

Prints mean Dice gained after 1, 5 and N clicks per case and rule (docs/benchmarks.md, "What one click can
fix, at best"). Not a product option: a record of what was tried.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))


def threshold_rule(rule: str, image, labels, spacing, at, c: int, radius: float) -> np.ndarray:
    """The box's new labels under ``rule`` for a positive click of ``c`` at ``at`` (box coordinates)."""
    from scipy import ndimage

    v = int(labels[at])
    smooth = ndimage.gaussian_filter(image[0], [1.0 / s for s in spacing])
    grid = np.indices(labels.shape, dtype=np.float32)
    near = sum(((g - a) * s) ** 2 for g, a, s in zip(grid, at, spacing)) <= radius**2
    typical_v = np.median(smooth[near & (labels == v)])
    typical_c = np.median(smooth[near & (labels == c)]) if (near & (labels == c)).any() else smooth[at]
    if rule == "click intensity":
        towards = 1.0 if typical_c >= typical_v else -1.0
        chosen = near & (labels == v) & (towards * smooth >= towards * smooth[at])
        chosen[at] = True
        components, _ = ndimage.label(chosen)
        chosen = components == components[at]
    else:
        chosen = near & (labels == v) & (np.abs(smooth - typical_c) < np.abs(smooth - typical_v))
        chosen[at] = True
    out = labels.copy()
    out[chosen] = c
    return out


def run(name: str, image, truth, model, rule: str, radius: float, clicks: int) -> list[float]:
    from interactive import deepest_error, mean_dice

    from napari_medcl.interactive import open_session
    from napari_medcl.prompts import point

    session = open_session(image, model)
    session.predict()
    truth = truth if truth.ndim == 3 else truth[None]
    k = session._probabilities.shape[0]
    dice = [mean_dice(session._labels, truth, k)]
    whole = session._whole_image()
    for _ in range(clicks):
        at = deepest_error(session._labels, truth)
        c = int(truth[at])
        if rule == "engine (a)":
            session.add_prompt(point(*at, label=c))
        else:
            reach = [int(np.ceil(radius / s)) + 1 for s in session.spacing]
            box = tuple(slice(max(0, a - r), a + r + 1) for a, r in zip(at, reach))
            local = tuple(a - b.start for a, b in zip(at, box))
            session._labels[box] = threshold_rule(
                rule, whole[(slice(None), *box)], session._labels[box], session.spacing, local, c, radius
            )
        dice.append(mean_dice(session._labels, truth, k))
    marks = [m for m in (1, 5, clicks) if m <= clicks]
    what = rule if rule == "engine (a)" else f"{rule} within {radius:g} mm"
    print(f"{name}: {what}: " + ", ".join(f"{dice[m] - dice[0]:+.4f} @{m}" for m in marks), flush=True)
    return dice


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "mni152-tissue")
    parser.add_argument("--blocks", type=int, nargs="+", default=[1, 2], help="training blocks (default 1 2)")
    parser.add_argument("--held-out", action="store_true", help="also the held-out block4, perturbed")
    parser.add_argument("--clicks", type=int, default=10)
    args = parser.parse_args(argv)

    from interactive import training_block_cases
    from uncertainty import tissue_cases

    from napari_medcl.onnx_session import load_model

    model = load_model("brain-tissue-3d", device="cpu", backend="onnxruntime")
    cases = training_block_cases(args.data, args.blocks)
    if args.held_out:
        cases.append(tissue_cases(args.data, 0)[1])  # the held-out block's perturbed copy (seed 1000)
    for name, image, truth in cases:
        run(name, image, truth, model, "engine (a)", 0.0, args.clicks)
        for radius in (8.0, 16.0):
            run(name, image, truth, model, "click intensity", radius, args.clicks)
        for radius in (8.0, 16.0, 32.0):
            run(name, image, truth, model, "midpoint", radius, args.clicks)
    return 0


if __name__ == "__main__":
    sys.exit(main())

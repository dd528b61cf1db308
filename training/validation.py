"""Validation during training: sliding-window labels of whole cases and their mean Dice per class.

The windows are tiled and stitched with the product's own tiling (``napari_medcl.tiling``), so validation
Dice is what ``medcl-predict`` would score with the exported network's plain argmax.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from training.runtime import DistInfo, all_reduce

__all__ = ["predict_case", "validate"]


def validate(
    model: nn.Module,
    cases: Sequence[Any],
    *,
    class_names: Sequence[str],
    spatial_dims: int,
    patch_size: Sequence[int],
    overlap: float,
    batch_size: int,
    max_cases: int | None,
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager],
    dist: DistInfo,
) -> dict[str, Any]:
    """Mean Dice per foreground class over the first ``max_cases`` of ``cases`` (all when None), each
    process predicting its share; ``{"dice": {class: v}, "mean_dice": v, "cases": n}``.

    A case has ``image`` (C, *S) and ``label`` (*S) arrays (training.data's PreparedCase).
    """
    from training.metrics import evaluate_case

    cases = list(cases)
    if max_cases is not None:
        cases = cases[:max_cases]
    names = list(class_names)
    k = len(names) - 1
    totals = torch.zeros(k + 1, dtype=torch.float64)  # per-class Dice sums, then the case count
    for case in cases[dist.rank :: dist.world_size]:
        labels = predict_case(
            model,
            np.asarray(case.image, dtype=np.float32),
            spatial_dims=spatial_dims,
            patch_size=patch_size,
            divisor=model.divisor,
            num_classes=len(names),
            overlap=overlap,
            batch_size=batch_size,
            device=device,
            autocast=autocast,
        )
        scores = evaluate_case(labels, np.asarray(case.label), names, compute_hd95=False)
        totals[:k] += torch.tensor([scores.dice[n] for n in names[1:]], dtype=torch.float64)
        totals[k] += 1
    if dist.world_size > 1:
        reduce_device = device if device.type == "cuda" else torch.device("cpu")
        totals = all_reduce(totals.to(reduce_device), dist).cpu()
    count = max(1.0, float(totals[k]))
    dice = {n: float(totals[i]) / count for i, n in enumerate(names[1:])}
    return {"dice": dice, "mean_dice": float(np.mean(list(dice.values()))), "cases": int(totals[k])}


@torch.no_grad()
def predict_case(
    model: nn.Module,
    image: np.ndarray,
    *,
    spatial_dims: int,
    patch_size: Sequence[int],
    divisor: Sequence[int],
    num_classes: int,
    overlap: float = 0.5,
    batch_size: int = 2,
    device: torch.device | str = "cpu",
    autocast: Callable[[], contextlib.AbstractContextManager] | None = None,
) -> np.ndarray:
    """Sliding-window labels of one whole case with the product's tiling (napari_medcl.tiling).

    image (C, *S) float32, S = (H, W) or (D, H, W) (a 2D model runs slice by slice over a volume)
    -> labels (*S) uint8/uint16. Windows are Gaussian-weighted and stitched exactly as ``medcl-predict``
    stitches ONNX outputs.
    """
    from napari_medcl import tiling

    was_training = model.training
    model.eval()
    try:
        spatial = tuple(image.shape[1:])
        grid = spatial if len(spatial) == 3 else (1, *spatial)
        patch = tuple(tiling.window_shape(tuple(patch_size), tuple(divisor)))
        window = patch if spatial_dims == 3 else (1, *patch)
        if len(spatial) == 2 and spatial_dims == 3:
            raise ValueError(f"a 3D model cannot run on a 2D image of shape {image.shape}")
        volume = image.reshape(image.shape[0], *grid)
        pads = tiling.padding(grid, window)
        padded = np.pad(volume, ((0, 0), *pads)) if any(sum(p) for p in pads) else volume
        crop = tuple(slice(before, before + size) for (before, _), size in zip(pads, grid))
        shape = tuple(padded.shape[1:])
        acc = tiling.Accumulator(shape, window, num_classes, 0, crop=crop)
        boxes = tiling.window_boxes(shape, window, overlap)
        ctx = autocast or contextlib.nullcontext
        for start in range(0, len(boxes), batch_size):
            chunk = boxes[start : start + batch_size]
            batch = np.stack([padded[(slice(None), *box)] for box in chunk])  # (n, C, *window)
            x = torch.from_numpy(batch).to(device)
            if spatial_dims == 2:
                x = x[:, :, 0]  # (n, C, 1, h, w) -> (n, C, h, w)
            with ctx():
                logits = model(x).logits
            probs = logits.float().softmax(1)
            if spatial_dims == 2:
                probs = probs.unsqueeze(2)
            probs = probs.cpu().numpy()
            for box, p in zip(chunk, probs):
                acc.add(box, p)
        labels = acc.finish().labels
        return labels.reshape(spatial)
    finally:
        model.train(was_training)

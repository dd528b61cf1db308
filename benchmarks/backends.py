"""Inference backends and tilings side by side: time on the bundled sample, agreement and held-out Dice.

    .venv/bin/python benchmarks/backends.py [--model brain-tissue-3d] [--repeats 2]

Everything runs in one process, one configuration after the other, so the ratios are taken under the same
load. Two tables:

1. **Backends**: ONNX Runtime CPU fp32 (the reference), OpenVINO CPU fp32 and, where the CPU has bfloat16,
   OpenVINO bf16, at the default tiling. Per row: ``predict()`` end to end on the bundled 2 mm sample
   (``napari_medcl/data/mni152_t1_2mm.nii.gz``, resampled to the model's 1 mm; median of ``--repeats`` runs
   taken round-robin over the backends, each session loaded and warmed up by one window first), windows/s, the speed-up over ONNX Runtime, label agreement
   and the largest class-probability difference against ONNX Runtime fp32 on the sample, and on the held-out
   block (block4 of fold 0 of ``data/mni152-tissue``, see ``benchmarks/tissue_baseline.py``) label agreement
   with ONNX Runtime fp32 and the Dice per class and mean, through ``napari_medcl.predict``.
2. **Tilings**: overlap 0.5 / 0.25 / 0.125, with the training patch and with windows twice the patch
   in-plane, on the fastest backend at each precision: time on the sample, windows, held-out Dice and label
   agreement with the default tiling of the same backend.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from napari_medcl import predict, read_image
from napari_medcl.demo import sample_path
from napari_medcl.onnx_session import available_precisions, load_model, physical_cores
from napari_medcl.openvino_session import openvino_installed

CLASSES = ("CSF", "GM", "WM")


@dataclasses.dataclass(frozen=True, eq=False)
class Windowed:
    """A session whose spec has another patch size, so ``predict`` tiles with larger windows."""

    inner: Any
    spec: Any

    @property
    def provider(self) -> str:
        return self.inner.provider

    @property
    def path(self) -> Path | None:
        return self.inner.path

    @property
    def sha256(self) -> str | None:
        return self.inner.sha256

    def run(self, batch: np.ndarray, **options: Any) -> tuple[np.ndarray, ...]:
        return self.inner.run(batch, **options)


def held_out_block(root: str) -> tuple[Any, np.ndarray]:
    """The held-out block of fold 0 (the split training and ``tissue_baseline.py`` use) and its labels."""
    from training.data.layouts import discover
    from training.data.preprocessing import split_cases

    layout = discover("msd", root)
    _, val = split_cases(list(layout.cases), fold=0, num_folds=5, val_fraction=None, split_seed=12345)
    (case,) = val
    return read_image(case.images[0]), read_image(case.label).array


def dice_scores(labels: np.ndarray, truth: np.ndarray) -> list[float]:
    scores = []
    for k in range(1, len(CLASSES) + 1):
        a, b = labels == k, truth == k
        total = int(a.sum()) + int(b.sum())
        scores.append(1.0 if total == 0 else 2.0 * int((a & b).sum()) / total)
    return scores


def timed(image: Any, session: Any, repeats: int, **options: Any) -> tuple[Any, float]:
    """The prediction and the median seconds of ``repeats`` runs."""
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        prediction = predict(image, session, return_probabilities=True, **options)
        seconds.append(time.perf_counter() - start)
    return prediction, statistics.median(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="brain-tissue-3d")
    parser.add_argument("--root", default="data/mni152-tissue", help="the mni152-tissue dataset")
    parser.add_argument(
        "--repeats", type=int, default=3, help="timed runs per backend, round-robin (default 3)"
    )
    parser.add_argument(
        "--tiling-repeats", type=int, default=1, help="timed runs per tiling (warm session; default 1)"
    )
    parser.add_argument("--overlaps", type=float, nargs="+", default=[0.5, 0.25, 0.125])
    parser.add_argument("--skip-tilings", action="store_true")
    args = parser.parse_args()

    image = read_image(sample_path())
    block, truth = held_out_block(args.root)
    print(
        f"# {platform.machine()}, {physical_cores()} cores, load average before: "
        + " ".join(f"{x:.2f}" for x in os.getloadavg())
    )
    rows = [("onnxruntime", "fp32")]
    if openvino_installed():
        rows += [("openvino", p) for p in available_precisions("openvino") if p != "auto"]

    print("\n| backend | sample s, median (runs) | windows/s | speed-up vs ORT | sample label agreement vs ORT fp32 | "
          "max prob diff | held-out agreement vs ORT fp32 | held-out Dice CSF / GM / WM | mean |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    sessions = {}
    for backend, precision in rows:
        session = load_model(args.model, device="cpu", backend=backend, precision=precision)
        session.run(np.zeros((1, session.spec.in_channels, *session.spec.patch_size), np.float32))  # warm-up
        sessions[(backend, precision)] = session
    # Round-robin: each repeat times every backend once, so a change in the machine's load hits them alike.
    seconds: dict[Any, list[float]] = {key: [] for key in sessions}
    predictions: dict[Any, Any] = {}
    for _ in range(args.repeats):
        for key, session in sessions.items():
            predictions[key], took = timed(image, session, 1, overlap=0.5)
            seconds[key].append(took)
    reference: dict[str, Any] = {}
    for key, session in sessions.items():
        prediction, took = predictions[key], statistics.median(seconds[key])
        held = predict(block, session, overlap=0.5)
        windows = prediction.provenance["tiling"]["windows"]
        labels, probs = prediction.labels.array, prediction.probabilities.array
        if not reference:
            reference = {"seconds": took, "labels": labels, "probs": probs, "block": held.labels.array}
        scores = dice_scores(held.labels.array, truth)
        print(
            f"| {session.provider} | {took:.2f} ({', '.join(f'{t:.1f}' for t in seconds[key])}) | "
            f"{windows / took:.2f} | {reference['seconds'] / took:.2f} | "
            f"{100 * np.mean(labels == reference['labels']):.3f}% | "
            f"{np.abs(probs - reference['probs']).max():.1e} | "
            f"{100 * np.mean(held.labels.array == reference['block']):.3f}% | "
            + " / ".join(f"{s:.4f}" for s in scores)
            + f" | {np.mean(scores):.4f} |",
            flush=True,
        )

    if args.skip_tilings:
        return
    print("\n| backend | window | overlap | windows | sample s | held-out Dice CSF / GM / WM | mean | "
          "held-out agreement vs default tiling |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    fastest = [key for key in sessions if key[0] == rows[-1][0]]
    for key in fastest:
        session = sessions[key]
        patch = tuple(session.spec.patch_size)
        wide = (*patch[:-2], *(2 * n for n in patch[-2:])) if session.spec.spatial_dims == 3 else patch
        default_block = None
        for window in dict.fromkeys([patch, wide]):
            windowed = (
                session
                if window == patch
                else Windowed(session, dataclasses.replace(session.spec, patch_size=window))
            )
            for overlap in args.overlaps:
                prediction, seconds = timed(image, windowed, args.tiling_repeats, overlap=overlap)
                held = predict(block, windowed, overlap=overlap).labels.array
                if default_block is None:
                    default_block = held
                scores = dice_scores(held, truth)
                print(
                    f"| {session.provider} | {'x'.join(map(str, window))} | {overlap:g} | "
                    f"{prediction.provenance['tiling']['windows']} | {seconds:.2f} | "
                    + " / ".join(f"{s:.4f}" for s in scores)
                    + f" | {np.mean(scores):.4f} | {100 * np.mean(held == default_block):.3f}% |",
                    flush=True,
                )


if __name__ == "__main__":
    main()

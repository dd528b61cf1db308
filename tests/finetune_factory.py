"""A corrections folder and a tiny model "fine-tuned here" earlier, for the tests of fine-tuning from the
widget (seconds of CPU): the folder's cases are added as the widget adds them (``add_correction``), and the
model is a finished 1-epoch run on them with the record a fine-tuned model keeps beside its .onnx."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np

from napari_medcl.corrections import add_correction
from napari_medcl.volume import Volume
from tests.dataset_factory import blob_labels

TINY = [
    "data.num_workers=0",
    "data.augmentation.enabled=false",
    "data.crop_nonzero=false",
    "data.target_spacing=null",
    "train.device=cpu",
    "train.iterations_per_epoch=1",
    "train.batch_size=1",
    "train.patch_size=[8,16,16]",
    "model.features=[8,16,32]",
]


def corrections_with_tiny_model(base: Path, n_cases: int = 3) -> tuple[Path, Path]:
    """(the corrections folder, the .onnx path whose record names the tiny run's checkpoint and config).
    The .onnx file itself is not written: callers that need one in the picker save any model there."""
    from training.cli import train_main

    folder = base / "corrections"
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    for i in range(n_cases):
        rng = np.random.default_rng(i)
        labels = blob_labels((8, 16, 16), 3, rng)
        image = (labels * 80.0 + rng.normal(20, 5, labels.shape)).astype(np.float32)
        model_labels = labels.copy()
        model_labels[labels == 2] = 1  # the "model" confused the classes; the user fixed it
        add_correction(
            folder, Volume(image, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3)), labels,
            model_labels=model_labels, case_id=f"case{i}", class_names=["background", "a", "b"],
            now=start + timedelta(minutes=i),
        )  # fmt: skip
    config = base / "tiny.yaml"
    config.write_text("{}\n")
    argv = [str(config)]
    sets = (
        *TINY,
        f"data.root={folder}",
        "data.val_fraction=0.34",
        "train.epochs=1",
        f"output.dir={base / 'r'}",
    )
    for item in sets:
        argv += ["--set", item]
    if train_main(argv) != 0:
        raise RuntimeError("the tiny run failed")
    models = base / "models"
    models.mkdir()
    record = {"checkpoint": str(base / "r" / "checkpoint_best.pt"), "config": str(base / "r" / "config.yaml")}
    (models / "tiny-ft1.finetune.json").write_text(json.dumps(record))
    return folder, models / "tiny-ft1.onnx"

"""Fine-tuning as the widget runs it: a real medcl-train subprocess, then medcl-export --verify, driven by
``napari_medcl.learning.FineTuneRun`` (tiny network and cases: seconds). Progress comes from the run's log;
the verified model appears in finetuned/ under its versioned name with its record; Cancel, during training or
during the export, ends the subprocess and leaves no model (and no record) behind."""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pytest

from napari_medcl import learning
from napari_medcl.corrections import add_correction
from napari_medcl.volume import Volume
from tests.dataset_factory import blob_labels
from training.cli import train_main

pytestmark = [pytest.mark.torch, pytest.mark.slow]

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


@pytest.fixture(scope="module")
def started(tmp_path_factory):
    """A corrections folder of 3 cases (added as the widget adds them) and a tiny model "fine-tuned here"
    earlier: its checkpoint, config and the record beside its .onnx."""
    base = tmp_path_factory.mktemp("ft")
    folder = base / "corrections"
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    for i in range(3):
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
    for item in (
        *TINY,
        f"data.root={folder}",
        "data.val_fraction=0.34",
        "train.epochs=1",
        f"output.dir={base / 'r'}",
    ):
        argv += ["--set", item]
    assert train_main(argv) == 0
    models = base / "models"
    models.mkdir()
    record = {"checkpoint": str(base / "r" / "checkpoint_best.pt"), "config": str(base / "r" / "config.yaml")}
    (models / "tiny-ft1.finetune.json").write_text(json.dumps(record))
    return folder, models / "tiny-ft1.onnx"


def plan(started, *overrides: str) -> learning.FineTunePlan:
    folder, model = started
    return learning.plan_fine_tune(str(model), folder, overrides=("data.num_workers=0", *overrides))


def test_a_finished_run_places_the_verified_model_under_a_versioned_name(started):
    p = plan(started, "train.epochs=3")
    assert p.name == "tiny-ft2" and p.val_cases == ("case2",)
    run = learning.FineTuneRun(p)
    run.start()
    fractions, epochs = [], set()
    while not run.finished:
        run.poll()
        progress = run.progress()
        fractions.append(progress.fraction)
        if progress.epochs == 3:
            epochs.add(progress.epoch)
        time.sleep(0.05)
    assert run.state == "done", run.message
    assert fractions == sorted(fractions) and fractions[-1] == 1.0 and epochs >= {3}
    assert p.output.is_file() and not (p.run_dir / "tiny-ft2.onnx").exists()
    record = json.loads(p.sidecar.read_text())
    assert record["fine_tuned_from"] == str(started[1]) and record["held_out"] == ["case2"]
    assert Path(record["checkpoint"]).is_file() and record["replay"] is None
    from napari_medcl.onnx_session import load_model

    assert load_model(p.output, device="cpu").spec.name == "tiny-ft2"
    assert run.message.startswith(
        "tiny-ft2 is in the model picker. Held-out corrected case(s) case2: mean Dice "
    )
    assert "(replay off)" in run.message
    log = run.console_log.read_text()
    assert "epoch 3/3" in log and "-m export.cli" in log
    # the new model can itself be fine-tuned, and the next version is ft3
    again = learning.plan_fine_tune(str(p.output), started[0])
    assert again.name == "tiny-ft3" and again.init_from == record["checkpoint"]


@pytest.mark.parametrize("when", ["training", "exporting"])
def test_cancel_ends_the_subprocess_and_leaves_no_model(started, when):
    p = plan(started, "train.epochs=40")
    models_before = sorted(p.output.parent.glob("*"))
    run = learning.FineTuneRun(p)
    run.start()
    deadline = time.monotonic() + 240
    if when == "training":
        ready = lambda: run.progress().epoch >= 1  # noqa: E731
    else:
        p = plan(started, "train.epochs=1")
        run.cancel()
        run = learning.FineTuneRun(p)
        run.start()
        ready = lambda: run.state == "exporting"  # noqa: E731
    while not ready() and time.monotonic() < deadline:
        run.poll()
        time.sleep(0.02)
    assert ready(), run.message
    process = run._process
    run.cancel()
    assert run.state == "cancelled" and run.message == "Fine-tuning cancelled; no model was added."
    assert process.poll() is not None
    assert not p.output.exists() and not p.sidecar.exists()
    assert sorted(p.output.parent.glob("*")) == models_before
    assert run.poll() == "cancelled"

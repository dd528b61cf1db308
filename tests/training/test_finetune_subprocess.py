"""Fine-tuning as the widget runs it: a real medcl-train subprocess, then medcl-export --verify, driven by
``napari_medcl.learning.FineTuneRun`` (tiny network and cases: seconds). Progress comes from the run's log;
the verified model appears in finetuned/ under its versioned name with its record; Cancel, during training or
during the export, ends the subprocess and leaves no model (and no record) behind."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from napari_medcl import learning
from tests.finetune_factory import corrections_with_tiny_model

pytestmark = [pytest.mark.torch, pytest.mark.slow]


@pytest.fixture(scope="module")
def started(tmp_path_factory):
    return corrections_with_tiny_model(tmp_path_factory.mktemp("ft"))


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


def test_a_carried_consensus_is_measured_on_the_held_out_cases_before_the_model_is_placed(started, tmp_path):
    """The start carries the intensity consensus: the new model keeps it, and the run measures it on the
    corrected case it held out (the new model never trained on it) before the model appears."""
    import torch

    from napari_medcl.error_model import ErrorModel
    from napari_medcl.onnx_session import load_model

    folder, model = started
    record = json.loads(model.with_name(model.stem + learning.SIDECAR).read_text())
    state = torch.load(record["checkpoint"], map_location="cpu", weights_only=True)
    consensus = ErrorModel.consensus(
        {"auroc": 0.9, "ece": 0.05}, intensity_weight=0.5, verdict_weights={"out-of-distribution": 0.0}
    )
    state["spec"] = {**state["spec"], "name": "base", "error_model": consensus.to_dict()}
    torch.save(state, tmp_path / "start.pt")
    source = tmp_path / "base.onnx"
    sidecar = {**record, "checkpoint": str(tmp_path / "start.pt")}
    source.with_name("base" + learning.SIDECAR).write_text(json.dumps(sidecar))
    p = learning.plan_fine_tune(str(source), folder, overrides=("data.num_workers=0", "train.epochs=1"))
    assert p.name == "base-ft1" and p.val_cases == ("case2",)
    run = learning.FineTuneRun(p)
    run.start()
    states, lines = set(), set()
    while not run.finished:
        states.add(run.poll())
        lines.add(run.progress().line)
        time.sleep(0.05)
    assert run.state == "done", run.message
    assert "measuring" in states
    assert "measuring the error map on the held-out corrected case(s)..." in lines
    measured = load_model(p.output, device="cpu").spec.error_map_model
    figures = measured.figures
    # carried through training and kept by the measurement
    assert measured.intensity_weight == 0.5 and measured.verdict_weights == {"out-of-distribution": 0.0}
    assert isinstance(figures["auroc"], float) and isinstance(figures["ece"], float)
    assert [c["case"] for c in figures["per_case"]] == ["base-ft1.onnx: corrections/case2"]
    assert figures["start_model"] == {"name": "base", "auroc": 0.9, "ece": 0.05}
    assert f"Error map on the held-out case(s): AUROC {figures['auroc']:.3f}" in run.message
    assert "-m export.calibrate" in run.console_log.read_text()


def test_a_failed_measurement_keeps_the_model_and_says_why(started, monkeypatch):
    """Training and export succeeded: a measurement that fails costs the map's figures, never the model."""
    import sys

    failing = [sys.executable, "-c", "import sys; print('medcl-calibrate: error: boom'); sys.exit(1)"]
    monkeypatch.setattr(learning, "measure_command", lambda *args, **kwargs: failing)
    p = plan(started, "train.epochs=1")
    run = learning.FineTuneRun(p)
    run.start()
    assert run.wait(timeout_s=240) == "done", run.message
    assert p.output.is_file() and p.sidecar.is_file()
    assert run.message.endswith(
        f"The error map could not be measured on the held-out case(s): medcl-calibrate: error: boom "
        f"(log: {run.console_log})"
    )

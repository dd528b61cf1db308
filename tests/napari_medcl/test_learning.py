"""The learning panel's logic without Qt or torch: the remembered corrections folder, Add to training set's
line, versioned names, which corrected cases are held out, the medcl-train command line a fine-tuning runs,
progress read from a run's log, the result line from its summary, and the ranking list's lines."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from napari_medcl import learning
from napari_medcl.corrections import CorrectionError, add_correction
from napari_medcl.volume import Volume


def volume(seed: int) -> tuple[Volume, np.ndarray]:
    rng = np.random.default_rng(seed)
    labels = np.zeros((6, 10, 12), np.uint8)
    labels[1:5, 2:8, 2:6], labels[1:5, 2:8, 6:10] = 1, 2
    image = (labels * 100 + rng.normal(0, 5, labels.shape)).astype(np.float32)
    return Volume(image, (2.0, 1.0, 1.0), (0.0, 0.0, 0.0), np.eye(3)), labels


def corrections_folder(root: Path, n: int) -> Path:
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    for i in range(n):
        image, labels = volume(i)
        # added in reverse name order: "latest added" must not mean "last by name"
        add_correction(
            root, image, labels, model_labels=labels, case_id=f"case{n - i}",
            class_names=["background", "a", "b"], now=start + timedelta(minutes=i),
        )  # fmt: skip
    return root


def test_the_corrections_folder_is_remembered_in_the_user_config_folder(tmp_path):
    assert learning.load_corrections_folder() is None  # conftest gives every test its own config folder
    written = learning.remember_corrections_folder(tmp_path / "corr")
    assert written == learning.settings_path() and written.parent.name == "napari-medcl"
    assert learning.load_corrections_folder() == tmp_path / "corr"
    written.write_text("{not json")
    assert learning.load_corrections_folder() is None


def test_add_to_training_set_says_what_was_written_and_how_many_voxels_changed(tmp_path):
    image, labels = volume(0)
    model = labels.copy()
    labels[2, 3, 3:6] = 0  # the user's correction: 3 voxels
    provenance = {
        "model": {"name": "brain-tissue-3d", "sha256": "ab" * 32, "classes": ["background", "a", "b"]}
    }
    image = Volume(image.array, image.spacing, image.origin, image.direction, source=tmp_path / "scan.nii.gz")
    added, line = learning.add_to_training_set(
        tmp_path / "c", image, labels, model_labels=model, provenance=provenance
    )
    assert (
        line
        == f"Added scan in {tmp_path / 'c'} (1 corrected case(s)): 3 voxel(s) changed (0.006 mL) from the model's labels."
    )
    assert added.record["model"]["name"] == "brain-tissue-3d"
    _, again = learning.add_to_training_set(
        tmp_path / "c", image, labels, model_labels=model, provenance=provenance
    )
    assert again.startswith("Replaced scan in") and "(1 corrected case(s))" in again
    with pytest.raises(CorrectionError, match="run the model on the image"):
        learning.add_to_training_set(tmp_path / "c", image, labels, model_labels=None, provenance=None)


def test_versioned_names_count_up_from_the_base_model():
    assert learning.versioned_name("brain-tissue-3d", []) == "brain-tissue-3d-ft1"
    assert learning.versioned_name(
        "brain-tissue-3d", ["brain-tissue-3d-ft1", "brain-tissue-3d-ft3", "x-ft9"]
    ) == ("brain-tissue-3d-ft4")
    assert learning.versioned_name("brain-tissue-3d-ft2", ["brain-tissue-3d-ft2"]) == "brain-tissue-3d-ft3"


def test_three_or_more_cases_hold_the_latest_out_fewer_say_so():
    assert learning.held_out_cases(["a", "b"]) == (
        (),
        "Only 2 corrected case(s): too few to hold any out, so there is no before/after Dice on corrected "
        "cases (add 3 or more).",
    )
    assert learning.held_out_cases(["a", "b", "c"])[0] == ("c",)
    assert learning.held_out_cases([str(i) for i in range(10)])[0] == ("8", "9")


def test_a_bundled_model_fine_tunes_with_its_preset_into_a_versioned_run(tmp_path):
    folder = corrections_folder(tmp_path / "c", 3)
    (folder / "finetuned").mkdir()
    (folder / "finetuned" / "brain-tissue-3d-ft1.onnx").write_bytes(b"")
    plan = learning.plan_fine_tune("brain-tissue-3d", folder)
    assert plan.name == "brain-tissue-3d-ft2" and plan.val_cases == ("case1",)  # case1 was added last
    assert plan.output == folder.resolve() / "finetuned" / "brain-tissue-3d-ft2.onnx"
    command = learning.train_command(plan, python="py")
    assert command[:6] == ["py", "-m", "training.cli", str(plan.config), "--init-from", "brain-tissue-3d"]
    assert plan.config.name == "finetune-brain-tissue-3d.yaml" and plan.config.is_file()
    sets = [command[i + 1] for i, a in enumerate(command) if a == "--set"]
    assert sets == [
        f"data.root={folder.resolve()}",
        f"output.dir={plan.run_dir}",
        'data.val_cases=["case1"]',
        "name=brain-tissue-3d-ft2",
    ]  # init.replay stays the recipe's: auto, for a bundled model
    export = learning.export_command(plan, plan.run_dir / "checkpoint_best.pt", python="py")
    assert export[1:3] == ["-m", "export.cli"] and "--verify" in export
    assert export[export.index("-o") + 1] == str(
        plan.run_dir / "brain-tissue-3d-ft2.onnx"
    )  # not yet the picker's


def test_what_cannot_be_fine_tuned_is_one_line(tmp_path):
    with pytest.raises(learning.FineTuneError, match="holds no corrected case yet"):
        learning.plan_fine_tune("brain-tissue-3d", tmp_path / "empty")
    folder = corrections_folder(tmp_path / "c", 1)
    with pytest.raises(learning.FineTuneError, match="its training weights are unknown"):
        learning.plan_fine_tune(str(tmp_path / "someone-elses.onnx"), folder)


def test_progress_comes_from_the_epoch_lines_of_the_log(tmp_path):
    assert learning.read_progress(tmp_path).line == "starting..."
    log = tmp_path / "train.log"
    log.write_text(
        "world size 1\n2026-12-03 17:00:00 before fine-tuning: held-out cases (1): mean Dice 0.8000\n"
    )
    assert learning.read_progress(tmp_path) == learning.Progress(
        0, None, "before fine-tuning: held-out cases (1): mean Dice 0.8000"
    )
    with log.open("a") as f:
        f.write("2026-12-03 17:01:00 epoch 2/6: loss 0.5000 (ce 0.2, dice 0.3); lr 0.0002; 50.0 s\n")
        f.write("2026-12-03 17:02:00 epoch 3/6: loss 0.4")  # being written
    progress = learning.read_progress(tmp_path)
    assert (progress.epoch, progress.epochs, progress.fraction) == (2, 6, pytest.approx(1 / 3))


def test_the_result_line_gives_dice_before_and_after(tmp_path):
    plan = SimpleNamespace(
        name="m-ft1", run_dir=tmp_path, val_cases=("c3",), note="NOTE", output=tmp_path / "m-ft1.onnx"
    )
    (tmp_path / "summary.json").write_text(
        json.dumps(
            {
                "held_out": {"cases": ["c3"], "before": 0.8, "after": 0.86},
                "original": {"cases": ["b4"], "before": 0.9, "after": 0.895},
            }
        )
    )
    assert learning.fine_tune_result(plan) == (
        "m-ft1 is in the model picker. Held-out corrected case(s) c3: mean Dice 0.800 -> 0.860 (+0.060). "
        "Original validation case(s) (1): mean Dice 0.900 -> 0.895 (-0.005)."
    )
    (tmp_path / "summary.json").write_text(json.dumps({"held_out": None, "original": None}))
    assert learning.fine_tune_result(plan) == (
        "m-ft1 is in the model picker. NOTE No original validation cases to check what the model may have "
        "lost (replay off)."
    )


def test_ranking_entries_keep_the_ranking_order_with_the_reason():
    ranks = [
        SimpleNamespace(rank=1, case="b", reason="out-of-distribution: x"),
        SimpleNamespace(rank=2, case="a", reason="ok"),
    ]
    assert learning.ranking_entries(ranks) == ["1. b: out-of-distribution: x", "2. a: ok"]

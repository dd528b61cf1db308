"""The corrections dataset (napari_medcl.corrections): the files and record of a corrected case, one entry
per case in an atomically rewritten dataset.json, a second add of a case replacing it, and user mistakes as
one-line errors with nothing written."""

from __future__ import annotations

import errno
import json
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pytest

from napari_medcl.corrections import CorrectionError, add_correction, read_record
from napari_medcl.errors import OutputError
from napari_medcl.io import read_image
from napari_medcl.volume import Volume

CLASSES = [
    {"index": 0, "name": "background", "color": "#000000"},
    {"index": 1, "name": "CSF", "color": "#ff0000"},
    {"index": 2, "name": "GM", "color": "#00ff00"},
]
MODEL = {"model": {"name": "brain-tissue-3d", "sha256": "ab" * 32, "classes": CLASSES}, "version": "0.1.0"}
WHEN = datetime(2026, 12, 3, 12, 0, tzinfo=timezone.utc)


def scan(seed: int, shape=(6, 10, 12), spacing=(2.0, 1.0, 1.5)) -> Volume:
    rng = np.random.default_rng(seed)
    origin, direction = (10.0, -5.0, 3.0), np.eye(3)
    return Volume(rng.normal(100, 20, shape).astype(np.float32), spacing, origin, direction)


def model_and_corrected(image: Volume) -> tuple[np.ndarray, np.ndarray]:
    model = np.zeros(image.spatial_shape, dtype=np.uint8)
    model[1:5, 2:8, 3:9] = 1
    model[2:4, 4:6, 4:7] = 2
    corrected = model.copy()
    corrected[3, 7:9, 2:5] = 2  # the user paints GM on 6 voxels (2 of them CSF, 4 background)...
    corrected[1, 2, 3] = 0  # ...and erases one CSF voxel
    return model, corrected


def listing(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())


def test_a_corrected_case_is_written_in_the_training_layout_with_its_record(tmp_path):
    image = scan(0)
    model, corrected = model_and_corrected(image)
    added = add_correction(
        tmp_path / "fixes", image, corrected, model=MODEL, model_labels=model, case_id="case 01", now=WHEN
    )
    root = tmp_path / "fixes"
    assert added.case_id == "case_01" and not added.replaced
    assert listing(root) == [
        ".corrections.lock",
        "corrections/case_01.json",
        "corrections/case_01_changed.nii.gz",
        "dataset.json",
        "imagesTr/case_01_0000.nii.gz",
        "labelsTr/case_01.nii.gz",
    ]
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["labels"] == {"background": 0, "CSF": 1, "GM": 2}
    assert meta["channel_names"] == {"0": "image"} and meta["file_ending"] == ".nii.gz"
    assert meta["numTraining"] == 1
    assert meta["training"] == [{"image": "./imagesTr/case_01.nii.gz", "label": "./labelsTr/case_01.nii.gz"}]
    written_image = read_image(root / "imagesTr" / "case_01_0000.nii.gz")
    written_label = read_image(root / "labelsTr" / "case_01.nii.gz")
    assert written_image.same_geometry(image) and written_label.same_geometry(image)
    np.testing.assert_array_equal(written_image.array, image.array)
    np.testing.assert_array_equal(written_label.array, corrected)

    record = read_record(root, "case_01")
    assert record == added.record
    assert record["model"]["name"] == "brain-tissue-3d" and record["model"]["sha256"] == "ab" * 32
    assert record["added_at"] == "2026-12-03T12:00:00+00:00" and record["replaces"] is None
    changed = record["changed"]
    assert changed["voxels"] == 7
    assert changed["volume_ml"] == pytest.approx(7 * 2.0 * 1.0 * 1.5 / 1000)
    assert changed["bounding_box"] == [[1, 4], [2, 9], [2, 5]]
    assert changed["by_class"] == {
        "background": {"gained": 1, "lost": 4},
        "CSF": {"gained": 0, "lost": 3},
        "GM": {"gained": 6, "lost": 0},
    }
    mask = read_image(root / "corrections" / "case_01_changed.nii.gz")
    assert mask.same_geometry(image)
    np.testing.assert_array_equal(mask.array.astype(bool), corrected != model)


def test_a_second_add_of_a_case_replaces_it_and_says_so(tmp_path):
    root = tmp_path / "fixes"
    first, second = scan(0), scan(1)
    model, corrected = model_and_corrected(first)
    add_correction(root, first, corrected, model=MODEL, model_labels=model, case_id="a", now=WHEN)
    add_correction(root, second, model, model=MODEL, changed=np.zeros(model.shape, bool), case_id="b")
    again = corrected.copy()
    again[0, 0, 0] = 1
    later = datetime(2026, 12, 4, tzinfo=timezone.utc)
    replaced = add_correction(root, first, again, model=MODEL, model_labels=model, case_id="a", now=later)

    assert replaced.replaced
    meta = json.loads((root / "dataset.json").read_text())
    assert meta["numTraining"] == 2
    assert [entry["label"] for entry in meta["training"]] == ["./labelsTr/a.nii.gz", "./labelsTr/b.nii.gz"]
    np.testing.assert_array_equal(read_image(root / "labelsTr" / "a.nii.gz").array, again)
    record = read_record(root, "a")
    assert record["changed"]["voxels"] == 8
    assert record["replaces"] == {
        "added_at": "2026-12-03T12:00:00+00:00",
        "model": MODEL["model"] | {"tool_version": "0.1.0"},
        "changed_voxels": 7,
        "times_replaced_before": 0,
    }
    assert read_record(root, "b")["changed"]["bounding_box"] is None
    assert not [p for p in listing(root) if Path(p).name.startswith(".") and "lock" not in p]


def test_a_failed_write_leaves_the_dataset_as_it_was(tmp_path, monkeypatch):
    """dataset.json is replaced whole or not at all, and a case whose files could not all be written is
    neither listed nor half-replaced."""
    import napari_medcl.atomic as atomic

    root = tmp_path / "fixes"
    image = scan(0)
    model, corrected = model_and_corrected(image)
    add_correction(root, image, corrected, model=MODEL, model_labels=model, case_id="a", now=WHEN)
    before = {p: (root / p).read_bytes() for p in listing(root)}

    real_fsync = atomic._fsync_file

    def full_disk_on(name_part: str):
        def fsync(path: Path) -> None:
            if name_part in str(path):
                raise OSError(errno.ENOSPC, "No space left on device")
            real_fsync(path)

        return fsync

    # the disk fills while dataset.json is written (after the case's own files are in place)
    monkeypatch.setattr(atomic, "_fsync_file", full_disk_on("/.dataset."))
    with pytest.raises(OutputError, match="disk full"):
        add_correction(root, scan(1), model, model=MODEL, changed=np.zeros(model.shape, bool), case_id="b")
    assert (root / "dataset.json").read_bytes() == before["dataset.json"]
    assert json.loads((root / "dataset.json").read_text())["numTraining"] == 1

    # the disk fills while the replacement labels of case a are staged: case a is left exactly as it was
    monkeypatch.setattr(atomic, "_fsync_file", full_disk_on("labelsTr"))
    with pytest.raises(OutputError):
        add_correction(root, image, model, model=MODEL, model_labels=model, case_id="a")
    for path, data in before.items():
        assert (root / path).read_bytes() == data, path
    assert not [p for p in listing(root) if Path(p).name.startswith(".") and "lock" not in p]


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"labels": "other grid"}, "not on the image's grid"),
        ({"model_labels": None}, "say what the user changed"),
        ({"class_names": ["background", "tumour"]}, "differ from the corrections dataset's"),
        ({"labels": "class 3"}, "the labels hold class 3, but there are only 3 classes"),
        ({"labels": "float"}, "must hold integer class ids"),
    ],
)
def test_mistakes_are_one_line_and_write_nothing(tmp_path, kwargs, message):
    root = tmp_path / "fixes"
    image = scan(0)
    model, corrected = model_and_corrected(image)
    add_correction(root, image, corrected, model=MODEL, model_labels=model, case_id="a", now=WHEN)
    before = {p: (root / p).read_bytes() for p in listing(root)}
    labels = {
        "other grid": Volume(corrected, (1.0, 1.0, 1.0), image.origin, image.direction),
        "class 3": np.where(corrected == 2, 3, corrected),
        "float": corrected.astype(np.float32),
    }.get(kwargs.pop("labels", None), corrected)
    arguments = {"model": MODEL, "model_labels": model, "case_id": "b"} | kwargs
    with pytest.raises(CorrectionError, match=message) as caught:
        add_correction(root, scan(1), labels, **arguments)
    assert "\n" not in str(caught.value)
    assert {p: (root / p).read_bytes() for p in listing(root)} == before


def test_a_prediction_s_provenance_and_labels_are_the_record(tmp_path):
    """The usual call after a run: the model's labels and provenance straight from the Prediction."""
    from napari_medcl.prediction import predict
    from tests.onnx_models import pointwise_model, save

    model_path = save(pointwise_model(k=10.0, maps=()), tmp_path / "model.onnx")
    image = Volume(
        np.linspace(0, 1, 6 * 8 * 8, dtype=np.float32).reshape(6, 8, 8), (1.0,) * 3, (0.0,) * 3, np.eye(3)
    )
    prediction = predict(image, str(model_path), device="cpu", backend="onnxruntime")
    corrected = prediction.labels.array.copy()
    corrected[0, :2, :3] = 1
    added = add_correction(
        tmp_path / "fixes",
        image,
        corrected,
        model=prediction.provenance,
        model_labels=prediction.labels,
        case_id="p",
    )
    record = added.record
    assert (
        record["model"]["name"] == "test-model"
        and record["model"]["sha256"] == prediction.provenance.model.sha256
    )
    assert record["classes"] == ["background", "class1"] and record["changed"]["voxels"] == 6
    assert json.loads((tmp_path / "fixes" / "dataset.json").read_text())["labels"] == {
        "background": 0,
        "class1": 1,
    }

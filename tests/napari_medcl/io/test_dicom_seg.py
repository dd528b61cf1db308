"""DICOM Segmentation output: labels on a DICOM series written as a SEG with highdicom and read back."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from napari_medcl.errors import InputError, OutputError, UsageError
from napari_medcl.io import read_image
from napari_medcl.io.dicom_seg import Segment, read_dicom_seg, write_dicom_seg
from napari_medcl.spec import ClassInfo

STUDY = "1.2.826.0.1.3680043.2.1125.30.1"
CLASSES = (
    ClassInfo(0, "background", "#000000"),
    ClassInfo(1, "liver", "#ff0000"),
    ClassInfo(2, "tumour", "#00ff00"),
    ClassInfo(3, "vessel", "#0000ff"),
)


def _oblique() -> tuple[np.ndarray, np.ndarray]:
    """Row and column direction cosines of a plane tilted about two axes (right-handed with their normal)."""
    a, b = np.radians(20.0), np.radians(-35.0)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array([[1, 0, 0], [0, np.cos(b), -np.sin(b)], [0, np.sin(b), np.cos(b)]])
    rotation = rz @ rx
    return rotation[:, 0], rotation[:, 1]


def write_series(
    folder: Path,
    shape=(5, 6, 7),
    *,
    uid: str = "1.2.826.0.1.3680043.2.1125.30.2",
    row=(1.0, 0.0, 0.0),
    column=(0.0, 1.0, 0.0),
    spacing=(2.5, 0.8, 0.6),  # between slices, between rows, between columns (mm)
    origin=(-30.0, 12.5, 40.0),
    step_sign: float = 1.0,
    modality: str = "CT",
    frame_of_reference: bool = True,
) -> list[Dataset]:
    """A series of single-frame int16 images written with pydicom, one file per slice.

    Slice k lies at ``origin + step_sign * k * spacing[0] * (row x column)``; files are named in reverse of
    that order, so nothing can rely on file names. Returns the datasets in the order of k."""
    folder.mkdir(parents=True, exist_ok=True)
    row, column = np.asarray(row, float), np.asarray(column, float)
    normal = np.cross(row, column)
    datasets = []
    for k in range(shape[0]):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        meta.MediaStorageSOPInstanceUID = f"{uid}.{k + 1}"
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID
        ds.Modality, ds.PatientName, ds.PatientID = modality, "Seg^Test", "P1"
        ds.PatientBirthDate, ds.PatientSex = "19700101", "O"
        ds.StudyInstanceUID, ds.SeriesInstanceUID = STUDY, uid
        if frame_of_reference:
            ds.FrameOfReferenceUID = f"{STUDY}.9"
        ds.StudyDate, ds.StudyTime, ds.StudyID, ds.AccessionNumber = "20240101", "120000", "1", "A1"
        ds.ReferringPhysicianName, ds.SeriesNumber, ds.InstanceNumber = "", 3, k + 1
        position = np.asarray(origin) + step_sign * k * spacing[0] * normal
        ds.ImagePositionPatient = [f"{p:.6f}" for p in position]
        ds.ImageOrientationPatient = [f"{c:.6f}" for c in (*row, *column)]
        ds.PixelSpacing = [f"{spacing[1]:g}", f"{spacing[2]:g}"]  # row spacing (y), column spacing (x)
        ds.SliceThickness = f"{spacing[0]:g}"
        ds.Rows, ds.Columns, ds.SamplesPerPixel, ds.PhotometricInterpretation = *shape[1:], 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = (np.arange(shape[1] * shape[2], dtype=np.int16) + 100 * k).tobytes()
        ds.save_as(folder / f"img{shape[0] - k:03d}.dcm", enforce_file_format=True)
        datasets.append(ds)
    return datasets


def some_labels(shape, seed=0) -> np.ndarray:
    """Labels 0..3 with every class present on some plane and one plane without any label."""
    labels = np.random.default_rng(seed).integers(0, 4, size=shape).astype(np.uint8)
    labels[1] = 0
    return labels


def seg_of(folder: Path, labels: np.ndarray, out: Path, **kwargs) -> Path:
    volume = read_image(folder)
    return write_dicom_seg(
        volume.with_array(labels),
        folder,
        kwargs.pop("classes", CLASSES),
        out,
        algorithm_name="test-model",
        algorithm_version="abc123",
        **kwargs,
    )


def check_round_trip(folder: Path, sources: list[Dataset], labels: np.ndarray, out: Path) -> None:
    volume = read_image(folder)
    path = seg_of(folder, labels, out)
    seg = read_dicom_seg(path, folder)
    assert seg.segment_names == ["liver", "tumour", "vessel"]
    assert seg.series_uid == sources[0].SeriesInstanceUID
    assert sorted(seg.instance_uids) == sorted(ds.SOPInstanceUID for ds in sources)
    assert seg.labels.same_geometry(volume, atol=1e-4)
    for number in (1, 2, 3):
        np.testing.assert_array_equal(seg.labels.array == number, labels == number)

    # Frame by frame: each frame sits where its source slice sits, and shares its orientation and spacing.
    dataset = pydicom.dcmread(path)
    assert dataset.Modality == "SEG" and dataset.SegmentationType == "BINARY"
    by_uid = {ds.SOPInstanceUID: ds for ds in sources}
    plane_of = {ds.SOPInstanceUID: k for k, ds in enumerate(sources)}
    shared = dataset.SharedFunctionalGroupsSequence[0]
    frames = dataset.pixel_array.reshape(-1, *labels.shape[1:])
    for frame, group in zip(frames, dataset.PerFrameFunctionalGroupsSequence):
        uid = group.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        number = group.SegmentIdentificationSequence[0].ReferencedSegmentNumber
        np.testing.assert_allclose(
            [float(v) for v in group.PlanePositionSequence[0].ImagePositionPatient],
            [float(v) for v in by_uid[uid].ImagePositionPatient],
            atol=1e-5,
        )
        np.testing.assert_array_equal(frame, labels[plane_of[uid]] == number)
    np.testing.assert_allclose(
        [float(v) for v in shared.PlaneOrientationSequence[0].ImageOrientationPatient],
        [float(v) for v in sources[0].ImageOrientationPatient],
        atol=1e-6,
    )
    np.testing.assert_allclose(
        [float(v) for v in shared.PixelMeasuresSequence[0].PixelSpacing],
        [float(v) for v in sources[0].PixelSpacing],
    )
    assert dataset.StudyInstanceUID == STUDY and dataset.FrameOfReferenceUID == sources[0].FrameOfReferenceUID
    assert dataset.PatientID == "P1"
    assert dataset.SegmentSequence[0].SegmentAlgorithmType == "AUTOMATIC"
    algorithm = dataset.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert (algorithm.AlgorithmName, algorithm.AlgorithmVersion) == ("test-model", "abc123")
    # The frames omitted (no label on them) are exactly the empty ones: every labelled plane is there.
    assert len(frames) == sum(int((labels[k] == n).any()) for k in range(len(labels)) for n in (1, 2, 3))


def test_axial_series_round_trip(tmp_path):
    folder = tmp_path / "ct"
    sources = write_series(folder)
    check_round_trip(folder, sources, some_labels((5, 6, 7)), tmp_path / "seg.dcm")


def test_oblique_series_round_trip(tmp_path):
    folder = tmp_path / "oblique"
    row, column = _oblique()
    sources = write_series(folder, (4, 5, 9), row=row, column=column, spacing=(3.0, 0.7, 1.1))
    assert not np.allclose(read_image(folder).direction, np.eye(3), atol=0.1)
    check_round_trip(folder, sources, some_labels((4, 5, 9), seed=1), tmp_path / "seg.dcm")


def test_slices_stacked_against_the_normal_round_trip(tmp_path):
    """Slice k+1 lies *below* slice k along row x column: the labels' plane order is not the file order."""
    folder = tmp_path / "reversed"
    sources = write_series(folder, step_sign=-1.0)
    labels = some_labels((5, 6, 7), seed=2)
    # read_image sorts the slices along the normal: plane 0 of the volume is the last slice written.
    sources_in_plane_order = sources[::-1]
    check_round_trip(folder, sources_in_plane_order, labels, tmp_path / "seg.dcm")


def test_read_without_the_source_covers_the_frames(tmp_path):
    folder = tmp_path / "ct"
    write_series(folder)
    labels = np.zeros((5, 6, 7), np.uint8)
    labels[1, 2, 3] = 2
    labels[3, 0:2, 4:6] = 1
    seg = read_dicom_seg(seg_of(folder, labels, tmp_path / "seg.dcm"))
    volume = read_image(folder)
    expected = volume.crop((slice(1, 4), slice(0, 6), slice(0, 7)))
    assert seg.labels.same_geometry(expected, atol=1e-4)
    np.testing.assert_array_equal(seg.labels.array, labels[1:4])


def test_the_series_is_picked_by_its_grid_or_uid(tmp_path):
    folder = tmp_path / "study"
    sources = write_series(folder, (5, 6, 7))
    # Same folder, two series of the same size: the grid tells them apart ...
    other = tmp_path / "other"
    write_series(other, (5, 6, 7), uid="1.2.826.0.1.3680043.2.1125.30.3", origin=(0, 0, 0))
    for file in other.iterdir():
        file.rename(folder / f"b_{file.name}")
    labels = some_labels((5, 6, 7))
    volume = read_image(folder, series=sources[0].SeriesInstanceUID)
    assert volume.metadata["series_uid"] == sources[0].SeriesInstanceUID
    path = write_dicom_seg(
        volume.with_array(labels, metadata={}),
        folder,
        CLASSES,
        tmp_path / "a.dcm",
        algorithm_name="m",
        algorithm_version="1",
    )
    assert read_dicom_seg(path).series_uid == sources[0].SeriesInstanceUID
    # ... and an explicit series UID whose grid is another one is refused.
    with pytest.raises(UsageError, match=r"do not lie on the grid of DICOM series .*30\.3"):
        write_dicom_seg(
            volume.with_array(labels),
            folder,
            CLASSES,
            tmp_path / "b.dcm",
            series_uid="1.2.826.0.1.3680043.2.1125.30.3",
            algorithm_name="m",
            algorithm_version="1",
        )
    assert not (tmp_path / "b.dcm").exists()

    # A third series on the first one's grid (another echo, say): the grid alone cannot choose.
    twin = tmp_path / "twin"
    write_series(twin, (5, 6, 7), uid="1.2.826.0.1.3680043.2.1125.30.4")
    for file in twin.iterdir():
        file.rename(folder / f"c_{file.name}")
    with pytest.raises(UsageError, match=r"lie on the grid of 2 DICOM series .*--series UID") as caught:
        write_dicom_seg(
            volume.with_array(labels, metadata={}),
            folder,
            CLASSES,
            tmp_path / "c.dcm",
            algorithm_name="m",
            algorithm_version="1",
        )
    _one_line(caught.value, folder)
    path = write_dicom_seg(
        volume.with_array(labels),
        folder,
        CLASSES,
        tmp_path / "c.dcm",
        algorithm_name="m",
        algorithm_version="1",
    )
    assert read_dicom_seg(path).series_uid == sources[0].SeriesInstanceUID


def test_segment_colours_and_plain_segments(tmp_path):
    folder = tmp_path / "ct"
    write_series(folder)
    labels = some_labels((5, 6, 7))
    classes = [Segment(0, "background"), Segment(1, "a", "#ff0000"), Segment(2, "b"), Segment(3, "c", None)]
    dataset = pydicom.dcmread(seg_of(folder, labels, tmp_path / "seg.dcm", classes=classes))
    red = dataset.SegmentSequence[0].RecommendedDisplayCIELabValue
    assert red[0] > 0 and red[1] > 32768  # red: positive a*, encoded above the midpoint
    assert "RecommendedDisplayCIELabValue" not in dataset.SegmentSequence[1]
    assert [s.SegmentLabel for s in dataset.SegmentSequence] == ["a", "b", "c"]


def test_an_existing_file_is_replaced_whole(tmp_path):
    folder = tmp_path / "ct"
    write_series(folder)
    out = tmp_path / "seg.dcm"
    out.write_bytes(b"old")
    with pytest.raises(UsageError):
        seg_of(folder, np.full((5, 6, 7), 9, np.uint8), out)
    assert out.read_bytes() == b"old"
    seg_of(folder, some_labels((5, 6, 7)), out)
    assert pydicom.dcmread(out).Modality == "SEG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct", "seg.dcm"]


# --------------------------------------------------------------------------------------------------------------
# user mistakes: one line naming the file and the problem, nothing written


def _one_line(error: Exception, *names: object) -> None:
    message = str(error)
    assert "\n" not in message and len(message) < 600, message
    for name in names:
        assert str(name) in message, message


def test_path_must_end_in_dcm(tmp_path):
    folder = tmp_path / "ct"
    write_series(folder)
    with pytest.raises(OutputError, match=r"must end in \.dcm") as caught:
        seg_of(folder, some_labels((5, 6, 7)), tmp_path / "seg.nii.gz")
    _one_line(caught.value, tmp_path / "seg.nii.gz")
    assert not (tmp_path / "seg.nii.gz").exists()


def test_missing_or_non_dicom_source_folder(tmp_path):
    folder = tmp_path / "ct"
    write_series(folder)
    volume = read_image(folder).with_array(some_labels((5, 6, 7)))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("not DICOM")
    for source, problem in ((tmp_path / "gone", "does not exist"), (empty, "no DICOM image series")):
        with pytest.raises(InputError, match=problem) as caught:
            write_dicom_seg(
                volume, source, CLASSES, tmp_path / "s.dcm", algorithm_name="m", algorithm_version="1"
            )
        _one_line(caught.value, source)
    assert not (tmp_path / "s.dcm").exists()


def volume_like(volume, array, **changes):
    from dataclasses import replace

    return replace(volume, array=array, **changes)


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ("fewer planes", "5 slices, the labels have 4 planes"),
        ("other size", "has 6 x 7 pixels, the labels 6 x 8"),
        ("shifted", "is on no plane of the labels"),
        ("other spacing", "has pixel spacing 0.8 x 0.6 mm"),
        ("other direction", "has another orientation"),
        ("2d", "need a 3D labels array"),
        ("unknown value", "label values 7 are not among the classes"),
    ],
)
def test_labels_off_the_series_grid_are_refused(tmp_path, change, problem):
    folder = tmp_path / "ct"
    write_series(folder)
    volume = read_image(folder)
    labels = some_labels((5, 6, 7))
    if change == "fewer planes":
        volume = volume.crop((slice(0, 4), slice(0, 6), slice(0, 7)))
        labels = labels[:4]
    elif change == "other size":
        volume = volume_like(volume, np.zeros((5, 6, 8), np.uint8))
        labels = volume.array
    elif change == "shifted":
        volume = volume.crop((slice(1, 5), slice(0, 6), slice(0, 7)))
        volume = volume_like(volume, np.zeros((5, 6, 7), np.uint8))
        labels = volume.array
    elif change == "other spacing":
        volume = volume_like(volume, labels, spacing=(2.5, 0.8, 0.7))
    elif change == "other direction":
        volume = volume_like(volume, labels, direction=np.eye(3)[:, [0, 2, 1]] * [1, 1, -1])
    elif change == "2d":
        labels = labels[0]
        volume = volume_like(volume, labels, spacing=(0.8, 0.6), origin=(0, 0), direction=np.eye(2))
    elif change == "unknown value":
        labels = labels.copy()
        labels[2, 2, 2] = 7
    with pytest.raises(UsageError, match=problem) as caught:
        write_dicom_seg(
            volume.with_array(labels),
            folder,
            CLASSES,
            tmp_path / "s.dcm",
            algorithm_name="m",
            algorithm_version="1",
        )
    _one_line(caught.value, folder)
    assert not (tmp_path / "s.dcm").exists()


def test_reading_a_file_that_is_not_a_seg(tmp_path):
    folder = tmp_path / "ct"
    write_series(folder)
    with pytest.raises(InputError, match="not a readable DICOM Segmentation") as caught:
        read_dicom_seg(folder / "img001.dcm")
    _one_line(caught.value, folder / "img001.dcm")


# --------------------------------------------------------------------------------------------------------------
# the napari writer (LayerDataTuples, no Qt)


def labels_layer(volume, labels, *, features=True, colormap=None):
    """A Labels LayerDataTuple as ``segment_layer`` makes it: the scan's geometry, class names in features."""
    from napari_medcl.layer_data import PREDICTION_KEY, spatial_kwargs

    kwargs = spatial_kwargs(volume)
    kwargs["metadata"][PREDICTION_KEY] = {"model": {"name": "tissue-model", "sha256": "f" * 64}}
    kwargs["name"] = "ct labels"
    if features:
        kwargs["features"] = {"index": [c.index for c in CLASSES], "name": [c.name for c in CLASSES]}
    if colormap is not None:
        kwargs["colormap"] = colormap
    return (labels, kwargs, "labels")


def test_writer_saves_labels_of_a_dicom_series_as_seg(tmp_path):
    from napari_medcl._writer import DICOM_SEG_FILTER, can_save_dicom_seg, write_layer_data
    from napari_medcl.layer_data import label_colormap
    from napari_medcl.spec import ModelSpec

    folder = tmp_path / "ct"
    sources = write_series(folder)
    volume = read_image(folder)
    labels = some_labels((5, 6, 7))
    spec = ModelSpec(
        name="m", spatial_dims=3, in_channels=1, classes=CLASSES, patch_size=(4, 4, 4), divisor=(1, 1, 1)
    )
    layer = labels_layer(volume, labels, colormap=label_colormap(spec))
    assert can_save_dicom_seg(layer) and DICOM_SEG_FILTER.endswith("(*.dcm)")
    path = write_layer_data(layer, tmp_path / "ct_seg.dcm")
    seg = read_dicom_seg(path, folder)
    assert seg.segment_names == ["liver", "tumour", "vessel"]
    assert sorted(seg.instance_uids) == sorted(ds.SOPInstanceUID for ds in sources)
    np.testing.assert_array_equal(seg.labels.array, labels)
    assert seg.labels.same_geometry(volume, atol=1e-4)
    dataset = pydicom.dcmread(path)
    algorithm = dataset.SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    assert algorithm.AlgorithmName == "tissue-model" and algorithm.AlgorithmVersion == "f" * 64
    lab = [list(s.RecommendedDisplayCIELabValue) for s in dataset.SegmentSequence]
    assert len({tuple(v) for v in lab}) == 3  # red, green and blue differ


def test_writer_without_class_names_names_segments_by_value(tmp_path):
    from napari_medcl._writer import write_layer_data

    folder = tmp_path / "ct"
    write_series(folder)
    volume = read_image(folder)
    labels = np.zeros((5, 6, 7), np.uint8)
    labels[0, 0, 0], labels[2, 1, 1] = 2, 5  # a painted value no class has
    path = write_layer_data(labels_layer(volume, labels, features=False), tmp_path / "s.dcm")
    seg = read_dicom_seg(path, folder)
    assert seg.segment_names == ["label 2", "label 5"]
    np.testing.assert_array_equal(seg.labels.array, np.select([labels == 2, labels == 5], [1, 2], 0))


def test_writer_refuses_dcm_for_a_scan_not_from_dicom(tmp_path):
    from napari_medcl._writer import can_save_dicom_seg, write_layer_data
    from napari_medcl.io import write_image

    folder = tmp_path / "ct"
    write_series(folder)
    nifti = read_image(write_image(read_image(folder), tmp_path / "ct.nii.gz"))
    layer = labels_layer(nifti, some_labels((5, 6, 7)))
    assert not can_save_dicom_seg(layer)
    with pytest.raises(UsageError, match="only for scans opened from a DICOM series") as caught:
        write_layer_data(layer, tmp_path / "s.dcm")
    _one_line(caught.value, tmp_path / "s.dcm")
    assert not (tmp_path / "s.dcm").exists()
    # An image layer of a DICOM series is not labels.
    image = (read_image(folder).array, labels_layer(read_image(folder), None)[1], "image")
    assert not can_save_dicom_seg(image)
    with pytest.raises(UsageError, match="only a Labels layer"):
        write_layer_data(image, tmp_path / "s.dcm")


def test_writer_refuses_a_moved_layer(tmp_path):
    from napari_medcl._writer import write_layer_data

    folder = tmp_path / "ct"
    write_series(folder)
    data, kwargs, kind = labels_layer(read_image(folder), some_labels((5, 6, 7)))
    kwargs["translate"] = (0.0, 0.0, 0.0)
    with pytest.raises(UsageError, match="no longer lies on the grid"):
        write_layer_data((data, kwargs, kind), tmp_path / "s.dcm")


# --------------------------------------------------------------------------------------------------------------
# medcl-predict --dicom-seg


THRESHOLD = 250.5  # the series' pixels are 0..41 + 100 k


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    from tests.onnx_models import pointwise_model, save

    return save(
        pointwise_model(threshold=THRESHOLD, patch=(4, 4, 4)), tmp_path_factory.mktemp("m") / "pw.onnx"
    )


def test_cli_writes_a_seg_beside_the_case(tmp_path, model_file, capsys):
    import json

    from napari_medcl import cli

    folder = tmp_path / "ct"
    sources = write_series(folder)
    out = tmp_path / "out"
    argv = [str(folder), "-o", str(out), "--model", str(model_file), "--device", "cpu", "--dicom-seg"]
    assert cli.main(argv) == 0, capsys.readouterr().err
    sidecar = json.loads((out / "ct.json").read_text(encoding="utf-8"))
    assert sidecar["outputs"]["dicom_seg"] == "ct_seg.dcm"
    assert sorted(p.name for p in out.iterdir()) == sorted([*sidecar["outputs"].values(), "ct.json"])
    seg = read_dicom_seg(out / "ct_seg.dcm", folder)
    image = read_image(folder)
    assert seg.segment_names == ["class1"]
    np.testing.assert_array_equal(seg.labels.array, (image.array > THRESHOLD).astype(np.uint8))
    assert 0 < seg.labels.array.sum() < seg.labels.array.size
    assert seg.series_uid == sources[0].SeriesInstanceUID and len(seg.instance_uids) == len(sources)
    algorithm = (
        pydicom.dcmread(out / "ct_seg.dcm").SegmentSequence[0].SegmentationAlgorithmIdentificationSequence[0]
    )
    assert algorithm.AlgorithmName == "test-model" and algorithm.AlgorithmVersion.startswith("sha256:")


def test_cli_dicom_seg_refuses_a_non_dicom_input_before_anything_runs(tmp_path, capsys):
    from napari_medcl import cli
    from napari_medcl.io import write_image

    write_series(tmp_path / "ct")
    scan = write_image(read_image(tmp_path / "ct"), tmp_path / "scan.nii.gz")
    out = tmp_path / "out"
    # The model does not exist: the error must come before it is loaded.
    argv = [str(tmp_path / "ct"), str(scan), "-o", str(out), "--model", "missing.onnx", "--dicom-seg"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--dicom-seg" in err and f"{scan} is not one" in err, err
    assert not out.exists()


def test_cli_a_seg_that_cannot_be_made_leaves_nothing(tmp_path, model_file, capsys, monkeypatch):
    from napari_medcl import cli

    folder = tmp_path / "ct"
    write_series(folder, frame_of_reference=False)
    out = tmp_path / "out"
    argv = [str(folder), "-o", str(out), "--model", str(model_file), "--device", "cpu", "--dicom-seg"]
    assert cli.main(argv) == 1
    err = capsys.readouterr().err
    assert "has no FrameOfReferenceUID" in err and "Traceback" not in err, err
    assert list(out.iterdir()) == []

    # A SEG that fails while being saved: the case's other files, already staged, go too.
    folder = tmp_path / "ct2"
    write_series(folder)

    def full_disk(self, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pydicom.dataset.Dataset, "save_as", full_disk)
    assert cli.main([str(folder), *argv[1:]]) == 1
    err = capsys.readouterr().err
    assert "ct2_seg.dcm" in err and "No space left" in err and "Traceback" not in err, err
    assert list(out.iterdir()) == []

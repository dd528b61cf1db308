"""napari reader/writer/sample contributions and the manifest: pure, no Qt."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest

from napari_medcl._reader import get_reader
from napari_medcl._sample_data import SAMPLE_FILE, mni152_t1
from napari_medcl._writer import compact_labels, default_labels_path, write_image, write_labels
from napari_medcl.errors import InputError, OutputError
from napari_medcl.io import read_image
from napari_medcl.io import write_image as io_write_image
from napari_medcl.layer_data import GEOMETRY_KEY, ObliqueGeometryWarning, segment_layer
from napari_medcl.volume import Volume
from tests.onnx_models import pointwise_model, save

MANIFEST = Path(__file__).resolve().parents[3] / "napari_medcl" / "napari.yaml"


def oblique_scan(path: Path) -> Volume:
    c, s = np.cos(0.3), np.sin(0.3)
    volume = Volume(
        array=np.random.default_rng(0).random((5, 16, 18), dtype=np.float32),
        spacing=(2.5, 0.7, 0.6),
        origin=(-40.0, 12.5, 7.25),
        direction=np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]]),
    )
    io_write_image(volume, path)
    return volume


def read_layer(path: Path):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ObliqueGeometryWarning)
        return get_reader(str(path))(str(path))[0]


def dicom_folder() -> Path:
    pydicom = pytest.importorskip("pydicom")
    return Path(pydicom.__file__).parent / "data" / "test_files" / "dicomdirtests" / "98892001" / "CT5N"


def test_reader_declines_what_it_cannot_read(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "photo.png").write_bytes(b"\x89PNG\r\n\x1a\n")
    (tmp_path / "empty").mkdir()
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "a.txt").write_text("x")
    for path in ("notes.txt", "photo.png", "empty", "plain", "missing.nii.gz"):
        assert get_reader(str(tmp_path / path)) is None
    assert get_reader([str(tmp_path / "notes.txt"), str(tmp_path / "photo.png")]) is None
    assert get_reader(12345) is None  # discovery never raises, whatever it is handed


def test_claimed_but_broken_file_is_a_clear_error(tmp_path):
    broken = tmp_path / "broken.nii.gz"
    broken.write_bytes(b"this is not a NIfTI file at all" * 20)
    reader = get_reader(str(broken))
    assert reader is not None
    with pytest.raises(InputError, match="broken.nii.gz"):
        reader(str(broken))


def test_reader_opens_a_dicom_series_folder():
    folder = dicom_folder()
    reader = get_reader(str(folder))
    assert reader is not None
    ((data, kwargs, layer_type),) = reader(str(folder))
    assert data.shape == (5, 16, 16) and layer_type == "image" and kwargs["name"] == "CT5N"
    np.testing.assert_allclose(kwargs["scale"], (2.5, 0.488281, 0.488281), rtol=1e-5)
    assert kwargs["metadata"][GEOMETRY_KEY]["format"] == "dicom"


def test_reader_opens_several_files(tmp_path):
    for name in ("a.nrrd", "b.mha"):
        oblique_scan(tmp_path / name)
    paths = [str(tmp_path / "a.nrrd"), str(tmp_path / "b.mha")]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ObliqueGeometryWarning)
        layers = get_reader(paths)(paths)
    assert [kwargs["name"] for _, kwargs, _ in layers] == ["a", "b"]


@pytest.mark.parametrize("suffix", [".nii.gz", ".nrrd", ".mha"])
def test_labels_round_trip_keeps_the_source_geometry(tmp_path, suffix):
    source = tmp_path / "scan.nii.gz"
    oblique_scan(source)
    model = save(pointwise_model(spatial_dims=3, patch=(4, 8, 8)), tmp_path / "m.onnx")
    labels, kwargs, layer_type = segment_layer(read_layer(source), model)[0]
    out = tmp_path / f"labels{suffix}"
    assert write_labels(str(out), labels, kwargs) == [str(out)]
    back, original = read_image(out), read_image(source)
    assert back.same_geometry(original)
    assert back.array.dtype == np.uint8
    np.testing.assert_array_equal(back.array, labels)


def test_image_writer_and_layers_without_metadata(tmp_path):
    source = tmp_path / "scan.nrrd"
    written = oblique_scan(source)
    data, kwargs, _ = read_layer(source)
    out = tmp_path / "copy.mha"
    write_image(str(out), data, kwargs)
    assert read_image(out).same_geometry(written)
    # a labels layer made by hand: its own scale/translate and an identity direction
    bare = tmp_path / "bare.nii.gz"
    write_labels(
        str(bare), np.ones((3, 4, 5), np.int32), {"scale": (2.0, 1.0, 0.5), "translate": (1.0, 2.0, 3.0)}
    )
    back = read_image(bare)
    assert back.spacing == pytest.approx((2.0, 1.0, 0.5)) and back.origin == pytest.approx((1.0, 2.0, 3.0))
    assert np.allclose(back.direction, np.eye(3)) and back.array.dtype == np.uint8


def test_label_dtypes_and_errors(tmp_path):
    assert compact_labels(np.array([0, 300])).dtype == np.uint16
    assert compact_labels(np.array([0, 3], np.int64)).dtype == np.uint8
    with pytest.raises(OutputError, match="do not fit uint16"):
        compact_labels(np.array([-1, 2]))
    with pytest.raises(OutputError, match="integers"):
        compact_labels(np.array([0.5]))
    with pytest.raises(OutputError, match="unsupported extension"):
        write_labels(str(tmp_path / "labels.png"), np.zeros((2, 2, 2), np.uint8), {})


def test_default_labels_path(tmp_path):
    source = tmp_path / "case7.nii.gz"
    oblique_scan(source)
    _, kwargs, _ = read_layer(source)
    assert default_labels_path(kwargs["metadata"]) == tmp_path / "case7_labels.nii.gz"
    assert default_labels_path({}) is None


def test_sample_is_the_mni_brain_at_2_mm():
    ((data, kwargs, layer_type),) = mni152_t1()
    assert layer_type == "image" and data.ndim == 3 and data.dtype == np.uint8
    assert kwargs["scale"] == (2.0, 2.0, 2.0) and kwargs["units"] == ("mm", "mm", "mm")
    assert 60 < data.shape[0] < 100 and data.max() > 200 and (data > 0).mean() > 0.3  # a head, cropped
    assert SAMPLE_FILE.stat().st_size < 1.5e6
    notice = (SAMPLE_FILE.parent / "LICENSE").read_text(encoding="utf-8")
    assert "McGill University" in notice and "nilearn" in notice


def test_manifest_is_valid_and_every_command_imports():
    import importlib

    from npe2 import PluginManifest

    manifest = PluginManifest.from_file(MANIFEST)
    assert manifest.name == "napari-medcl" and manifest.display_name == "napari-medcl"
    for command in manifest.contributions.commands:
        module, _, attribute = command.python_name.partition(":")
        assert callable(getattr(importlib.import_module(module), attribute)), command.id
    (reader,) = manifest.contributions.readers
    assert reader.accepts_directories and "*.nii.gz" in reader.filename_patterns


def test_manifest_extensions_are_the_format_table_s():
    from npe2 import PluginManifest

    from napari_medcl.io.formats import SCAN_EXTENSIONS, SCAN_WRITE_EXTENSIONS

    manifest = PluginManifest.from_file(MANIFEST)
    (reader,) = manifest.contributions.readers
    assert reader.filename_patterns == [f"*{extension}" for extension in SCAN_EXTENSIONS]
    for writer in manifest.contributions.writers:
        if writer.command == "napari-medcl.write_dicom_seg":
            assert writer.filename_extensions == [".dcm"] and writer.layer_types == ["labels"]
            continue
        assert writer.filename_extensions == list(SCAN_WRITE_EXTENSIONS), writer.command

"""napari_medcl.transfer: volumes travel exactly, predictions within float16, and hostile archives are refused
before they are unpacked. Also the typed records read back from their JSON (Provenance, Verdict)."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest

from napari_medcl.errors import InputError
from napari_medcl.onnx_session import load_model
from napari_medcl.prediction import predict
from napari_medcl.provenance import Provenance
from napari_medcl.transfer import prediction_from_npz, prediction_to_npz, volume_from_npz, volume_to_npz
from napari_medcl.verdict import Verdict
from napari_medcl.volume import Volume
from tests.onnx_models import pointwise_model, save

OBLIQUE = np.array([[0.0, 0.6, 0.8], [0.0, 0.8, -0.6], [1.0, 0.0, 0.0]])


@pytest.mark.parametrize(
    ("array", "channel_axis"),
    [
        (np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6) - 60, False),
        (np.random.default_rng(0).random((3, 7, 9)).astype(np.float32), True),  # RGB-like 2D
        (np.asfortranarray(np.random.default_rng(1).random((5, 4, 3))), False),
    ],
)
def test_a_volume_travels_exactly_and_without_its_source(array, channel_axis):
    n = array.ndim - channel_axis
    direction = OBLIQUE if n == 3 else np.array([[0.0, 1.0], [1.0, 0.0]])
    volume = Volume(
        array,
        (2.5, 0.7, 0.9)[-n:],
        (-3.0, 4.0, 10.123456789)[-n:],
        direction,
        channel_axis=channel_axis,
        source="/secret/patient.nii.gz",
        format="nifti",
        metadata={"SeriesInstanceUID": "1.2.3"},
    )
    data = volume_to_npz(volume)
    assert b"secret" not in data and b"1.2.3" not in data
    back = volume_from_npz(data, max_bytes=None)
    assert back.array.dtype == array.dtype and back.channel_axis == channel_axis
    np.testing.assert_array_equal(back.array, array)
    assert back.spacing == volume.spacing and back.origin == volume.origin
    np.testing.assert_array_equal(back.direction, volume.direction)
    assert back.source is None and back.format is None and back.metadata == {}


def _npz(entries):
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, payload in entries.items():
            archive.writestr(name, payload)
    return buffer.getvalue()


def _npy_header(shape, dtype="<f4"):
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(out, {"descr": dtype, "fortran_order": False, "shape": shape})
    return out.getvalue()


def test_an_archive_declaring_a_huge_array_is_refused_before_allocation():
    # 16 bytes of header promising 4 TB of voxels.
    data = _npz({"voxels.npy": _npy_header((10_000, 10_000, 10_000))})
    with pytest.raises(InputError, match="more than the limit"):
        volume_from_npz(data, max_bytes=10**9)


def test_a_cut_short_array_is_refused():
    data = _npz({"voxels.npy": _npy_header((10, 10, 10)) + b"\0" * 100})
    with pytest.raises(InputError, match="cut short"):
        volume_from_npz(data, max_bytes=None)


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ({"voxels.npy": _npy_header((2,), "|O")}, "only numbers travel"),
        ({"../../etc/passwd": b"x"}, "unexpected entry"),
        ({"source.npy": _npy_header((1,))}, "unexpected entry"),
    ],
)
def test_objects_and_unknown_entries_are_refused(entries, message):
    with pytest.raises(InputError, match=message):
        volume_from_npz(_npz(entries), max_bytes=None)


def test_garbage_and_missing_geometry_are_refused():
    with pytest.raises(InputError, match="not a readable .npz"):
        volume_from_npz(b"not a zip", max_bytes=None)
    buffer = io.BytesIO()
    np.savez(buffer, voxels=np.zeros((2, 2, 2)))
    with pytest.raises(InputError, match="lacks spacing, origin, direction, channel_axis"):
        volume_from_npz(buffer.getvalue(), max_bytes=None)


def test_a_region_prediction_travels_cut_to_its_box_and_comes_back_on_the_whole_grid(tmp_path):
    model = load_model(save(pointwise_model(patch=(8, 8, 8)), tmp_path / "m.onnx"), device="cpu")
    x = np.random.default_rng(2).random((12, 14, 10)).astype(np.float32)
    volume = Volume(x, (1.0, 2.0, 3.0), (5.0, 6.0, 7.0), OBLIQUE)
    box = (slice(2, 9), slice(3, 11), slice(1, 8))
    local = predict(volume, model, region=box, return_probabilities=True)
    cut = prediction_to_npz(local, box)
    with zipfile.ZipFile(io.BytesIO(cut)) as archive:
        labels = np.load(archive.open("labels.npy"))
    assert labels.shape == (7, 8, 7)  # only the box travels
    back = prediction_from_npz(cut, volume, uncertainty_maps=model.spec.uncertainty_maps, box=box)
    np.testing.assert_array_equal(back.labels.array, local.labels.array)
    assert back.labels.same_geometry(volume, atol=0)
    for name in ("entropy", "top_class_error", "uafr_uncertainty", "probabilities"):
        got, want = getattr(back, name).array, getattr(local, name).array
        assert got.dtype == np.float32 and got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=2.5e-4, rtol=0, err_msg=name)
    assert np.abs(back.entropy.array - local.entropy.array).max() > 0  # float16 did round: a real transfer


def test_provenance_and_verdict_read_back_from_their_json(tmp_path):
    model = load_model(save(pointwise_model(patch=(8, 8, 8)), tmp_path / "m.onnx"), device="cpu")
    volume = Volume(
        np.random.default_rng(3).random((9, 9, 9)).astype(np.float32), (1.0,) * 3, (0.0,) * 3, np.eye(3)
    )
    provenance = predict(volume, model, region=("slice", 0, 4)).provenance
    data = provenance.to_dict()
    again = Provenance.from_dict(data)
    assert again.to_dict() == data and again.roi == provenance.roi and again.tiling == provenance.tiling
    verdict = Verdict("caution", ("slices far thicker",), 1.5, {"severity": {"spacing": 1.5}})
    assert Verdict.from_dict(verdict.to_dict()) == verdict

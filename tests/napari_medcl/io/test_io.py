"""Image I/O: exact voxels and geometry through every format, and one-line errors for every bad input.

All data is made here in tmp_path. Geometry is compared in array order (z, y, x) at 1e-5, except DICOM at 1e-4
because DICOM stores positions and spacings as decimal strings (we write them with 6 decimals).
"""

from __future__ import annotations

import gzip
import hashlib
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk

from napari_medcl.errors import InputError, OutputError
from napari_medcl.io import (
    SUPPORTED_EXTENSIONS,
    OutputFormatError,
    case_name,
    is_supported,
    output_extension,
    read_image,
    sha256_file,
    write_image,
)
from napari_medcl.volume import Volume

SPACING_XYZ = (0.7, 0.8, 3.1)  # anisotropic, as SimpleITK lists it
ORIGIN_XYZ = (12.5, -30.25, 7.0)


def oblique_direction(seed: int = 0, *, flip: bool = True) -> np.ndarray:
    """A random rotation, composed with a flip (determinant -1) when ``flip``, as a (3, 3) ITK direction."""
    rng = np.random.default_rng(seed)
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q = q * np.sign(np.diag(r))
    if (np.linalg.det(q) < 0) != flip:
        q[:, 0] *= -1
    return q


def oblique_volume(dtype=np.float32, shape=(4, 5, 6), *, flip: bool = True) -> Volume:
    """A (z, y, x) volume with anisotropic spacing and an oblique direction (array order)."""
    rng = np.random.default_rng(1)
    if np.dtype(dtype).kind == "f":
        array = rng.normal(size=shape).astype(dtype)
    else:
        array = rng.integers(0, np.iinfo(dtype).max, size=shape, endpoint=True).astype(dtype)
    return Volume(array, SPACING_XYZ[::-1], ORIGIN_XYZ[::-1], oblique_direction(flip=flip)[::-1, ::-1])


def assert_same_geometry(a: Volume, b: Volume, atol: float = 1e-5) -> None:
    assert a.spatial_shape == b.spatial_shape
    np.testing.assert_allclose(a.spacing, b.spacing, rtol=0, atol=atol)
    np.testing.assert_allclose(a.origin, b.origin, rtol=0, atol=atol)
    np.testing.assert_allclose(a.direction, b.direction, rtol=0, atol=atol)


def physical_point(volume: Volume, index) -> np.ndarray:
    """The Volume contract: origin + direction @ (spacing * index), all in array order."""
    return np.asarray(volume.origin) + volume.direction @ (np.asarray(volume.spacing) * np.asarray(index))


def assert_one_line_error(error: InputError, path: Path) -> None:
    message = str(error)
    assert "\n" not in message, message
    assert path.name in message, message
    assert len(message) < 400, message


# ---------------------------------------------------------------------------------------------------------
# Axis convention and geometry round trips


def test_axis_convention_matches_simpleitk(tmp_path):
    """Pins the reversal: a voxel at array index (k, j, i) is SimpleITK's (i, j, k), at the same point."""
    direction = oblique_direction(3)
    image = sitk.GetImageFromArray(np.arange(4 * 5 * 6, dtype=np.int16).reshape(4, 5, 6))
    image.SetSpacing(SPACING_XYZ)
    image.SetOrigin(ORIGIN_XYZ)
    image.SetDirection(direction.ravel().tolist())
    sitk.WriteImage(image, str(tmp_path / "ref.mha"))

    volume = read_image(tmp_path / "ref.mha")
    assert volume.array.shape == (4, 5, 6)
    assert volume.spacing == pytest.approx(SPACING_XYZ[::-1])
    assert volume.origin == pytest.approx(ORIGIN_XYZ[::-1])
    for k, j, i in [(0, 0, 0), (3, 1, 5), (2, 4, 0), (1, 3, 2)]:
        assert volume.array[k, j, i] == image[i, j, k]
        expected = np.asarray(image.TransformIndexToPhysicalPoint((i, j, k)))[::-1]
        np.testing.assert_allclose(physical_point(volume, (k, j, i)), expected, atol=1e-9)


@pytest.mark.parametrize(
    ("extension", "dtype"),
    [
        (".nii", np.float32),
        (".nii.gz", np.uint8),
        (".nrrd", np.int16),
        (".mha", np.float32),
        (".nii.gz", np.uint16),
    ],
)
def test_3d_round_trip_oblique_anisotropic(tmp_path, extension, dtype):
    volume = oblique_volume(dtype)
    first = write_image(volume, tmp_path / f"a{extension}")
    assert os.listdir(tmp_path) == [first.name]  # no temporary file left
    read = read_image(first)
    assert read.array.dtype == dtype and np.array_equal(read.array, volume.array)
    assert_same_geometry(read, volume)
    assert read.source == first and read.metadata["extension"] == extension
    assert read.format == {".nii": "nifti", ".nii.gz": "nifti", ".nrrd": "nrrd", ".mha": "mha"}[extension]

    # What SimpleITK sees in the written file is the volume's geometry reversed, once.
    image = sitk.ReadImage(str(first))
    np.testing.assert_allclose(image.GetSpacing(), SPACING_XYZ, atol=1e-5)
    np.testing.assert_allclose(image.GetOrigin(), ORIGIN_XYZ, atol=1e-5)
    np.testing.assert_allclose(np.reshape(image.GetDirection(), (3, 3)), oblique_direction(), atol=1e-5)
    np.testing.assert_allclose(
        physical_point(read, (3, 2, 1)),
        np.asarray(image.TransformIndexToPhysicalPoint((1, 2, 3)))[::-1],
        atol=1e-5,
    )

    again = read_image(write_image(read, tmp_path / f"b{extension}"))  # read -> write -> read
    assert np.array_equal(again.array, volume.array)
    assert_same_geometry(again, read)


def test_nii_gz_is_compressed_and_nii_is_not(tmp_path):
    volume = oblique_volume(np.uint8)
    with open(write_image(volume, tmp_path / "a.nii.gz"), "rb") as file:
        assert file.read(2) == b"\x1f\x8b"
    with open(write_image(volume, tmp_path / "a.nii"), "rb") as file:
        assert struct.unpack("<i", file.read(4))[0] == 348


def test_one_slice_volume_stays_3d(tmp_path):
    volume = oblique_volume(np.uint8, shape=(1, 5, 6))
    read = read_image(write_image(volume, tmp_path / "slab.nii.gz"))
    assert read.array.shape == (1, 5, 6)
    assert_same_geometry(read, volume)


def test_vector_image_gets_channels_first(tmp_path):
    array = np.random.default_rng(0).normal(size=(4, 5, 6, 3)).astype(np.float32)  # (z, y, x, C)
    sitk.WriteImage(sitk.GetImageFromArray(array, isVector=True), str(tmp_path / "vec.mha"))
    volume = read_image(tmp_path / "vec.mha")
    assert volume.channel_axis and volume.array.shape == (3, 4, 5, 6)
    assert np.array_equal(volume.array, np.moveaxis(array, -1, 0))
    again = read_image(write_image(volume, tmp_path / "vec2.nrrd"))
    assert again.channel_axis and np.array_equal(again.array, volume.array)


# ---------------------------------------------------------------------------------------------------------
# 2D formats


def picture(array: np.ndarray, spacing=(0.25, 0.5), channel_axis=False) -> Volume:
    return Volume(array, spacing, (0.0, 0.0), np.eye(2), channel_axis=channel_axis)


def test_rgb_png_keeps_three_channels(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 256, size=(5, 6, 3), dtype=np.uint8)  # (y, x, C)
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(tmp_path / "rgb.png"))
    volume = read_image(tmp_path / "rgb.png")
    assert volume.format == "png" and volume.channel_axis
    assert volume.array.shape == (3, 5, 6) and np.array_equal(volume.array, np.moveaxis(rgb, -1, 0))
    again = read_image(write_image(volume, tmp_path / "rgb2.png"))
    assert again.channel_axis and np.array_equal(again.array, volume.array)
    assert_same_geometry(again, volume)


@pytest.mark.parametrize(
    ("extension", "dtype"), [(".png", np.uint8), (".png", np.uint16), (".tif", np.float32)]
)
def test_2d_round_trip(tmp_path, extension, dtype):
    rng = np.random.default_rng(0)
    array = (
        rng.normal(size=(5, 7)).astype(dtype)
        if dtype == np.float32
        else rng.integers(0, 60000, (5, 7)).astype(dtype)
    )
    volume = picture(array)
    read = read_image(write_image(volume, tmp_path / f"p{extension}"))
    assert read.array.dtype == dtype and np.array_equal(read.array, array)
    assert_same_geometry(read, volume)
    again = read_image(write_image(read, tmp_path / f"q{extension}"))
    assert np.array_equal(again.array, array)
    assert_same_geometry(again, read)


def test_depth_one_volume_is_written_to_png_as_2d(tmp_path):
    labels = np.arange(30, dtype=np.uint8).reshape(1, 5, 6)
    volume = Volume(labels, (2.0, 0.25, 0.5), (0.0, 0.0, 0.0), np.eye(3))
    read = read_image(write_image(volume, tmp_path / "slice.png"))
    assert read.array.shape == (5, 6) and np.array_equal(read.array, labels[0])
    assert read.spacing == pytest.approx((0.25, 0.5))


def test_jpeg_reads_as_2d_rgb(tmp_path):
    rgb = np.full((8, 9, 3), 120, dtype=np.uint8)
    sitk.WriteImage(sitk.GetImageFromArray(rgb, isVector=True), str(tmp_path / "photo.jpg"))
    volume = read_image(tmp_path / "photo.jpg")
    assert volume.format == "jpeg" and volume.channel_axis and volume.array.shape == (3, 8, 9)
    assert np.abs(volume.array.astype(int) - 120).max() <= 2  # JPEG is lossy


def test_tiff_pages(tmp_path):
    stack = np.random.default_rng(0).normal(size=(3, 5, 6)).astype(np.float32)
    sitk.WriteImage(sitk.GetImageFromArray(stack), str(tmp_path / "stack.tif"))
    sitk.WriteImage(sitk.GetImageFromArray(stack[0]), str(tmp_path / "page.tif"))
    multi, single = read_image(tmp_path / "stack.tif"), read_image(tmp_path / "page.tif")
    assert multi.format == single.format == "tiff"
    assert multi.array.shape == (3, 5, 6) and np.array_equal(multi.array, stack)
    assert single.array.shape == (5, 6) and np.array_equal(single.array, stack[0])


@pytest.mark.parametrize(
    ("array", "name", "hint"),
    [
        (np.zeros((5, 6), np.float32), "map.png", ".tif"),
        (np.zeros((3, 5, 6), np.uint8), "vol.png", ".nii.gz"),
        (np.zeros((5, 6), np.uint16), "deep.jpg", ".tif"),
    ],
)
def test_picture_formats_refuse_what_they_cannot_hold(tmp_path, array, name, hint):
    volume = Volume(array, (1.0,) * array.ndim, (0.0,) * array.ndim, np.eye(array.ndim))
    with pytest.raises(ValueError, match=rf"{name}: .*write {hint} instead") as caught:
        write_image(volume, tmp_path / name)
    assert isinstance(caught.value, OutputError)
    assert os.listdir(tmp_path) == []


def test_format_that_cannot_store_the_geometry_is_refused_and_old_file_kept(tmp_path):
    target = tmp_path / "labels.png"
    target.write_bytes(b"previous")
    volume = Volume(np.ones((5, 6), np.uint8), (0.5, 0.5), (10.0, -4.0), np.eye(2))  # PNG has no origin
    with pytest.raises(OutputFormatError, match="cannot store this origin"):
        write_image(volume, target)
    assert target.read_bytes() == b"previous"
    assert os.listdir(tmp_path) == ["labels.png"]


def test_sheared_direction_is_refused_where_the_format_would_change_it(tmp_path):
    sheared = np.array([[1.0, 0.3, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    sheared /= np.linalg.norm(sheared, axis=0)  # unit columns (the Volume contract), not orthogonal
    volume = Volume(np.zeros((3, 4, 5), np.uint8), (1.0, 1.0, 1.0), (0.0, 0.0, 0.0), sheared)
    with pytest.raises(
        OutputFormatError, match=r"NIFTI cannot store this direction \(the direction is not orth"
    ):
        write_image(volume, tmp_path / "shear.nii.gz")  # NIfTI's quaternion would silently rotate it
    assert os.listdir(tmp_path) == []
    np.testing.assert_allclose(read_image(write_image(volume, tmp_path / "shear.mha")).direction, sheared)


@pytest.mark.parametrize(("name", "instead"), [("x.mhd", ".mha"), ("x.nhdr", ".nrrd")])
def test_two_file_formats_are_not_written(tmp_path, name, instead):
    with pytest.raises(OutputFormatError, match=rf"two files; write \{instead} instead"):
        write_image(oblique_volume(), tmp_path / name)
    assert os.listdir(tmp_path) == []


def test_unknown_output_extension(tmp_path):
    with pytest.raises(OutputFormatError, match="cannot write .foo"):
        write_image(oblique_volume(), tmp_path / "x.foo")


def test_write_into_missing_folder_is_output_error(tmp_path):
    with pytest.raises(OutputError, match="does not exist"):
        write_image(oblique_volume(), tmp_path / "missing" / "x.nii.gz")


def test_labels_dtypes_are_preserved(tmp_path):
    labels = oblique_volume(np.uint16)
    read = read_image(write_image(labels, tmp_path / "labels.nii.gz"))
    assert read.array.dtype == np.uint16 and np.array_equal(read.array, labels.array)
    mask = labels.with_array(labels.array > 30000)  # bool is stored as uint8
    read = read_image(write_image(mask, tmp_path / "mask.nrrd"))
    assert read.array.dtype == np.uint8 and np.array_equal(read.array, mask.array)


# ---------------------------------------------------------------------------------------------------------
# DICOM series


def write_dicom_series(
    folder: Path, array: np.ndarray, uid: str, *, description: str = "test", skip=()
) -> None:
    """One int16 file per slice of ``array`` (z, y, x) with the module's oblique, anisotropic geometry.

    DICOM has no slice direction of its own: readers take row x column as the slice normal, so a series is
    always right-handed and the direction used here is a rotation without the flip."""
    folder.mkdir(exist_ok=True)
    direction = oblique_direction(flip=False)
    writer = sitk.ImageFileWriter()
    writer.KeepOriginalImageUIDOn()
    for k, plane in enumerate(array):
        if k in skip:
            continue
        position = np.asarray(ORIGIN_XYZ) + direction[:, 2] * SPACING_XYZ[2] * k
        image = sitk.GetImageFromArray(plane.astype(np.int16))
        image.SetSpacing(SPACING_XYZ[:2])
        tags = {
            "0008|0016": "1.2.840.10008.5.1.4.1.1.2",  # CT image storage
            "0008|0018": f"{uid}.{k + 1}",
            "0008|0060": "CT",
            "0008|103e": description,
            "0020|000d": "1.2.826.0.1.3680043.2.1125.9",
            "0020|000e": uid,
            "0020|0013": str(k + 1),
            "0020|0032": "\\".join(f"{p:.6f}" for p in position),
            "0020|0037": "\\".join(f"{c:.6f}" for c in (*direction[:, 0], *direction[:, 1])),
            "0028|0030": f"{SPACING_XYZ[1]:.6f}\\{SPACING_XYZ[0]:.6f}",  # row spacing (y) \ column spacing (x)
            "0018|0050": f"{SPACING_XYZ[2]:.6f}",
        }
        for tag, value in tags.items():
            image.SetMetaData(tag, value)
        writer.SetFileName(str(folder / f"{uid.rsplit('.', 1)[-1]}_{k:03d}.dcm"))
        writer.Execute(image)


def ct_array(shape=(5, 6, 7), seed=0) -> np.ndarray:
    return np.random.default_rng(seed).integers(-1000, 2000, size=shape).astype(np.int16)


def test_dicom_series_geometry(tmp_path):
    folder = tmp_path / "ct"
    array = ct_array()
    write_dicom_series(folder, array, "1.2.826.0.1.3680043.2.1125.1.101")
    volume = read_image(folder)
    assert volume.format == "dicom" and volume.source == folder
    assert (
        volume.metadata["series_uid"] == "1.2.826.0.1.3680043.2.1125.1.101" and volume.metadata["files"] == 5
    )
    assert volume.array.dtype == np.int16 and np.array_equal(volume.array, array)
    assert_same_geometry(volume, oblique_volume(shape=array.shape, flip=False), atol=1e-4)  # decimal strings
    expected = np.asarray(ORIGIN_XYZ) + oblique_direction(flip=False) @ (np.asarray(SPACING_XYZ) * [1, 2, 3])
    np.testing.assert_allclose(physical_point(volume, (3, 2, 1)), expected[::-1], atol=1e-4)

    # DICOM -> NIfTI -> read keeps the geometry (to NIfTI's float32 precision).
    assert output_extension(volume.format, "", kind="labels") == ".nii.gz"
    again = read_image(write_image(volume, tmp_path / f"{case_name(folder)}.nii.gz"))
    assert np.array_equal(again.array, array)
    assert_same_geometry(again, volume)


def test_two_series_in_one_folder(tmp_path):
    folder = tmp_path / "study"
    write_dicom_series(folder, ct_array((5, 6, 7)), "1.2.3.4.501", description="abdomen")
    write_dicom_series(folder, ct_array((3, 4, 5), seed=1), "1.2.3.4.502", description="scout")
    with pytest.raises(InputError) as caught:
        read_image(folder)
    message = str(caught.value)
    assert_one_line_error(caught.value, folder)
    assert "series=" in message and "--series" in message
    assert '1.2.3.4.501 (5 files, "abdomen")' in message and '1.2.3.4.502 (3 files, "scout")' in message

    assert read_image(folder, series="1.2.3.4.501").array.shape == (5, 6, 7)
    assert read_image(folder, series="1.2.3.4.502").array.shape == (3, 4, 5)
    with pytest.raises(InputError, match=r"no DICOM series 9\.9 here.*1\.2\.3\.4\.501"):
        read_image(folder, series="9.9")


def test_dicom_series_with_missing_slice(tmp_path):
    folder = tmp_path / "gap"
    write_dicom_series(folder, ct_array(), "1.2.3.4.601", skip=(2,))
    with pytest.raises(InputError, match="not evenly spaced") as caught:
        read_image(folder)
    assert_one_line_error(caught.value, folder)
    assert "601_001.dcm and 601_003.dcm" in str(caught.value)


def test_folder_without_dicom(tmp_path, capfd):
    sitk.ProcessObject.SetGlobalWarningDisplay(True)
    folder = tmp_path / "notes"
    folder.mkdir()
    (folder / "readme.txt").write_text("no images here")
    with pytest.raises(InputError, match="no DICOM series found") as caught:
        read_image(folder)
    assert_one_line_error(caught.value, folder)
    assert capfd.readouterr().err == ""  # ITK's "No Series were found" warning is silenced
    assert sitk.ProcessObject.GetGlobalWarningDisplay()  # and the switch is put back


# ---------------------------------------------------------------------------------------------------------
# Bad inputs


def _nifti_bytes(tmp_path: Path, array: np.ndarray) -> bytes:
    sitk.WriteImage(sitk.GetImageFromArray(array), str(tmp_path / "source.nii"))
    data = (tmp_path / "source.nii").read_bytes()
    (tmp_path / "source.nii").unlink()
    return data


def empty_file(tmp_path):
    (tmp_path / "empty.nii.gz").write_bytes(b"")
    return tmp_path / "empty.nii.gz", "file is empty"


def truncated_nii_gz(tmp_path):
    data = gzip.compress(_nifti_bytes(tmp_path, ct_array((8, 9, 10))))
    (tmp_path / "cut.nii.gz").write_bytes(data[: len(data) // 2])
    return tmp_path / "cut.nii.gz", "truncated"


def bad_crc_nii_gz(tmp_path):
    # Large enough that ITK's header read does not reach the CRC at the end: our own scan must catch it.
    data = bytearray(gzip.compress(_nifti_bytes(tmp_path, ct_array((20, 64, 64)))))
    data[-6] ^= 0xFF  # inside the CRC32 trailer
    (tmp_path / "crc.nii.gz").write_bytes(bytes(data))
    return tmp_path / "crc.nii.gz", "corrupt gzip stream"


def truncated_nii(tmp_path):
    data = _nifti_bytes(tmp_path, ct_array((8, 9, 10)))
    (tmp_path / "cut.nii").write_bytes(data[: len(data) - 100])
    return tmp_path / "cut.nii", "truncated: the header declares 1,440 bytes of voxel data, 1,340 are present"


def truncated_mha(tmp_path):
    sitk.WriteImage(sitk.GetImageFromArray(ct_array((8, 9, 10))), str(tmp_path / "full.mha"), False)
    data = (tmp_path / "full.mha").read_bytes()
    (tmp_path / "cut.mha").write_bytes(data[: len(data) - 500])
    return tmp_path / "cut.mha", "truncated: the header declares 1,440 bytes of voxel data, 940 are present"


def truncated_compressed_mha(tmp_path):
    sitk.WriteImage(sitk.GetImageFromArray(ct_array((8, 9, 10))), str(tmp_path / "full.mha"), True)
    data = (tmp_path / "full.mha").read_bytes()
    (tmp_path / "cut.mha").write_bytes(data[: len(data) - 500])
    return tmp_path / "cut.mha", "bytes of compressed voxel data"


def png_named_nii(tmp_path):
    sitk.WriteImage(sitk.GetImageFromArray(np.zeros((4, 4), np.uint8)), str(tmp_path / "real.png"))
    (tmp_path / "real.png").rename(tmp_path / "photo.nii")
    return tmp_path / "photo.nii", "looks like a PNG image"


def plain_nifti_named_gz(tmp_path):
    (tmp_path / "plain.nii.gz").write_bytes(_nifti_bytes(tmp_path, ct_array()))
    return tmp_path / "plain.nii.gz", "not gzip-compressed"


def junk_named_nii_gz(tmp_path):
    (tmp_path / "junk.nii.gz").write_bytes(os.urandom(1000).replace(b"\x1f\x8b", b"xx"))
    return tmp_path / "junk.nii.gz", "not gzip-compressed"


def nifti_named_png(tmp_path):
    (tmp_path / "scan.png").write_bytes(_nifti_bytes(tmp_path, ct_array()))
    return tmp_path / "scan.png", "looks like an uncompressed NIfTI file"


def bad_dim0_nii(tmp_path):
    data = bytearray(_nifti_bytes(tmp_path, ct_array()))
    data[40:42] = struct.pack("<h", 0)  # dim[0]
    (tmp_path / "dim0.nii").write_bytes(bytes(data))
    return tmp_path / "dim0.nii", "dim[0] is 0"


def four_d_nifti(tmp_path):
    frames = [sitk.GetImageFromArray(np.zeros((3, 4, 5), np.float32)) for _ in range(2)]
    sitk.WriteImage(sitk.JoinSeries(frames), str(tmp_path / "fmri.nii.gz"))
    return tmp_path / "fmri.nii.gz", "4D images (time series) are not supported; split the volume first"


def nan_nifti(tmp_path):
    array = np.ones((3, 4, 5), np.float32)
    array[0, 1, 2], array[2, 3, 4], array[1, 1, 1] = np.nan, np.inf, -np.inf
    sitk.WriteImage(sitk.GetImageFromArray(array), str(tmp_path / "nan.nii.gz"))
    return tmp_path / "nan.nii.gz", "contains 3 NaN/Inf voxels"


def nan_mha(tmp_path):
    array = np.ones((3, 4, 5), np.float64)
    array[0, 0, 0] = np.nan
    sitk.WriteImage(sitk.GetImageFromArray(array), str(tmp_path / "nan.mha"))
    return tmp_path / "nan.mha", "contains 1 NaN/Inf voxels"


def missing_file(tmp_path):
    return tmp_path / "nowhere.nii.gz", "no such file or folder"


def unknown_extension(tmp_path):
    (tmp_path / "scan.xyz").write_bytes(b"data")
    return tmp_path / "scan.xyz", "unsupported file type (.xyz)"


def single_dicom_file(tmp_path):
    write_dicom_series(tmp_path / "ct", ct_array((1, 6, 7)), "1.2.3.4.701")
    return next((tmp_path / "ct").iterdir()), "a DICOM series is read from its folder"


def huge_header_mha(tmp_path):
    header = (
        "ObjectType = Image\nNDims = 3\nDimSize = 100000 100000 100000\nElementType = MET_UCHAR\n"
        "ElementDataFile = LOCAL\n"
    )
    (tmp_path / "bomb.mha").write_bytes(header.encode() + b"\x00" * 64)
    return tmp_path / "bomb.mha", "100000 x 100000 x 100000 (x, y, z) image = 1,000,000,000,000,000 values"


BAD_INPUTS = [
    empty_file,
    truncated_nii_gz,
    bad_crc_nii_gz,
    truncated_nii,
    truncated_mha,
    truncated_compressed_mha,
    png_named_nii,
    plain_nifti_named_gz,
    junk_named_nii_gz,
    nifti_named_png,
    bad_dim0_nii,
    four_d_nifti,
    nan_nifti,
    nan_mha,
    missing_file,
    unknown_extension,
    single_dicom_file,
    huge_header_mha,
]


@pytest.mark.parametrize("make", BAD_INPUTS, ids=[f.__name__ for f in BAD_INPUTS])
def test_bad_input_is_one_line_input_error(tmp_path, capfd, make):
    path, expected = make(tmp_path)
    capfd.readouterr()
    with pytest.raises(InputError) as caught:
        read_image(path)
    assert_one_line_error(caught.value, path)
    assert expected in str(caught.value)
    assert caught.value.path == path
    assert capfd.readouterr().err == ""  # nothing from ITK, niftilib or MetaIO on stderr either


@pytest.mark.parametrize("extension", [".nii", ".nii.gz"])
def test_nifti_checks_span_several_chunks(tmp_path, extension):
    """More than 1 MiB of voxels: NaN/Inf counted in every chunk, truncation found in a later chunk."""
    array = np.zeros((20, 128, 128), np.float32)  # 1.25 MiB
    array[0, 0, 0], array[-1, -1, -1] = np.nan, np.inf
    sitk.WriteImage(sitk.GetImageFromArray(array), str(tmp_path / f"big{extension}"))
    with pytest.raises(InputError, match="contains 2 NaN/Inf voxels"):
        read_image(tmp_path / f"big{extension}")

    array[0, 0, 0] = array[-1, -1, -1] = 1.0
    data = _nifti_bytes(tmp_path, array)
    pack = gzip.compress if extension == ".nii.gz" else bytes
    (tmp_path / f"whole{extension}").write_bytes(pack(data))
    assert np.array_equal(read_image(tmp_path / f"whole{extension}").array, array)
    (tmp_path / f"cut{extension}").write_bytes(pack(data[: len(data) - 4]))
    with pytest.raises(InputError, match="declares 1,310,720 bytes of voxel data, 1,310,716 are present"):
        read_image(tmp_path / f"cut{extension}")


def test_nonfinite_voxels_can_be_allowed(tmp_path):
    path, _ = nan_mha(tmp_path)
    assert np.isnan(read_image(path, allow_nonfinite=True).array).sum() == 1


def test_max_voxels(tmp_path):
    path = write_image(oblique_volume(np.uint8), tmp_path / "small.nii.gz")  # 120 voxels
    with pytest.raises(InputError, match="over the limit of 100 "):
        read_image(path, max_voxels=100)
    assert read_image(path, max_voxels=120).array.size == 120
    assert read_image(path, max_voxels=None).array.size == 120


def test_series_option_on_a_file(tmp_path):
    path = write_image(oblique_volume(np.uint8), tmp_path / "a.nii.gz")
    with pytest.raises(InputError, match="series= only applies"):
        read_image(path, series="1.2.3")


def test_warning_switch_restored_after_failed_read(tmp_path):
    sitk.ProcessObject.SetGlobalWarningDisplay(True)
    with pytest.raises(InputError):
        read_image(truncated_mha(tmp_path)[0])
    assert sitk.ProcessObject.GetGlobalWarningDisplay()


# ---------------------------------------------------------------------------------------------------------
# Names, extensions, hashes


@pytest.mark.parametrize(
    ("volume_format", "source", "kind", "expected"),
    [
        ("nifti", ".nii.gz", "labels", ".nii.gz"),
        ("nifti", ".nii", "map", ".nii"),
        ("nrrd", ".nhdr", "labels", ".nrrd"),
        ("mha", ".mhd", "map", ".mha"),
        ("dicom", "", "map", ".nii.gz"),
        ("png", ".png", "labels", ".png"),
        ("png", ".png", "map", ".tif"),
        ("jpeg", ".jpg", "labels", ".png"),
        ("jpeg", ".jpeg", "map", ".tif"),
        ("tiff", ".tiff", "labels", ".tif"),
        ("tiff", ".tif", "map", ".tif"),
    ],
)
def test_output_extension(volume_format, source, kind, expected):
    assert output_extension(volume_format, source, kind=kind) == expected


def test_output_extension_rejects_unknowns():
    with pytest.raises(ValueError, match="kind"):
        output_extension("nifti", ".nii", kind="probabilities")
    with pytest.raises(ValueError, match="unknown volume format"):
        output_extension("analyze", ".hdr", kind="labels")


def test_case_name(tmp_path):
    assert case_name("/data/case_001.nii.gz") == "case_001"
    assert case_name("case.v2.NRRD") == "case.v2"
    assert case_name(Path("img.png")) == "img"
    (tmp_path / "patient7").mkdir()
    assert case_name(tmp_path / "patient7") == "patient7"


def test_is_supported(tmp_path):
    assert all(is_supported(f"x{extension}") for extension in SUPPORTED_EXTENSIONS)
    assert is_supported("X.NII.GZ") and not is_supported("x.txt") and not is_supported("x.gz")
    write_dicom_series(tmp_path / "ct", ct_array((2, 4, 4)), "1.2.3.4.801")
    assert is_supported(tmp_path / "ct")
    (tmp_path / "empty").mkdir()
    assert not is_supported(tmp_path / "empty")
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.txt").write_text("x" * 200)
    assert not is_supported(tmp_path / "text")


def test_is_supported_finds_dicom_without_extension(tmp_path):
    write_dicom_series(tmp_path / "ct", ct_array((2, 4, 4)), "1.2.3.4.901")
    for file in (tmp_path / "ct").iterdir():
        file.rename(file.with_suffix(""))
    assert is_supported(tmp_path / "ct")


def test_sha256_file(tmp_path):
    data = os.urandom(3 * 1024 * 1024 + 17)  # spans several 1 MiB chunks
    (tmp_path / "blob").write_bytes(data)
    assert sha256_file(tmp_path / "blob") == hashlib.sha256(data).hexdigest()


def test_import_does_not_load_simpleitk():
    code = "import sys, napari_medcl.io; assert 'SimpleITK' not in sys.modules, 'SimpleITK imported'"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).parents[3])

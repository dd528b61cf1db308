"""Hostile and broken inputs, NIfTI (.nii, .nii.gz): each is refused with a one-line InputError naming the file,
or read with the documented result (docs/reliability.md, "Inputs"). The files are built in hostile_files.py.
"""

from __future__ import annotations

import gzip

import numpy as np
import pytest
from hostile_files import Refused, check_refused, ct, nifti1, patched, physical, scanner_nifti, write

from napari_medcl.errors import InputError, InputWarning
from napari_medcl.io import read_image

REFUSED = Refused()
refuse = REFUSED.add


# 1. NIfTI header corruption
@refuse
def nifti_sizeof_hdr_349(tmp):
    return write(
        tmp / "a.nii", patched(scanner_nifti(), "sizeof_hdr", 349)
    ), "sizeof_hdr is neither 348 nor 540"


@refuse
def nifti_dim0_above_7(tmp):
    data = patched(scanner_nifti(), "dim", 8, 5, 4, 3, 1, 1, 1, 1)
    return write(tmp / "a.nii", data), "dim[0] is 8, must be 1 to 7"


@refuse
def nifti_negative_dim(tmp):
    data = patched(scanner_nifti(), "dim", 3, 5, -4, 3, 1, 1, 1, 1)
    return write(tmp / "a.nii", data), "header declares dimensions (5, -4, 3)"


@refuse
def nifti_zero_dim(tmp):
    data = patched(scanner_nifti(), "dim", 3, 5, 4, 0, 1, 1, 1, 1)
    return write(tmp / "a.nii", data), "header declares dimensions (5, 4, 0)"


@refuse
def nifti_unknown_datatype(tmp):
    return write(tmp / "a.nii", patched(scanner_nifti(), "datatype", 999)), "unknown datatype code 999"


@refuse
def nifti_complex(tmp):
    return write(
        tmp / "a.nii", patched(scanner_nifti(), "datatype", 32)
    ), "complex64 voxels are not supported"


@refuse
def nifti_vox_offset_nan(tmp):
    return write(tmp / "a.nii", patched(scanner_nifti(), "vox_offset", float("nan"))), "vox_offset is nan"


@refuse
def nifti_vox_offset_infinite(tmp):
    # raised OverflowError before (int(inf))
    return write(tmp / "a.nii", patched(scanner_nifti(), "vox_offset", float("inf"))), "vox_offset is inf"


@refuse
def nifti_vox_offset_inside_header(tmp):
    data = patched(scanner_nifti(), "vox_offset", 100.0)
    return write(tmp / "a.nii", data), "voxel offset 100 lies inside the 348-byte header"


@refuse
def nifti_two_file_magic(tmp):
    return write(tmp / "a.nii", patched(scanner_nifti(), "magic", b"ni1\0")), "not a single-file NIfTI"


# 2. Header dims larger than the data
@refuse
def nifti_dims_larger_than_data(tmp):
    data = patched(scanner_nifti(), "dim", 3, 5, 4, 9, 1, 1, 1, 1)
    return write(tmp / "a.nii", data), "header declares 360 bytes of voxel data, 120 are present"


# 5. Zero, negative, NaN pixdim
@pytest.mark.parametrize("value", [0.0, -0.5, float("nan"), float("inf")])
def test_bad_pixdim_is_refused(tmp_path, value):
    path = write(tmp_path / "a.nii.gz", gzip.compress(scanner_nifti(pixdim=(0.5, value, 2.0))))
    with pytest.raises(InputError, match=rf"pixdim\[2\] \(voxel size\) is {value:g}, must be positive"):
        read_image(path)


# 6. qform and sform
@refuse
def nifti_qform_sform_disagree_itk_uses_sform(tmp):
    sform = np.hstack([np.diag([0.5, 0.6, 2.0]), [[60.0], [20.0], [30.0]]])  # 50 mm off the qform in x
    return write(tmp / "a.nii", scanner_nifti(sform=sform)), "disagree by up to 50 mm"


@refuse
def nifti_qform_sform_disagree_itk_uses_qform(tmp):
    sform = np.hstack([np.diag([0.5, 0.6, 2.0]), [[60.0], [20.0], [30.0]]])
    data = scanner_nifti(sform=sform, sform_code=2)  # aligned-anat sform: ITK takes the qform, FSL the sform
    return write(tmp / "a.nii", data), "ITK would use the qform, FSL and nibabel the sform"


@refuse
def nifti_sheared_sform_and_qform(tmp):
    sform = np.hstack([[[0.5, 0.3, 0.0], [0.0, 0.6, 0.0], [0.0, 0.0, 2.0]], [[10.0], [20.0], [30.0]]])
    return write(tmp / "a.nii", scanner_nifti(sform=sform)), "ITK would use the qform"


# 7. Non-orthonormal directions
@refuse
def nifti_sheared_sform_only(tmp):
    sform = np.hstack([[[0.5, 0.3, 0.0], [0.0, 0.6, 0.0], [0.0, 0.0, 2.0]], [[10.0], [20.0], [30.0]]])
    data = scanner_nifti(sform=sform, qform_code=0)
    return write(tmp / "a.nii", data), "ITK only supports orthonormal direction cosines"


@refuse
def nifti_sform_not_finite(tmp):
    sform = np.hstack([np.diag([np.nan, 0.6, 2.0]), [[10.0], [20.0], [30.0]]])
    return write(tmp / "a.nii", scanner_nifti(sform=sform)), "sform (srow_x/y/z) is not finite"


@refuse
def nifti_quaternion_not_finite(tmp):
    return write(tmp / "a.nii", scanner_nifti(quatern=(np.nan, 0, 0))), "qform quaternion (nan, 0.0, 0.0)"


@refuse
def nifti_quaternion_longer_than_one(tmp):
    return write(tmp / "a.nii", scanner_nifti(quatern=(0.8, 0.8, 0.0))), "b^2 + c^2 + d^2 = 1.28 > 1"


# 9. scl_slope / scl_inter
@refuse
def nifti_slope_with_nan_intercept(tmp):
    return write(tmp / "a.nii", scanner_nifti(scl=(2.0, np.nan))), "scl_slope is 2 but scl_inter is nan"


@refuse
def nifti_zero_slope_with_intercept(tmp):
    # the standard and nibabel: no scaling; ITK: slope 1 and the intercept added
    return write(
        tmp / "a.nii", scanner_nifti(scl=(0.0, 5.0))
    ), "scl_slope is 0 (no scaling) but scl_inter is 5"


@refuse
def nifti_nan_slope_with_intercept(tmp):
    return write(tmp / "a.nii", scanner_nifti(scl=(np.nan, -1024.0))), "scl_slope is nan (no scaling)"


@refuse
def nifti_slope_overflowing_to_inf(tmp):
    return write(tmp / "a.nii", scanner_nifti(scl=(1e38, 0.0))), "NaN/Inf voxels"


# 17. Volumes above the budget, headers declaring huge volumes
@refuse
def nifti_declares_35_trillion_voxels(tmp):
    data = patched(scanner_nifti(), "dim", 3, 32767, 32767, 32767, 1, 1, 1, 1)
    return write(tmp / "a.nii", data), "= 35,181,150,961,663 values, over the limit"


def test_nifti_ras_sform_becomes_lps_array_order(tmp_path):
    """8. A permuted, flipped, oblique RAS sform written byte by byte (no qform): every voxel lands where the
    sform says, with x and y negated for LPS and the axes reversed into array order."""
    rotation = np.linalg.qr(np.random.default_rng(4).normal(size=(3, 3)))[0]
    rotation = rotation[:, [2, 0, 1]] * [1, -1, 1]  # permuted, one axis flipped
    spacing = np.array([0.7, 1.3, 2.9])
    sform = np.hstack([rotation * spacing, [[-12.0], [40.5], [7.25]]])
    volume = read_image(write(tmp_path / "a.nii", nifti1(ct(), pixdim=spacing, sform=sform, sform_code=1)))
    assert np.array_equal(volume.array, ct())
    assert volume.spacing == pytest.approx(spacing[::-1])
    for i, j, k in [(0, 0, 0), (4, 3, 2), (1, 2, 0), (3, 0, 1)]:
        lps = (sform @ [i, j, k, 1.0]) * [-1, -1, 1]
        np.testing.assert_allclose(physical(volume, (k, j, i)), lps[::-1], atol=1e-4)


def test_nifti_qform_rotation_and_qfac(tmp_path):
    """8. A qform only: 90 degrees about z (quaternion d = sin 45 degrees) and qfac -1 (z flipped)."""
    half = np.sqrt(0.5)
    data = nifti1(
        ct(), pixdim=(0.5, 0.6, 2.0), qform_code=1, quatern=(0, 0, half), qoffset=(5, 6, 7), qfac=-1
    )
    volume = read_image(write(tmp_path / "a.nii", data))
    ras_matrix = np.array([[0, -1, 0], [1, 0, 0], [0, 0, 1]]) * [0.5, 0.6, -2.0]
    for i, j, k in [(0, 0, 0), (4, 3, 2), (2, 1, 1)]:
        lps = (ras_matrix @ [i, j, k] + [5, 6, 7]) * [-1, -1, 1]
        np.testing.assert_allclose(physical(volume, (k, j, i)), lps[::-1], atol=1e-5)


@pytest.mark.parametrize(("qform_code", "sform_code"), [(1, 0), (0, 1), (1, 1), (2, 4)])
def test_nifti_only_one_transform_or_both_equal(tmp_path, qform_code, sform_code):
    """6. Only qform, only sform, or both equal (whatever their codes): read, same geometry."""
    data = scanner_nifti(qform_code=qform_code, sform_code=sform_code)
    volume = read_image(write(tmp_path / "a.nii", data))
    assert volume.spacing == pytest.approx((2.0, 0.6, 0.5))
    assert volume.origin == pytest.approx((30.0, -20.0, -10.0))  # RAS (10, 20, 30) in LPS, reversed
    np.testing.assert_allclose(volume.direction, np.diag([1.0, -1.0, -1.0]), atol=1e-7)  # RAS axes in LPS


def test_nifti_without_orientation_warns(tmp_path):
    """6. Both codes 0: ITK's result (origin 0, identity direction, pixdim spacing) with an InputWarning."""
    path = write(tmp_path / "a.nii", scanner_nifti(qform_code=0, sform_code=0))
    with pytest.warns(
        InputWarning, match=r"a\.nii: header declares no orientation \(qform_code = sform_code = 0\)"
    ):
        volume = read_image(path)
    assert volume.spacing == pytest.approx((2.0, 0.6, 0.5)) and volume.origin == (0.0, 0.0, 0.0)
    np.testing.assert_array_equal(volume.direction, np.eye(3))


def test_nifti_scaling(tmp_path):
    """9. scl_slope 0, NaN or Inf (intercept 0 or NaN): no scaling (NIfTI standard, niftilib, nibabel); a
    slope and intercept: float32 values."""
    for slope, inter in [(0.0, 0.0), (np.nan, 0.0), (np.inf, np.nan), (1.0, 0.0)]:
        volume = read_image(write(tmp_path / "a.nii", scanner_nifti(scl=(slope, inter))))
        assert volume.array.dtype == np.int16 and np.array_equal(volume.array, ct())
    volume = read_image(write(tmp_path / "b.nii", scanner_nifti(scl=(2.0, -1024.0))))
    assert volume.array.dtype == np.float32
    np.testing.assert_array_equal(volume.array, ct() * 2.0 - 1024.0)


def test_nifti_bitpix_is_ignored(tmp_path):
    """1. A bitpix disagreeing with the datatype: voxels sized by datatype, as niftilib and nibabel do."""
    volume = read_image(write(tmp_path / "a.nii", patched(scanner_nifti(), "bitpix", 32)))
    assert np.array_equal(volume.array, ct())


@pytest.mark.parametrize("make", REFUSED, ids=[f.__name__ for f in REFUSED])
def test_refused(tmp_path, capfd, make):
    check_refused(tmp_path, capfd, make)

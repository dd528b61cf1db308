"""Fuzzing the image reader (Hypothesis): hostile headers never escape as anything but InputError, and
geometry survives write -> read in every 3D format.

(a) Reader boundary: small valid NIfTI (.nii, .nii.gz), NRRD (attached raw/gzip, detached .nhdr), MetaImage
(.mha raw/compressed, .mhd + .raw) and multi-page TIFF files get random header field values, byte
overwrites, line edits and truncations; ``read_image`` must return a sane Volume or raise InputError, within
a time limit. (b) Geometry: random orthonormal directions (rotations, axis permutations, flips), spacings
0.1-10 mm, origins and odd shapes round-trip exactly (to the format's float precision).

Profiles: CI runs "ci" (60 examples per test, derandomized, so CI is stable). The longer campaign in
docs/reliability.md ("Fuzzing") runs ``HYPOTHESIS_PROFILE=long .venv/bin/python -m pytest tests/test_io_fuzz.py``.
"""

from __future__ import annotations

import faulthandler
import gzip
import os
import struct
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import SimpleITK as sitk
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from napari_medcl.errors import InputError
from napari_medcl.io import read_image, write_image
from napari_medcl.volume import Volume

settings.register_profile(
    "medcl-io-ci",
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile(
    "medcl-io-long",
    max_examples=6000,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
PROFILE = settings.get_profile("medcl-io-" + os.environ.get("HYPOTHESIS_PROFILE", "ci"))

MAX_VOXELS = 4096
MAX_BYTES = 1 << 16
HANG_SECONDS = 60  # one read of a tiny file taking this long is a hang: the process is stopped


@contextmanager
def hang_guard():
    """Native code cannot be interrupted from Python: if a read hangs, dump the stacks and exit."""
    faulthandler.dump_traceback_later(HANG_SECONDS, exit=True)
    try:
        yield
    finally:
        faulthandler.cancel_dump_traceback_later()


# ---------------------------------------------------------------------------------------------------------
# Seed files: small, valid, with non-trivial geometry


@dataclass(frozen=True)
class Seed:
    name: str  # the file read_image is given
    data: bytes  # its content, before compression for .nii.gz
    text: bool  # a line-based header (MetaImage, NRRD)
    companions: tuple[tuple[str, bytes], ...] = ()  # data files beside it
    gzip_whole: bool = False  # .nii.gz: mutations apply to the decompressed bytes, then it is gzipped


def _sample_image(dtype=np.float32) -> sitk.Image:
    array = (np.arange(4 * 5 * 6) % 23 - 7).reshape(4, 5, 6).astype(dtype)  # (z, y, x)
    image = sitk.GetImageFromArray(array)
    image.SetSpacing((0.7, 0.8, 2.5))
    image.SetOrigin((10.0, -20.0, 30.0))
    rotation = np.linalg.qr(np.random.default_rng(3).normal(size=(3, 3)))[0]
    image.SetDirection((rotation * np.sign(np.linalg.det(rotation))).ravel().tolist())
    return image


def _written(image: sitk.Image, name: str, compress: bool) -> bytes:
    with tempfile.TemporaryDirectory() as folder:
        sitk.WriteImage(image, str(Path(folder, name)), compress)
        return Path(folder, name).read_bytes()


def _tiff(pages: int) -> bytes:
    with tempfile.TemporaryDirectory() as folder:
        stack = np.arange(pages * 4 * 5, dtype=np.uint8).reshape(pages, 4, 5)
        sitk.WriteImage(sitk.GetImageFromArray(stack), str(Path(folder, "a.tif")))
        return Path(folder, "a.tif").read_bytes()


@cache
def seeds() -> dict[str, Seed]:
    image, labels = _sample_image(), _sample_image(np.int16)
    raw = sitk.GetArrayFromImage(labels).astype("<i2").tobytes()
    nhdr = "NRRD0004\ntype: short\ndimension: 3\nsizes: 6 5 4\nspacings: 0.7 0.8 2.5\nencoding: raw\nendian: little\n"
    mhd = (
        "ObjectType = Image\nNDims = 3\nBinaryData = True\nBinaryDataByteOrderMSB = False\n"
        "TransformMatrix = 1 0 0 0 1 0 0 0 1\nOffset = 1 2 3\nElementSpacing = 0.7 0.8 2.5\n"
        "DimSize = 6 5 4\nElementType = MET_SHORT\nElementDataFile = a.raw\n"
    )
    return {
        "nii-float": Seed("a.nii", _written(image, "a.nii", False), False),
        "nii-int": Seed("a.nii", _written(labels, "a.nii", False), False),
        "nii.gz": Seed("a.nii.gz", _written(image, "a.nii", False), False, gzip_whole=True),
        "nrrd-raw": Seed("a.nrrd", _written(image, "a.nrrd", False), True),
        "nrrd-gzip": Seed("a.nrrd", _written(labels, "a.nrrd", True), True),
        "nhdr": Seed("a.nhdr", (nhdr + "data file: a.raw\n").encode(), True, (("a.raw", raw),)),
        "mha-raw": Seed("a.mha", _written(image, "a.mha", False), True),
        "mha-zlib": Seed("a.mha", _written(labels, "a.mha", True), True),
        "mhd": Seed("a.mhd", mhd.encode(), True, (("a.raw", raw),)),
        "tiff": Seed("a.tif", _tiff(3), False),
    }


# ---------------------------------------------------------------------------------------------------------
# Mutations

INTS = [0, 1, -1, 2, 3, 4, 7, 8, 255, 256, 32767, -32768, 65535, 2**31 - 1, -(2**31)]
FLOATS = [0.0, -0.0, 1.0, -1.0, 0.5, 1e-6, 1e6, 1e38, -1e38, 1e-38, float("nan"), float("inf"), float("-inf")]
TOKENS = [
    "0", "-1", "1", "2", "3", "4", "11", "nan", "inf", "-inf", "1e308", "1e-308", "99999999999", "", "x",
    "../a.raw", "/etc/passwd", "LIST", "a%03d.raw 1 3 1", "LOCAL", "True", "False", "1 2", "1 2 3",
    "1 2 3 4 5 6 7 8 9 10 11", "MET_FLOAT", "MET_FOO", "gzip", "bzip2", "hex", "ascii", "raw", "block",
    "-2 1 1", "(1,0,0) (0,1,0) (0,0,1)", "(nan,0,0) (0,1,0) (0,0,1)", "none", "0 0 0 0 1 0 0 0 1",
    "LIST 2", "a.raw", "a b.raw", "\t", "=", ":", ":=", "#", "a:=b",
]  # fmt: skip
KEYS = [
    "NDims", "DimSize", "ElementType", "ElementSpacing", "ElementSize", "Offset", "Origin", "TransformMatrix",
    "ElementNumberOfChannels", "HeaderSize", "CompressedData", "CompressedDataSize", "ElementDataFile",
    "ObjectType", "type", "dimension", "sizes", "spacings", "encoding", "data file", "datafile",
    "byte skip", "line skip", "space directions", "space origin", "kinds", "endian", "space",
]  # fmt: skip
NIFTI_FIELDS = {  # NIfTI-1: offset, struct item, count
    "sizeof_hdr": (0, "i", 1), "dim": (40, "h", 8), "intent_code": (68, "h", 1), "datatype": (70, "h", 1),
    "bitpix": (72, "h", 1), "pixdim": (76, "f", 8), "vox_offset": (108, "f", 1), "scl": (112, "f", 2),
    "qform_code": (252, "h", 1), "sform_code": (254, "h", 1), "quatern": (256, "f", 6),
    "srow": (280, "f", 12), "magic": (344, "B", 4),
}  # fmt: skip


def set_field(data: bytes, field: str, index: int, value: float) -> bytes:
    """``data`` with one item of a NIfTI-1 header field set to ``value`` (integers wrap to the item's range)."""
    offset, item, count = NIFTI_FIELDS[field]
    out = bytearray(data)
    position = offset + struct.calcsize(item) * (index % count)
    if item == "f":
        struct.pack_into("<f", out, position, value)
    elif item == "B":
        out[position] = int(value) % 256
    else:
        bits = struct.calcsize(item) * 8
        low = -(1 << (bits - 1))
        struct.pack_into("<" + item, out, position, (int(value) - low) % (1 << bits) + low)
    return bytes(out)


def edit_lines(data: bytes, edits: list[tuple[str, int, int, str]]) -> bytes:
    """Line edits inside the text header (before the first blank line for NRRD, the whole head otherwise)."""
    cut = data.find(b"\n\n")
    head, tail = (data[: cut + 1], data[cut + 1 :]) if cut >= 0 else (data, b"")
    if data.startswith(b"ObjectType"):
        end = data.find(b"ElementDataFile")
        end = data.find(b"\n", end) + 1 if end >= 0 else len(data)
        head, tail = data[:end], data[end:]
    lines = head.split(b"\n")
    for kind, i, j, token in edits:
        if not lines:
            break
        i, j = i % len(lines), j % len(lines)
        key = lines[i].split(b"=")[0].split(b":")[0].strip() or b"x"
        sep = b" = " if data.startswith(b"ObjectType") else b": "
        if kind == "value":
            lines[i] = key + sep + token.encode()
        elif kind == "delete":
            del lines[i]
        elif kind == "duplicate":
            lines.insert(j, lines[i])
        elif kind == "swap":
            lines[i], lines[j] = lines[j], lines[i]
        else:  # insert a known key
            lines.insert(i, KEYS[j % len(KEYS)].encode() + sep + token.encode())
    return b"\n".join(lines) + tail


@st.composite
def mutated(draw) -> tuple[Seed, bytes, bytes | None]:
    """(seed, mutated file bytes, mutated companion data or None)."""
    seed = seeds()[draw(st.sampled_from(sorted(seeds())))]
    data = seed.data
    for _ in range(draw(st.integers(1, 3))):
        edit = "field" if not seed.text else "lines"
        kind = draw(st.sampled_from(["bytes", "truncate", edit, edit, "bytes"]))
        if kind == "bytes" and data:
            span = min(len(data), 600)
            for position, value in draw(
                st.lists(st.tuples(st.integers(0, span - 1), st.integers(0, 255)), max_size=8)
            ):
                data = data[:position] + bytes([value]) + data[position + 1 :]
        elif kind == "truncate":
            data = data[: draw(st.integers(0, len(data)))]
        elif kind == "field" and seed.name.startswith("a.nii") and len(data) >= 348:
            field = draw(st.sampled_from(sorted(NIFTI_FIELDS)))
            values = FLOATS if NIFTI_FIELDS[field][1] == "f" else INTS
            data = set_field(data, field, draw(st.integers(0, 11)), draw(st.sampled_from(values)))
        elif kind == "lines":
            line_edit = st.tuples(
                st.sampled_from(["value", "delete", "duplicate", "swap", "insert"]),
                st.integers(0, 40),
                st.integers(0, 40),
                st.sampled_from(TOKENS),
            )
            data = edit_lines(data, draw(st.lists(line_edit, min_size=1, max_size=4)))
    if seed.gzip_whole:
        data = gzip.compress(data, mtime=0)
        if draw(st.booleans()):  # and sometimes damage the compressed stream itself
            data = data[: draw(st.integers(0, len(data)))]
    companion = None
    if seed.companions and draw(st.booleans()):
        original = seed.companions[0][1]
        companion = original[: draw(st.integers(0, len(original)))]
    return seed, data, companion


def check_volume(volume: Volume) -> None:
    """What every Volume read_image returns must satisfy."""
    assert volume.array.size <= MAX_VOXELS and volume.array.nbytes <= MAX_BYTES
    assert volume.spatial_dims in (2, 3) and min(volume.spatial_shape) >= 1
    if volume.array.dtype.kind == "f":
        assert np.isfinite(volume.array).all()
    assert all(np.isfinite(volume.spacing)) and min(volume.spacing) > 0
    assert np.isfinite(volume.origin).all() and np.isfinite(volume.direction).all()
    np.testing.assert_allclose(np.linalg.norm(volume.direction, axis=0), 1.0, atol=1e-3)
    assert abs(np.linalg.det(volume.direction)) >= 1e-3


@settings(PROFILE)
@given(mutated())
def test_reader_boundary_gives_volume_or_input_error(case):
    seed, data, companion = case
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder, seed.name)
        path.write_bytes(data)
        for name, content in seed.companions:
            Path(folder, name).write_bytes(content if companion is None else companion)
        with hang_guard():
            try:
                volume = read_image(path, max_voxels=MAX_VOXELS, max_bytes=MAX_BYTES)
            except InputError as error:
                assert error.path == path and "\n" not in str(error), str(error)
                event(f"{seed.name}: InputError")
                return
        check_volume(volume)
        event(f"{seed.name}: Volume")


@settings(PROFILE)
@given(st.sampled_from(sorted(seeds())))
def test_seeds_are_valid(name):
    """The unmutated seeds read (so the mutations start from files the reader accepts)."""
    seed = seeds()[name]
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder, seed.name)
        path.write_bytes(gzip.compress(seed.data) if seed.gzip_whole else seed.data)
        for companion, content in seed.companions:
            Path(folder, companion).write_bytes(content)
        check_volume(read_image(path, max_voxels=MAX_VOXELS, max_bytes=MAX_BYTES))


# ---------------------------------------------------------------------------------------------------------
# Geometry round trips

FLIPS_AND_PERMUTATIONS = st.tuples(st.permutations([0, 1, 2]), st.tuples(*[st.sampled_from([1.0, -1.0])] * 3))
UNIT = st.floats(-1.0, 1.0, allow_nan=False)


@st.composite
def directions(draw) -> np.ndarray:
    """An orthonormal (3, 3) direction: a permutation with flips, optionally rotated (a random quaternion)."""
    order, signs = draw(FLIPS_AND_PERMUTATIONS)
    direction = np.eye(3)[:, list(order)] * np.array(signs)
    if draw(st.booleans()):
        q = np.array(draw(st.tuples(UNIT, UNIT, UNIT, UNIT)))
        if np.linalg.norm(q) > 0.1:
            a, b, c, d = q / np.linalg.norm(q)
            rotation = np.array(
                [
                    [a * a + b * b - c * c - d * d, 2 * (b * c - a * d), 2 * (b * d + a * c)],
                    [2 * (b * c + a * d), a * a + c * c - b * b - d * d, 2 * (c * d - a * b)],
                    [2 * (b * d - a * c), 2 * (c * d + a * b), a * a + d * d - c * c - b * b],
                ]
            )
            direction = rotation @ direction
    return direction


DTYPES = [np.uint8, np.int16, np.uint16, np.int32, np.float32, np.float64]
TOLERANCES = {  # extension: (spacing rtol, origin atol mm, direction atol); NIfTI stores float32
    ".nii.gz": (1e-6, 1e-4, 1e-5),
    ".nrrd": (1e-12, 1e-9, 1e-12),
    ".mha": (1e-12, 1e-9, 1e-12),
}


@settings(PROFILE)
@given(
    extension=st.sampled_from(sorted(TOLERANCES)),
    shape=st.tuples(*[st.integers(1, 7)] * 3),
    spacing=st.tuples(*[st.floats(0.1, 10.0)] * 3),
    origin=st.tuples(*[st.floats(-500.0, 500.0)] * 3),
    direction=directions(),
    dtype=st.sampled_from(DTYPES),
    seed=st.integers(0, 2**32 - 1),
)
@example(
    ".nii.gz", (1, 1, 1), (0.1, 10.0, 0.1), (-500.0, 500.0, 0.0), np.diag([-1.0, 1.0, -1.0]), np.int16, 0
)
@example(".nrrd", (7, 1, 3), (10.0, 0.1, 1.0), (0.0, 0.0, 0.0), np.eye(3)[:, [2, 0, 1]], np.float64, 1)
@example(".mha", (2, 7, 1), (1.0, 1.0, 1.0), (1.5, -2.5, 3.5), -np.eye(3), np.uint8, 2)
def test_geometry_round_trip(tmp_path_factory, extension, shape, spacing, origin, direction, dtype, seed):
    rng = np.random.default_rng(seed)
    if np.dtype(dtype).kind == "f":
        array = rng.normal(scale=100.0, size=shape).astype(dtype)
    else:
        info = np.iinfo(dtype)
        array = rng.integers(info.min, info.max, size=shape, endpoint=True, dtype=dtype)
    volume = Volume(array, spacing, origin, direction)
    path = tmp_path_factory.mktemp("geometry") / f"v{extension}"
    read = read_image(write_image(volume, path))
    assert read.array.dtype == array.dtype and np.array_equal(read.array, array)
    spacing_rtol, origin_atol, direction_atol = TOLERANCES[extension]
    np.testing.assert_allclose(read.spacing, spacing, rtol=spacing_rtol)
    np.testing.assert_allclose(read.origin, origin, rtol=0, atol=origin_atol)
    np.testing.assert_allclose(read.direction, direction, rtol=0, atol=direction_atol)
    corner = np.asarray(shape) - 1  # the farthest voxel lands where it should, too
    expected = np.asarray(origin) + direction @ (np.asarray(spacing) * corner)
    found = np.asarray(read.origin) + read.direction @ (np.asarray(read.spacing) * corner)
    np.testing.assert_allclose(found, expected, rtol=0, atol=origin_atol + 100 * direction_atol)

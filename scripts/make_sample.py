"""Derive the plugin's sample scan from the MNI ICBM152 2009a T1 template bundled in nilearn.

    python scripts/make_sample.py [-o napari_medcl/data/mni152_t1_2mm.nii.gz]

The 1 mm template (197 x 233 x 189, skull-stripped, uint8) is cropped to the head's bounding box plus a
margin and block-averaged 2 x 2 x 2 to 2 mm. Its axes are then flipped to an identity direction, which keeps
every voxel's physical position (see ``flip_to_positive_axes``). Geometry goes through ``napari_medcl.io`` both
ways, so the output's spacing, origin and direction describe the template's physical space exactly, on the
coarser grid. The output is byte-for-byte reproducible. Licence notices for the template and nilearn are in
napari_medcl/data/LICENSE.
"""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import numpy as np

from napari_medcl.io import read_image, write_image
from napari_medcl.volume import Volume

TEMPLATE = "mni_icbm152_t1_tal_nlin_sym_09a_converted.nii.gz"
DEFAULT_OUT = Path(__file__).resolve().parents[1] / "napari_medcl" / "data" / "mni152_t1_2mm.nii.gz"
MARGIN = 4  # voxels of background kept around the head at 1 mm
FACTOR = 2


def template_path() -> Path:
    spec = importlib.util.find_spec("nilearn")
    if spec is None or spec.origin is None:
        raise SystemExit("nilearn is not installed: pip install nilearn")
    path = Path(spec.origin).parent / "datasets" / "data" / TEMPLATE
    if not path.is_file():
        raise SystemExit(f"{path}: not found in this nilearn installation")
    return path


def head_box(array: np.ndarray, margin: int, factor: int) -> tuple[slice, ...]:
    """Bounding box of the non-zero voxels plus ``margin``, grown so that each side is a multiple of factor."""
    nonzero = np.argwhere(array > 0)
    box = []
    for axis, n in enumerate(array.shape):
        lo = max(0, int(nonzero[:, axis].min()) - margin)
        hi = min(n, int(nonzero[:, axis].max()) + 1 + margin)
        extra = (-(hi - lo)) % factor
        hi = min(n, hi + extra)
        lo = max(0, lo - ((-(hi - lo)) % factor))
        box.append(slice(lo, hi))
    return tuple(box)


def block_mean(volume: Volume, factor: int) -> Volume:
    """Average factor^3 blocks; the new origin is the centre of the first block."""
    shape = tuple(n // factor for n in volume.spatial_shape)
    trimmed = volume.array[tuple(slice(0, n * factor) for n in shape)].astype(np.float64)
    # (Z*f, Y*f, X*f) -> (Z, f, Y, f, X, f) -> mean over the f axes
    blocks = trimmed.reshape(shape[0], factor, shape[1], factor, shape[2], factor).mean(axis=(1, 3, 5))
    spacing = np.asarray(volume.spacing)
    origin = np.asarray(volume.origin) + volume.direction @ (spacing * (factor - 1) / 2)
    return Volume(
        array=np.clip(np.rint(blocks), 0, 255).astype(np.uint8),
        spacing=tuple(spacing * factor),
        origin=tuple(origin),
        direction=volume.direction,
    )


def flip_to_positive_axes(volume: Volume) -> Volume:
    """Flip every array axis whose direction points backwards, so that the direction becomes the identity.

    The template is stored RAS (ITK direction diag(1, -1, -1) in array order); napari shows scale and translate
    only, so an identity direction makes the axial view come out in the usual radiological layout (anterior up,
    patient's left on screen right). Every voxel keeps its physical position.
    """
    array, origin, direction = volume.array, np.asarray(volume.origin), volume.direction.copy()
    for axis, n in enumerate(volume.spatial_shape):
        if direction[axis, axis] < 0:
            array = np.flip(array, axis=axis)
            origin = origin + direction[:, axis] * volume.spacing[axis] * (n - 1)
            direction[:, axis] *= -1
    return Volume(
        array=np.ascontiguousarray(array), spacing=volume.spacing, origin=tuple(origin), direction=direction
    )


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("-o", "--output", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    source = read_image(template_path())
    cropped = source.crop(head_box(source.array, MARGIN, FACTOR))
    sample = flip_to_positive_axes(block_mean(cropped, FACTOR))
    written = write_image(sample, args.output)
    print(
        f"{written}: shape {sample.spatial_shape} (z, y, x), spacing {sample.spacing} mm, "
        f"{written.stat().st_size / 1e6:.2f} MB"
    )


if __name__ == "__main__":
    main()

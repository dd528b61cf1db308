"""Dataset and augmentation settings (the ``data:`` section of a training config).

Defaults follow nnU-Net v2 where it has one (``nnUNetTrainer.get_training_transforms``): rotation and scaling
with p = 0.2, mirroring every axis with p = 0.5, Gaussian noise p = 0.1, blur p = 0.2, multiplicative brightness
and contrast p = 0.15, low-resolution simulation p = 0.25, gamma p = 0.3 (inverted gamma p = 0.1); elastic
deformation is off, as in nnU-Net v2. The bias field is not part of nnU-Net and is on with a small weight.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Literal

LAYOUTS = ("msd", "folder2d", "acdc")


def _check_probabilities(obj: object) -> None:
    for f in fields(obj):  # type: ignore[arg-type]
        if f.name.endswith("_prob"):
            value = getattr(obj, f.name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{f.name} must be in [0, 1], got {value!r}")


def _check_range(name: str, value: tuple[float, float], *, low: float = -math.inf) -> None:
    if len(value) != 2 or not low <= value[0] <= value[1]:
        raise ValueError(f"{name} must be (low, high) with {low} <= low <= high, got {list(value)}")


@dataclass(frozen=True)
class AugmentationConfig:
    """Random transforms applied to every training patch (MONAI; seeded per sample).

    ``rotation_degrees`` None: +-180 degrees in 2D and +-30 degrees around each axis in 3D (nnU-Net). Scaling
    is one isotropic factor (values > 1 zoom out). ``elastic_magnitude`` / ``elastic_sigma`` are in voxels:
    uniform noise in [-1, 1] smoothed with a Gaussian of ``sigma`` then multiplied by ``magnitude``.
    ``noise_std``: the noise standard deviation is drawn from [0, noise_std] (z-scored intensities).
    ``brightness_range`` multiplies intensities; ``contrast_range`` scales around the mean, keeping the range.
    ``lowres_zoom``: downsample by this factor (nearest), then upsample back (linear).
    """

    enabled: bool = True
    rotation_prob: float = 0.2
    rotation_degrees: float | None = None
    scaling_prob: float = 0.2
    scaling_range: tuple[float, float] = (0.7, 1.4)
    elastic_prob: float = 0.0
    elastic_magnitude: tuple[float, float] = (0.0, 900.0)
    elastic_sigma: tuple[float, float] = (9.0, 13.0)
    flip_prob: float = 0.5
    gamma_prob: float = 0.3
    gamma_inverted_prob: float = 0.1
    gamma_range: tuple[float, float] = (0.7, 1.5)
    brightness_prob: float = 0.15
    brightness_range: tuple[float, float] = (0.75, 1.25)
    contrast_prob: float = 0.15
    contrast_range: tuple[float, float] = (0.75, 1.25)
    noise_prob: float = 0.1
    noise_std: float = 0.3
    blur_prob: float = 0.2
    blur_sigma: tuple[float, float] = (0.5, 1.0)
    lowres_prob: float = 0.25
    lowres_zoom: tuple[float, float] = (0.5, 1.0)
    bias_field_prob: float = 0.1
    bias_field_coefficients: tuple[float, float] = (0.0, 0.1)

    def __post_init__(self) -> None:
        _check_probabilities(self)
        if self.rotation_degrees is not None and not 0 <= self.rotation_degrees <= 180:
            raise ValueError(f"rotation_degrees must be in [0, 180] or null, got {self.rotation_degrees!r}")
        _check_range("scaling_range", self.scaling_range, low=1e-3)
        _check_range("elastic_magnitude", self.elastic_magnitude, low=0.0)
        _check_range("elastic_sigma", self.elastic_sigma, low=1e-3)
        _check_range("gamma_range", self.gamma_range, low=1e-3)
        _check_range("brightness_range", self.brightness_range, low=0.0)
        _check_range("contrast_range", self.contrast_range, low=0.0)
        _check_range("blur_sigma", self.blur_sigma, low=0.0)
        _check_range("bias_field_coefficients", self.bias_field_coefficients, low=0.0)
        if not 0 < self.lowres_zoom[0] <= self.lowres_zoom[1] <= 1:
            raise ValueError(
                f"lowres_zoom must be (low, high) with 0 < low <= high <= 1, got {list(self.lowres_zoom)}"
            )
        if self.noise_std < 0:
            raise ValueError(f"noise_std must be >= 0, got {self.noise_std!r}")


@dataclass(frozen=True)
class DataConfig:
    """Where the dataset is, how it is split, and how cases are preprocessed and sampled.

    ``layout``: ``msd`` (imagesTr/labelsTr/dataset.json, MSD or nnU-Net v2), ``folder2d`` (images/ + masks/,
    ISIC style) or ``acdc`` (patientXXX/patientXXX_frameYY[_gt].nii.gz).
    ``fraction``: share of the labelled training cases used (limited-label studies); at least one case is kept,
    and with one seed a smaller fraction is a subset of a larger one.
    ``fold`` of ``num_folds``: k-fold cross-validation over subjects (both ACDC frames of a patient stay in one
    fold) with the fixed ``split_seed``, so every training seed sees the same split; ``val_fraction`` set
    instead gives one random split with that share of subjects for validation; ``val_cases`` (case ids or
    subjects) names the validation cases outright instead (an empty list: no validation, every case trains). Subjects come from the layout (see
    ``training.data.layouts.discover``: dataset.json, or a subjects.json / subjects.csv mapping file);
    ``require_subjects`` makes a dataset without such a mapping an error, for datasets whose cases share
    patients (CHAOS: three MR sequences per patient), where one case per subject would leak across the split.
    ``target_spacing``: ``"median"`` of the dataset, explicit mm in array order (z, y, x) / (y, x), or None
    (keep each case's spacing). A 2D model on 3D volumes resamples in-plane only (two values when explicit).
    ``crop_nonzero``: crop each case to the box of its non-zero voxels, and take intensity statistics in that mask.
    ``normalization`` of channels that are not CT (by channel name): ``zscore`` per image (nnU-Net), or
    ``rescale``, the image's 0.5th and 99.5th percentiles mapped to 0 and 1 (robust min-max; steadier than a
    z-score when fields of view hold different tissue mixes).
    ``cache_dir``: where preprocessed cases are kept (None: the directory the trainer passes, else
    ``<root>/.medcl-cache``).
    """

    root: str = ""
    layout: Literal["msd", "folder2d", "acdc"] = "msd"
    fraction: float = 1.0
    fold: int = 0
    num_folds: int = 5
    val_fraction: float | None = None
    split_seed: int = 12345
    val_cases: tuple[str, ...] | None = None
    require_subjects: bool = False
    target_spacing: tuple[float, ...] | Literal["median"] | None = "median"
    crop_nonzero: bool = True
    normalization: Literal["zscore", "rescale"] = "zscore"
    cache_dir: str | None = None
    foreground_fraction: float = 0.33
    num_workers: int = 2
    augmentation: AugmentationConfig = field(default_factory=AugmentationConfig)

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        if self.normalization not in ("zscore", "rescale"):
            raise ValueError(f"normalization must be 'zscore' or 'rescale', got {self.normalization!r}")
        if not 0.0 < self.fraction <= 1.0:
            raise ValueError(f"fraction must be in (0, 1], got {self.fraction!r}")
        if self.num_folds < 2:
            raise ValueError(f"num_folds must be at least 2, got {self.num_folds!r}")
        if not 0 <= self.fold < self.num_folds:
            raise ValueError(f"fold must be in 0..{self.num_folds - 1}, got {self.fold!r}")
        if self.val_cases is not None:
            # An empty list holds no case out: every case trains (fine-tuning on too few corrected cases).
            if isinstance(self.val_cases, str):
                raise ValueError(f"val_cases must be a list of case ids or null, got {self.val_cases!r}")
            object.__setattr__(self, "val_cases", tuple(str(c) for c in self.val_cases))
        if self.val_fraction is not None and not 0.0 < self.val_fraction < 1.0:
            raise ValueError(f"val_fraction must be in (0, 1) or null, got {self.val_fraction!r}")
        spacing = self.target_spacing
        if isinstance(spacing, str) and spacing != "median":
            raise ValueError(f"target_spacing must be 'median', a list of mm or null, got {spacing!r}")
        if isinstance(spacing, (list, tuple)):
            if len(spacing) not in (2, 3) or not all(s > 0 for s in spacing):
                raise ValueError(f"target_spacing must be 2 or 3 positive numbers (mm), got {list(spacing)}")
            object.__setattr__(self, "target_spacing", tuple(float(s) for s in spacing))
        if not 0.0 <= self.foreground_fraction <= 1.0:
            raise ValueError(f"foreground_fraction must be in [0, 1], got {self.foreground_fraction!r}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers!r}")

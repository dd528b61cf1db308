"""ModelSpec: what a model file says about itself (stored as JSON under the ONNX metadata key ``medcl.spec``).

The spec carries everything needed to run a model correctly: classes with names and colours, the spacing and
normalisation it was trained with, its patch size, and the names of its UAFR uncertainty maps. Readers refuse
a spec whose ``format_version`` is newer than they understand, and every malformed field is a clear error.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from typing import Any

from napari_medcl.errors import MedclError

METADATA_KEY = "medcl.spec"
FORMAT_VERSION = 1
NORMALIZATION_KINDS = ("zscore", "ct", "percentile", "rescale", "none", "per_channel")
DEFAULT_INTENDED_USE = (
    "For research use only. Not a medical device; not for diagnosis or treatment decisions. "
    "Review every result before use."
)
# A fixed palette so that exported models get stable, distinguishable colours when none are given.
PALETTE = (
    "#000000",
    "#e6194b",
    "#3cb44b",
    "#4363d8",
    "#ffe119",
    "#f58231",
    "#911eb4",
    "#46f0f0",
    "#f032e6",
    "#bcf60c",
    "#fabebe",
    "#008080",
    "#e6beff",
    "#9a6324",
    "#fffac8",
    "#800000",
    "#aaffc3",
    "#808000",
    "#ffd8b1",
    "#000075",
)


class SpecError(MedclError, ValueError):
    """A ModelSpec is missing, malformed, or inconsistent with its graph."""


@dataclass(frozen=True)
class ClassInfo:
    index: int
    name: str
    color: str


@dataclass(frozen=True)
class ModelSpec:
    """A model's self-description; see architecture.md §4.2 for the meaning of every field.

    All per-axis fields are in array order: (y, x) for 2D models, (z, y, x) for 3D models.
    """

    name: str
    spatial_dims: int
    in_channels: int
    classes: tuple[ClassInfo, ...]
    patch_size: tuple[int, ...]
    divisor: tuple[int, ...]
    spacing: tuple[float, ...] | None = None
    normalization: dict[str, Any] = field(default_factory=lambda: {"kind": "zscore"})
    uncertainty_maps: tuple[str, ...] = ()
    nonzero_is_foreground: bool = False
    training: dict[str, Any] = field(default_factory=dict)
    intended_use: str = DEFAULT_INTENDED_USE
    format_version: int = FORMAT_VERSION
    training_profile: dict[str, Any] | None = None
    # A prompt-conditioned network's prompt channels (napari_medcl.prompt_channels.PromptEncoding.to_dict):
    # the graph's second input; None for a model that takes the image alone.
    prompts: dict[str, Any] | None = None
    # The calibrated error map's logistic model (napari_medcl.error_model.ErrorModel.to_dict), fitted out of
    # fold by medcl-calibrate; None for a model without one (its viewer shows the uncalibrated map).
    error_model: dict[str, Any] | None = None
    # The graph's pooled bottleneck output and its training statistics
    # (napari_medcl.feature_distance.FeatureStats.to_dict), added by medcl-calibrate; None without one.
    features: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        _check(isinstance(self.name, str) and self.name.strip(), "name must be a non-empty string")
        _check(self.spatial_dims in (2, 3), f"spatial_dims must be 2 or 3, got {self.spatial_dims!r}")
        _check(
            isinstance(self.in_channels, int) and self.in_channels >= 1,
            f"in_channels must be a positive integer, got {self.in_channels!r}",
        )
        classes = tuple(c if isinstance(c, ClassInfo) else ClassInfo(**c) for c in self.classes)
        _check(len(classes) >= 2, f"a segmentation model needs at least 2 classes, got {len(classes)}")
        _check(
            [c.index for c in classes] == list(range(len(classes))),
            f"class indices must be 0..{len(classes) - 1} in order, got {[c.index for c in classes]}",
        )
        for c in classes:
            _check(
                isinstance(c.color, str) and len(c.color) == 7 and c.color.startswith("#"),
                f"class {c.index} colour must look like '#rrggbb', got {c.color!r}",
            )
        object.__setattr__(self, "classes", classes)
        for key in ("patch_size", "divisor"):
            value = tuple(getattr(self, key))
            _check(
                len(value) == self.spatial_dims and all(isinstance(v, int) and v >= 1 for v in value),
                f"{key} must be {self.spatial_dims} positive integers, got {list(value)}",
            )
            object.__setattr__(self, key, value)
        if self.spacing is not None:
            spacing = tuple(float(s) for s in self.spacing)
            _check(
                len(spacing) == self.spatial_dims and all(math.isfinite(s) and s > 0 for s in spacing),
                f"spacing must be {self.spatial_dims} positive numbers or null, got {list(spacing)}",
            )
            object.__setattr__(self, "spacing", spacing)
        _check_normalization(self.normalization, self.in_channels)
        maps = tuple(self.uncertainty_maps)
        _check(all(isinstance(m, str) and m for m in maps), "uncertainty_maps must be non-empty names")
        _check(len(set(maps)) == len(maps), f"uncertainty_maps has duplicate names: {list(maps)}")
        object.__setattr__(self, "uncertainty_maps", maps)
        _check(
            isinstance(self.nonzero_is_foreground, bool),
            f"nonzero_is_foreground must be true or false, got {self.nonzero_is_foreground!r}",
        )
        _check_profile(self.training_profile)
        if self.prompts is not None:
            from napari_medcl.prompt_channels import PromptEncoding, PromptEncodingError

            try:
                encoding = PromptEncoding.from_dict(self.prompts)
            except PromptEncodingError as error:
                raise SpecError(str(error)) from None
            _check(
                encoding.num_classes == len(classes),
                f"prompts are for {encoding.num_classes} classes, the model has {len(classes)}",
            )

        if self.error_model is not None:
            from napari_medcl.error_model import ErrorModel, ErrorModelError

            try:
                ErrorModel.from_dict(self.error_model).check_maps(maps)
            except ErrorModelError as error:
                raise SpecError(str(error)) from None
        if self.features is not None:
            from napari_medcl.feature_distance import FeatureStats, FeatureStatsError

            try:
                FeatureStats.from_dict(self.features)
            except FeatureStatsError as error:
                raise SpecError(str(error)) from None

    @property
    def feature_stats(self):  # -> FeatureStats | None (imported lazily, as error_map_model)
        """The graph's window features and their training statistics, None for a model without them."""
        if self.features is None:
            return None
        from napari_medcl.feature_distance import FeatureStats

        return FeatureStats.from_dict(self.features)

    @property
    def error_map_model(self):  # -> ErrorModel | None (imported lazily, as prompt_encoding)
        """The calibrated error map's model, None for a model without one."""
        if self.error_model is None:
            return None
        from napari_medcl.error_model import ErrorModel

        return ErrorModel.from_dict(self.error_model)

    @property
    def prompt_encoding(self):  # -> PromptEncoding | None (imported lazily: the spec module stays small)
        """The prompt channels' encoding, None for a model without prompt channels."""
        if self.prompts is None:
            return None
        from napari_medcl.prompt_channels import PromptEncoding

        return PromptEncoding.from_dict(self.prompts)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def class_names(self) -> list[str]:
        return [c.name for c in self.classes]

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["classes"] = [asdict(c) for c in self.classes]
        for key in ("patch_size", "divisor", "uncertainty_maps"):
            data[key] = list(data[key])
        if self.spacing is not None:
            data["spacing"] = list(self.spacing)
        if self.training_profile is None:
            del data["training_profile"]  # a spec without one reads exactly as before the field existed
        if self.prompts is None:
            del data["prompts"]  # likewise for a model without prompt channels
        if self.error_model is None:
            del data["error_model"]  # and without a calibrated error map
        if self.features is None:
            del data["features"]  # and without window features
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=None, sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelSpec:
        if not isinstance(data, dict):
            raise SpecError(f"the spec must be a JSON object, got {type(data).__name__}")
        version = data.get("format_version", FORMAT_VERSION)
        if not isinstance(version, int):
            raise SpecError(f"format_version must be an integer, got {version!r}")
        if version > FORMAT_VERSION:
            raise SpecError(
                f"the model's spec has format_version {version}; this napari-medcl reads up to "
                f"{FORMAT_VERSION}. Update napari-medcl to run this model."
            )
        known = set(cls.__dataclass_fields__)
        missing = [
            k
            for k in ("name", "spatial_dims", "in_channels", "classes", "patch_size", "divisor")
            if k not in data
        ]
        if missing:
            raise SpecError(f"the spec lacks required fields: {', '.join(missing)}")
        fields = {k: v for k, v in data.items() if k in known}
        try:
            return cls(**fields)
        except TypeError as error:
            raise SpecError(f"malformed spec: {error}") from None

    @classmethod
    def from_json(cls, text: str) -> ModelSpec:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise SpecError(f"the spec is not valid JSON ({error})") from None
        return cls.from_dict(data)

    def summary(self) -> str:
        """One line for logs and the widget: name, dims, classes, patch, spacing."""
        spacing = "native" if self.spacing is None else "x".join(f"{s:g}" for s in self.spacing) + " mm"
        return (
            f"{self.name}: {self.spatial_dims}D, {self.in_channels} channel(s), classes "
            f"{', '.join(self.class_names)}, patch {'x'.join(map(str, self.patch_size))}, spacing {spacing}, "
            f"{len(self.uncertainty_maps)} UAFR map(s)"
            + (f", {len(self.prompts['channels'])} prompt channel(s)" if self.prompts is not None else "")
            + (
                f", window features ({self.features['channels']} channels)"
                if self.features is not None
                else ""
            )
        )

    def error_map_summary(self) -> str:
        """Which error map this model's results show, in words, for the model summaries (the widget's model
        info, ``medcl-predict``'s first lines). With a calibrated error map: the error model's own line
        (``ErrorModel.summary``), its figures fitted without each fold model's cases when recorded, and a
        line with each signal's AUROC alone on the same out-of-fold cases (every UAFR map the error model uses
        among them, as ``UAFR <name>``); without one: that the map shown is uncalibrated."""
        error_model = self.error_map_model
        if error_model is None:
            return (
                "review map: uncalibrated error likelihood, 1 - p(label) (this model carries no calibrated error map; "
                "medcl-calibrate --error-case fits one)"
            )
        figures = error_model.figures
        line = f"review map: {error_model.summary()}"
        held_auroc, held_ece = figures.get("auroc_other_folds"), figures.get("ece_other_folds")
        if _is_number(held_auroc) and _is_number(held_ece):
            line += f"; fitted without each fold model's cases: AUROC {held_auroc:.3f}, ECE {held_ece:.3f}"
        signals = figures.get("signals") if isinstance(figures.get("signals"), dict) else {}
        # in the order of the error model's features (a stored spec's JSON may have sorted the keys)
        order = [
            *(f for f in error_model.features if f in signals),
            *sorted(set(signals) - set(error_model.features)),
        ]
        shown = {name: signals[name] for name in order if _is_number(signals[name])}
        if not shown:
            return line
        from napari_medcl.error_model import MAP_PREFIX

        each = ", ".join(
            f"{'UAFR ' + name[len(MAP_PREFIX) :] if name.startswith(MAP_PREFIX) else name} {value:.3f}"
            for name, value in shown.items()
        )
        if error_model.is_consensus:
            return f"{line}\nAUROC of each signal alone on the same cases: {each}"
        return f"{line}\nout-of-fold AUROC of each signal alone: {each}"


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def default_classes(names: list[str], colors: list[str] | None = None) -> tuple[ClassInfo, ...]:
    """ClassInfo entries for ``names`` (index order), colours from ``colors`` or the fixed palette."""
    if colors is not None and len(colors) != len(names):
        raise SpecError(f"{len(colors)} colours given for {len(names)} classes")
    return tuple(
        ClassInfo(index=i, name=n, color=colors[i] if colors else PALETTE[i % len(PALETTE)])
        for i, n in enumerate(names)
    )


def _check_normalization(normalization: object, in_channels: int, *, nested: bool = False) -> None:
    kind = normalization.get("kind") if isinstance(normalization, dict) else None
    allowed = NORMALIZATION_KINDS[:-1] if nested else NORMALIZATION_KINDS
    _check(kind in allowed, f"normalization.kind must be one of {allowed}, got {kind!r}")
    required = {
        "ct": ("clip_low", "clip_high", "mean", "std"),
        "percentile": ("low", "high"),
        "rescale": ("low", "high"),
    }
    for key in required.get(kind, ()):
        _check(key in normalization, f"normalization {kind!r} needs {key!r}")
    if kind == "per_channel":
        channels = normalization.get("channels")
        _check(
            isinstance(channels, list) and len(channels) == in_channels,
            f"normalization 'per_channel' needs a list of {in_channels} channel entries",
        )
        for channel in channels:
            _check_normalization(channel, 1, nested=True)


def _check_profile(profile: object) -> None:
    """``training_profile`` is None or a JSON object with an integer ``version`` (a newer version than
    ``napari_medcl.training_profile`` reads is kept: the verdict then says it cannot use it)."""
    if profile is None:
        return
    _check(
        isinstance(profile, dict), f"training_profile must be an object or null, got {type(profile).__name__}"
    )
    version = profile.get("version")
    _check(
        isinstance(version, int) and not isinstance(version, bool) and version >= 1,
        f"training_profile.version must be a positive integer, got {version!r}",
    )
    try:
        json.dumps(profile, allow_nan=False)
    except (TypeError, ValueError) as error:
        raise SpecError(f"training_profile must hold plain JSON values ({error})") from None


def _check(condition: object, message: str) -> None:
    if not condition:
        raise SpecError(message)

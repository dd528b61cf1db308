"""The prompt channels of a prompt-conditioned network (engine (b)): clicks and the previous segmentation as
images beside the scan. Numpy only: training (``training.prompt_training``) and the product
(``napari_medcl.refinement.NetworkRefiner``) encode with these same functions, so the network sees at
inference exactly the channels it was trained on.

A model with prompt channels declares them in its spec (``ModelSpec.prompts``, :class:`PromptEncoding`):
for each foreground class k a positive click map ``positive:<class>`` and a negative one ``negative:<class>``
(in class order: positive then negative for class 1, then for class 2, ...), then, when the encoding has it,
the previous segmentation one-hot over the foreground classes ``previous:<class>`` (the background is where
they are all zero). The graph takes them as its second input ``prompts`` (N, P, *S), never normalised.

A click is a disk (value 1 inside ``radius_mm``) or a Gaussian (exp(-d^2 / 2 r^2), cut at 3 r) around its
voxel, in millimetres of the grid it is drawn on. Every prompt channel, the previous segmentation's too, is
then multiplied by the encoding's ``amplitude`` (1 unless the spec says otherwise): the input layer's weights
for these channels start at zero when a trained network gains them, and an optimiser such as Adam moves a
weight by about its learning rate per step whatever the input's scale, so a larger amplitude lets the prompts
reach the network sooner, as a larger learning rate for those weights alone would. A positive click on the background ("this is not any
class") is drawn in the negative map of every foreground class; a negative click on the background says
nothing a foreground map can hold and is left out.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from napari_medcl.errors import MedclError

PROMPTS_INPUT = "prompts"
ENCODING_VERSION = 1
# An encoding with an amplitude other than 1 is written as version 2, so that a reader that knows only
# version 1 (and would feed channels of value 1) refuses the model instead of feeding it the wrong scale.
AMPLITUDE_VERSION = 2
CLICK_SHAPES = ("disk", "gaussian")


class PromptEncodingError(MedclError, ValueError):
    """A spec's ``prompts`` entry is malformed."""


@dataclass(frozen=True)
class Click:
    """One click on a grid: ``label`` the class it speaks of, ``positive`` whether the voxel is that class,
    ``at`` its voxel (z, y, x)."""

    label: int
    positive: bool
    at: tuple[int, int, int]


@dataclass(frozen=True)
class PromptEncoding:
    """How prompts become channels: ``num_classes`` K (background included), ``radius_mm`` and ``shape``
    (disk or gaussian) of a click, ``previous`` whether the previous segmentation is a channel group,
    ``amplitude`` the value every channel is scaled by (see the module's text)."""

    num_classes: int
    radius_mm: float = 2.0
    shape: str = "disk"
    previous: bool = True
    amplitude: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.num_classes, int) or self.num_classes < 2:
            raise PromptEncodingError(f"prompts: num_classes must be 2 or more, got {self.num_classes!r}")
        if not (
            isinstance(self.radius_mm, (int, float)) and math.isfinite(self.radius_mm) and self.radius_mm > 0
        ):
            raise PromptEncodingError(f"prompts: radius_mm must be a positive number, got {self.radius_mm!r}")
        if self.shape not in CLICK_SHAPES:
            raise PromptEncodingError(f"prompts: shape must be one of {CLICK_SHAPES}, got {self.shape!r}")
        if not (
            isinstance(self.amplitude, (int, float)) and math.isfinite(self.amplitude) and self.amplitude > 0
        ):
            raise PromptEncodingError(f"prompts: amplitude must be a positive number, got {self.amplitude!r}")

    @property
    def channel_names(self) -> list[str]:
        """The channels in input order (see the module's text); class indices stand for names here."""
        names = []
        for k in range(1, self.num_classes):
            names += [f"positive:{k}", f"negative:{k}"]
        if self.previous:
            names += [f"previous:{k}" for k in range(1, self.num_classes)]
        return names

    @property
    def num_channels(self) -> int:
        return len(self.channel_names)

    def to_dict(self) -> dict[str, Any]:
        """The spec's ``prompts`` entry (JSON): the encoding, the input's name and its channels in order."""
        return {
            "version": ENCODING_VERSION if self.amplitude == 1.0 else AMPLITUDE_VERSION,
            "input": PROMPTS_INPUT,
            "channels": self.channel_names,
            "num_classes": self.num_classes,
            "radius_mm": float(self.radius_mm),
            "shape": self.shape,
            "previous": "onehot" if self.previous else None,
            "amplitude": float(self.amplitude),
        }

    @classmethod
    def from_dict(cls, data: Any) -> PromptEncoding:
        """The encoding a spec's ``prompts`` entry declares; PromptEncodingError when it is malformed or newer."""
        if not isinstance(data, dict):
            raise PromptEncodingError(f"prompts must be an object, got {type(data).__name__}")
        version = data.get("version")
        if version not in (ENCODING_VERSION, AMPLITUDE_VERSION):
            raise PromptEncodingError(
                f"prompts.version {version!r}: this napari-medcl reads versions {ENCODING_VERSION} and "
                f"{AMPLITUDE_VERSION}"
            )
        if data.get("previous") not in ("onehot", None):
            raise PromptEncodingError(
                f"prompts.previous must be 'onehot' or null, got {data.get('previous')!r}"
            )
        try:
            encoding = cls(
                num_classes=data["num_classes"],
                radius_mm=data["radius_mm"],
                shape=data["shape"],
                previous=data.get("previous") == "onehot",
                amplitude=data.get("amplitude", 1.0),  # absent from the files of the first prompt models
            )
        except KeyError as error:
            raise PromptEncodingError(f"prompts lacks {error.args[0]!r}") from None
        if data.get("channels") != encoding.channel_names or data.get("input") != PROMPTS_INPUT:
            raise PromptEncodingError(
                f"prompts.channels {data.get('channels')} (input {data.get('input')!r}) do not match the "
                f"encoding ({encoding.channel_names}, input {PROMPTS_INPUT!r})"
            )
        return encoding

    def encode(
        self,
        clicks: Iterable[Click],
        previous: np.ndarray | None,
        shape: Sequence[int],
        spacing: Sequence[float],
    ) -> np.ndarray:
        """The prompt channels (P, *shape) float32 on a grid of ``shape`` with ``spacing`` (mm, same axes).

        ``clicks`` outside the grid are left out (a click near a window's edge still reaches into it through
        its radius only when its voxel is inside). ``previous``: labels of ``shape`` (integers 0..K-1), or
        None for no previous segmentation (all zero, as for an automatic prediction)."""
        shape = tuple(int(s) for s in shape)
        if len(spacing) != len(shape):
            raise ValueError(f"spacing {tuple(spacing)} and shape {shape} have different lengths")
        out = np.zeros((self.num_channels, *shape), dtype=np.float32)
        for click in clicks:
            for channel in self._click_channels(click):
                draw_click(out[channel], click.at, spacing, self.radius_mm, self.shape)
        if self.previous and previous is not None:
            previous = np.asarray(previous)
            if previous.shape != shape:
                raise ValueError(
                    f"previous segmentation of shape {previous.shape} for a grid of shape {shape}"
                )
            first = 2 * (self.num_classes - 1)
            for k in range(1, self.num_classes):
                out[first + k - 1] = previous == k
        if self.amplitude != 1.0:
            out *= np.float32(self.amplitude)
        return out

    def _click_channels(self, click: Click) -> list[int]:
        if not 0 <= click.label < self.num_classes:
            raise ValueError(
                f"a click on class {click.label}; the model has classes 0..{self.num_classes - 1}"
            )
        if click.label == 0:
            # "this is background" = "not any foreground class"; "not background" has no map
            return [2 * (k - 1) + 1 for k in range(1, self.num_classes)] if click.positive else []
        return [2 * (click.label - 1) + (0 if click.positive else 1)]


def draw_click(
    plane: np.ndarray, at: Sequence[int], spacing: Sequence[float], radius_mm: float, shape: str
) -> None:
    """Draw one click into ``plane`` (*S) in place (the maximum with what is there): a disk of ``radius_mm``
    or a Gaussian of that sigma cut at 3 sigma, centred on voxel ``at``; nothing when ``at`` is outside."""
    at = [int(a) for a in at]
    if any(a < 0 or a >= n for a, n in zip(at, plane.shape)):
        return
    reach_mm = radius_mm if shape == "disk" else 3.0 * radius_mm
    box = tuple(
        slice(max(0, a - int(reach_mm / s)), min(n, a + int(reach_mm / s) + 1))
        for a, s, n in zip(at, spacing, plane.shape)
    )
    axes = np.meshgrid(
        *[(np.arange(b.start, b.stop) - a) * float(s) for b, a, s in zip(box, at, spacing)], indexing="ij"
    )
    d2 = sum(axis * axis for axis in axes)
    if shape == "disk":
        value = (d2 <= radius_mm * radius_mm).astype(np.float32)
    else:
        value = np.where(d2 <= reach_mm * reach_mm, np.exp(-d2 / (2.0 * radius_mm**2)), 0.0).astype(
            np.float32
        )
    np.maximum(plane[box], value, out=plane[box])

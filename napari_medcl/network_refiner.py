"""Engine (b) of the interactive session: a prompt-conditioned network answers the prompts itself.

A model whose spec declares prompt channels (``ModelSpec.prompts``, trained with ``model.prompts``) takes,
beside the image, per foreground class a positive and a negative click map and the previous segmentation
(``napari_medcl.prompt_channels``). On a prompt, :class:`NetworkRefiner` encodes every point and scribble so
far and the labels as they stand, runs the network on one patch-sized region around the prompt through
``napari_medcl.predict`` (its windows, resampling and label rules), and returns the network's labels for the
session's box around the prompt; ``CaseSession`` writes them as one Update, with engine (a)'s undo and
replay. The prompts' own voxels are hard seeds (a clicked voxel ends with what the click said, whatever the
network answers there). Box prompts, which the network was not trained with, go to engine (a).

Normalisation is the model's, computed once on the whole image (its statistics then do not depend on where
the user clicks) and applied to the image channels only; prompt channels are never normalised. Numpy only.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from napari_medcl.errors import UsageError
from napari_medcl.prompt_channels import Click, PromptEncoding
from napari_medcl.prompts import Prompt
from napari_medcl.session import InferenceSession
from napari_medcl.spec import ModelSpec

Box = tuple[slice, slice, slice]
# What of the network's answer is written: all of the box, only the changes connected to the prompt, or only
# the changes the prompt caused (the window run with and without it)
KEEP = ("box", "connected", "caused")


class NetworkRefiner:
    """Engine (b) (see the module's text) for ``model``, an InferenceSession whose spec has prompt channels.

    ``margin_mm``: how far around a prompt the network's answer is written (the session's box); the network
    itself sees a region of its own patch's extent around the prompt. ``keep``: "connected" writes only the
    changes connected to the prompt's voxels, "box" every change in the box, "caused" every voxel of the box
    where the network's answer with the prompt differs from its answer without it (the region run twice, so
    a click costs two network runs; it lets a click correct a region that does not touch it). Why connected
    and 6 mm by default: the region is one window, and near a window's edge its answer differs from the
    stitched prediction the labels came from; on the perturbed held-out block, writing the whole 10 mm box
    lowered Dice with every click (the changes away from the click were those differences, not the click's
    answer). ``predict_options``: options of ``predict_iter`` (overlap, tta, batch_size)."""

    name = "network"

    def __init__(
        self,
        model: InferenceSession,
        *,
        margin_mm: float = 6.0,
        keep: str = "connected",
        **predict_options: Any,
    ):
        encoding = model.spec.prompt_encoding
        if encoding is None:
            raise UsageError(
                f"model {model.spec.name!r} has no prompt channels; use engine 'local' (engine (a)) with it"
            )
        if margin_mm <= 0:
            raise ValueError(f"margin_mm must be > 0, got {margin_mm}")
        if keep not in KEEP:
            raise ValueError(f"keep must be one of {KEEP}, got {keep!r}")
        self.keep = keep
        self.model = model
        self.encoding: PromptEncoding = encoding
        self._margin_mm = float(margin_mm)
        self.predict_options = {
            k: v for k, v in predict_options.items() if k in ("overlap", "tta", "batch_size")
        }
        self._normalised: np.ndarray | None = None
        self._normalised_of: int | None = None

    def margin_mm(self) -> float:
        """How far around a prompt the box it is answered in reaches."""
        return self._margin_mm

    def answer(
        self,
        image: np.ndarray,
        spacing: Sequence[float],
        labels: np.ndarray,
        prompts: Sequence[Prompt],
        box: Box,
        *,
        spatial_dims: int,
    ) -> np.ndarray:
        """The network's labels for ``box`` (Z, Y, X slices), ``labels``' dtype.

        ``image`` (C, Z, Y, X) as read (a 2D image: depth 1, ``spatial_dims`` 2), ``spacing`` (z, y, x) mm,
        ``labels`` (Z, Y, X) the labels as they stand, ``prompts`` every prompt so far (the last is the one
        answered), in voxel indices of the grid."""
        grid = tuple(labels.shape)
        region = self.region(prompts[-1], grid, spacing, holding=box)
        origin = np.array([s.start for s in region])
        new, probabilities = self._labels(image, spacing, labels, prompts, region, spatial_dims)
        if self.keep == "caused":
            # The same window without the last prompt: what differs is the prompt's effect, and the window's
            # own disagreements with the stitched labels (its edges) are the same in both and drop out.
            before, _ = self._labels(image, spacing, labels, prompts[:-1], region, spatial_dims)
            new = np.where(new != before, new, labels[region])
        _seed(new, probabilities, prompts, origin)
        inner = tuple(slice(b.start - r.start, b.stop - r.start) for b, r in zip(box, region))
        new = new[inner].astype(labels.dtype)
        if self.keep == "connected":
            new = _connected_changes(new, labels[box], prompts[-1], box)
        return new

    def _labels(
        self,
        image: np.ndarray,
        spacing: Sequence[float],
        labels: np.ndarray,
        prompts: Sequence[Prompt],
        region: Box,
        spatial_dims: int,
    ) -> tuple[np.ndarray, np.ndarray]:
        """The network's labels (*region) and probabilities (K, *region) for ``region`` given ``prompts``
        (those outside the region are left out) and ``labels`` as the previous segmentation."""
        from napari_medcl.prediction import predict

        spec = self.model.spec
        normalised = self._normalised_image(image)
        origin = np.array([s.start for s in region])
        shape = tuple(s.stop - s.start for s in region)
        clicks = [
            Click(p.label, p.positive, tuple(int(v) for v in voxel - origin))
            for p in prompts
            if p.kind != "box"
            for voxel in p.voxels
            if all(0 <= v - o < n for v, o, n in zip(voxel, origin, shape))
        ]
        channels = self.encoding.encode(clicks, labels[region], shape, spacing)
        part = normalised[(slice(None), *region)]
        masked = spec.nonzero_is_foreground or _uses_mask(spec)
        inside = np.any(image[(slice(None), *region)] != 0, axis=0)
        if masked:
            channels *= (
                inside  # outside a masked scan's anatomy nothing is to be said (and nothing may count)
            )
        array = np.concatenate([part, channels])
        if spatial_dims == 2:
            array, region_spacing = array[:, 0], tuple(spacing[1:])
        else:
            region_spacing = tuple(spacing)
        volume = _volume(array, region_spacing)
        prediction = predict(
            volume, _PromptedSession(self.model), return_probabilities=True, **self.predict_options
        )
        probabilities = prediction.probabilities.array
        if spatial_dims == 2:
            probabilities = probabilities[:, None]
        new = probabilities.argmax(axis=0)
        if spec.nonzero_is_foreground and not np.all(image != 0):
            # the model's rule (architecture.md 4.4): a masked scan's non-zero voxels are never background
            foreground = probabilities[1:].argmax(axis=0) + 1
            new = np.where(inside, foreground, 0)
        return new, probabilities

    def region(
        self, prompt: Prompt, grid: Sequence[int], spacing: Sequence[float], *, holding: Box | None = None
    ) -> Box:
        """The region the network sees for ``prompt``: its patch's extent (at the model's spacing, else the
        image's) around the prompt's centre, grown to hold the box ``holding`` (the box its answer is
        written in), moved inside the grid where it can be, cut by it where not."""
        spec = self.model.spec
        patch = tuple(spec.patch_size)
        model_spacing = tuple(spec.spacing) if spec.spacing is not None else None
        if spec.spatial_dims == 2:
            patch = (1, *patch)
            model_spacing = None if model_spacing is None else (spacing[0], *model_spacing)
        low, high = prompt.bounds()
        centre = (low + high) // 2
        holding = holding or tuple(slice(int(c), int(c) + 1) for c in centre)
        box = []
        for c, p, s, n, m, h in zip(centre, patch, spacing, grid, model_spacing or spacing, holding):
            size = min(n, max(1, int(round(p * m / s)), h.stop - h.start))
            start = min(max(0, int(c) - size // 2), n - size)
            start = min(start, h.start)
            start = max(start, h.stop - size)
            box.append(slice(start, start + size))
        return tuple(box)  # type: ignore[return-value]

    def _normalised_image(self, image: np.ndarray) -> np.ndarray:
        """The image normalised as the model says, once per image (statistics of the whole image)."""
        from napari_medcl.preprocess import normalize

        if self._normalised is None or self._normalised_of != id(image):
            self._normalised = normalize(image, self.model.spec.normalization)
            self._normalised_of = id(image)
        return self._normalised


class _PromptedSession:
    """The prompt model as an InferenceSession over (image + prompt channels): ``run`` splits each window's
    channels and feeds them to the model's two inputs. Its spec asks for no normalisation (the image part
    is already normalised, the prompt part never is) and no label rule (``NetworkRefiner.answer`` applies it
    with the whole image's mask)."""

    def __init__(self, model: InferenceSession):
        self.model = model
        spec = model.spec
        self.channels = spec.in_channels
        self.spec: ModelSpec = dataclasses.replace(
            spec,
            in_channels=spec.in_channels + len(spec.prompts["channels"]),
            normalization={"kind": "none"},
            nonzero_is_foreground=False,
            uncertainty_maps=(),  # the session keeps its own error map; the maps would only cost time
            prompts=None,
            training_profile=None,
            features=None,  # a patch around a click is not a scan to judge
        )

    @property
    def provider(self) -> str:
        return self.model.provider

    @property
    def path(self) -> Path | None:
        return self.model.path

    @property
    def sha256(self) -> str | None:
        return self.model.sha256

    def run(self, batch: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        probabilities, _ = self.model.run(batch[:, : self.channels], batch[:, self.channels :])
        return probabilities, None


def _seed(
    labels: np.ndarray, probabilities: np.ndarray, prompts: Sequence[Prompt], origin: np.ndarray
) -> None:
    """Hard seeds, in place: every point's and scribble's own voxels (inside ``labels``, a region whose first
    voxel is ``origin``) end with what the user said there, later prompts last: a positive prompt's class, or
    for a negative one the network's likeliest other class where it still says that class. The network is
    asked to follow the clicks, not forced; a voxel the user clicked must not stay wrong (and a simulated or
    real user would otherwise click it again)."""
    for prompt in prompts:
        if prompt.kind == "box":
            continue
        local = prompt.voxels - origin
        inside = np.all((local >= 0) & (local < np.asarray(labels.shape)), axis=1)
        at = tuple(local[inside].T)
        if not inside.any():
            continue
        if prompt.positive:
            labels[at] = prompt.label
        else:
            others = probabilities[(slice(None), *at)].copy()
            others[prompt.label] = -1.0
            labels[at] = np.where(labels[at] == prompt.label, others.argmax(axis=0), labels[at])


def _connected_changes(new: np.ndarray, old: np.ndarray, prompt: Prompt, box: Box) -> np.ndarray:
    """``new`` where its changes from ``old`` are connected (faces touching) to a voxel of ``prompt``, else
    ``old``: the network's answer to this prompt, without the far disagreements it has with the labels."""
    from scipy import ndimage

    changed = new != old
    components, _ = ndimage.label(changed)
    origin = np.array([b.start for b in box])
    voxels = [
        tuple(v - origin) for v in prompt.voxels if all(0 <= i < n for i, n in zip(v - origin, new.shape))
    ]
    touched = {int(components[v]) for v in voxels} - {0}
    return np.where(np.isin(components, list(touched)), new, old)


def _uses_mask(spec: ModelSpec) -> bool:
    norm = spec.normalization
    entries = norm["channels"] if norm.get("kind") == "per_channel" else [norm]
    return any(entry.get("use_nonzero_mask", False) for entry in entries)


def _volume(array: np.ndarray, spacing: tuple[float, ...]) -> Any:
    from napari_medcl.volume import Volume

    d = len(spacing)
    return Volume(array, spacing, (0.0,) * d, np.eye(d), channel_axis=True)

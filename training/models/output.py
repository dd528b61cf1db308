"""What every segmentation network returns, and what it tells about its feature maps."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch
from torch import Tensor, nn

__all__ = ["ProjectionInput", "SegmentationOutput", "TapInfo"]


@dataclass(frozen=True)
class ProjectionInput:
    """The CCDC projection head and the feature map it reads, so the embedding is computed only where needed.

    features: (B, C, *S_e) the decoder feature the head reads, cropped to the embedding grid, with gradient.
    head: the model's ``ProjectionHead`` (``forward``, ``hidden``, ``readout``, ``at``): per pixel, no statistics
        across pixels, so evaluating it at a few pixels gives exactly the dense values there.

    This is what ``training.losses.ccdc`` reads (its ``ProjectedEmbedding``): the keys through ``readout``
    (detached, no (B, E, *S_e) map), the queries through ``at`` (with gradient, at the sampled pixels only).
    """

    features: Tensor
    head: nn.Module

    @property
    def shape(self) -> torch.Size:
        """(B, E, *S_e), the shape of the dense embedding."""
        channels = self.head.readout()[0].shape[0]
        return torch.Size((self.features.shape[0], channels, *self.features.shape[2:]))

    def embedding(self) -> Tensor:
        """The dense embedding (B, E, *S_e), not normalised, with gradient: a full pass of the head."""
        return self.head(self.features)

    def readout(self) -> tuple[Tensor, Tensor, Tensor]:
        """Detached ``(hidden (B, C, *S_e), weight (E, C), bias (E,))``: the embedding of every pixel is
        ``weight @ hidden + bias``. Runs the head's k^d conv densely, without gradient."""
        with torch.no_grad():
            weight, bias = self.head.readout()
            return self.head.hidden(self.features.detach()), weight.detach(), bias.detach()

    def at(self, flat_index: Tensor) -> Tensor:
        """Embeddings at flat (B, *S_e) pixel indices, with gradient: (...) int64 -> (..., E)."""
        return self.head.at(self.features, flat_index)


@dataclass
class SegmentationOutput:
    """Result of ``model(image)`` for ``image`` (B, C_in, *S).

    logits: (B, K, *S) at input resolution.
    deep_supervision: lower-resolution logits (B, K, *ceil(S / stride_l)), finest first; [] when off.
    taps: name -> (B, C_l, *ceil(S / stride_l)) feature maps PDCR reads (``model.tap_info`` describes them);
        {} when ``model.return_features`` is False.
    uncertainty: UAFR name -> (B, 1, *ceil(S / stride_l)) normalised entropy in [0, 1], not detached, in
        ``model.uncertainty_names`` order.
    projection: the CCDC projection head with its input feature (``ProjectionInput``); None when the model
        has no head or when ``model.return_features`` is False. CCDC takes this, not ``embedding``.
    embedding (attribute): (B, E, *S_e) projection-head output, not normalised, with gradient; None when
        ``projection`` is None. Computed on first access (a dense pass of the head, then cached), so a training
        step whose loss reads only ``projection`` never pays for it.
    """

    logits: Tensor
    deep_supervision: list[Tensor]
    taps: dict[str, Tensor]
    uncertainty: dict[str, Tensor]
    projection: ProjectionInput | None = None

    @cached_property
    def embedding(self) -> Tensor | None:
        return None if self.projection is None else self.projection.embedding()


@dataclass(frozen=True)
class TapInfo:
    """A tapped feature map: channels, stride (input voxels per tap voxel, array order) and receptive field
    (per axis, in input voxels), both computed from the architecture by ``receptive_field.py``.

    A tap has ``ceil(S / stride)`` voxels per axis. Tap voxel ``i`` sits on input voxel
    ``i * stride + center_offset`` (same-padding convs and aligned skips give offset 0, the default, in every
    model here); the exact per-voxel field of any tap, decoder taps included, is
    ``model.tap_geometry[name].box(index)``.
    """

    channels: int
    stride: tuple[int, ...]
    receptive_field: tuple[int, ...]
    center_offset: tuple[int, ...] | None = None

    @property
    def offset(self) -> tuple[int, ...]:
        return self.center_offset if self.center_offset is not None else (0,) * len(self.stride)

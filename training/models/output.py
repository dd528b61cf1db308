"""What every segmentation network returns, and what it tells about its feature maps."""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

__all__ = ["SegmentationOutput", "TapInfo"]


@dataclass
class SegmentationOutput:
    """Result of ``model(image)`` for ``image`` (B, C_in, *S).

    logits: (B, K, *S) at input resolution.
    deep_supervision: lower-resolution logits (B, K, *ceil(S / stride_l)), finest first; [] when off.
    taps: name -> (B, C_l, *ceil(S / stride_l)) feature maps PDCR reads (``model.tap_info`` describes them);
        {} when ``model.return_features`` is False.
    embedding: (B, E, *S_e) projection-head output for CCDC, not normalised; None when off or when
        ``model.return_features`` is False.
    uncertainty: UAFR name -> (B, 1, *ceil(S / stride_l)) normalised entropy in [0, 1], not detached, in
        ``model.uncertainty_names`` order.
    """

    logits: Tensor
    deep_supervision: list[Tensor]
    taps: dict[str, Tensor]
    embedding: Tensor | None
    uncertainty: dict[str, Tensor]


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

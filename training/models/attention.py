"""Attention blocks that can take UAFR's place (paper A's comparison, Table VIII and Fig. 6): SE and CBAM.

Both are built from ``spatial_dims`` (one code path for 2D and 3D) and keep UAFR's interface:
``forward(x) -> (x', None)``, where None says the block has no uncertainty map (``gives_uncertainty`` False,
so the model neither stores nor exports one). :func:`create_attention` builds the block a config names.

SE (Hu et al.): global average pool -> FC (C -> C/r) -> ReLU -> FC (C/r -> C) -> sigmoid, a per-channel gain.
CBAM (Woo et al.): the channel gate from average- and max-pooled descriptors through one shared MLP, then a
spatial gate, conv k over the channel-wise mean and max maps -> sigmoid, a per-voxel gain.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from training.models.blocks import check_spatial_dims, conv
from training.models.receptive_field import Geometry
from training.models.uafr import UAFR

__all__ = ["CBAM", "ATTENTION_BLOCKS", "SqueezeExcitation", "create_attention"]

ATTENTION_BLOCKS = ("uafr", "se", "cbam")


def _mlp(channels: int, reduction: int) -> nn.Sequential:
    hidden = max(1, channels // reduction)
    # on the pooled (B, C) descriptor, so the same layers serve 2D and 3D
    return nn.Sequential(nn.Flatten(1), nn.Linear(channels, hidden), nn.ReLU(), nn.Linear(hidden, channels))


def _view_gain(gain: Tensor, x: Tensor) -> Tensor:
    """(B, C) -> (B, C, 1, ...) broadcastable over x (B, C, *S)."""
    return gain.view(*gain.shape, *([1] * (x.ndim - 2)))


class SqueezeExcitation(nn.Module):
    """SE block: x (B, C, *S) -> (x * sigmoid(FC(ReLU(FC(mean_S x)))), None)."""

    gives_uncertainty = False

    def __init__(self, channels: int, spatial_dims: int, reduction: int = 16):
        super().__init__()
        check_spatial_dims(spatial_dims)
        self.mlp = _mlp(channels, reduction)

    def forward(self, x: Tensor) -> tuple[Tensor, None]:
        squeezed = x.mean(dim=tuple(range(2, x.ndim)))  # (B, C)
        return x * _view_gain(self.mlp(squeezed).sigmoid(), x), None

    def propagate_geometry(self, geometry: Geometry) -> Geometry:
        # A global pooling branch is not counted (receptive_field.py's rule, as for ASPP's image pooling).
        return geometry


class CBAM(nn.Module):
    """CBAM block: channel gate then spatial gate; x (B, C, *S) -> (x', None)."""

    gives_uncertainty = False

    def __init__(self, channels: int, spatial_dims: int, reduction: int = 16, kernel_size: int = 7):
        super().__init__()
        check_spatial_dims(spatial_dims)
        self.kernel_size = kernel_size
        self.mlp = _mlp(channels, reduction)
        self.spatial = conv(spatial_dims, 2, 1, kernel_size, bias=False)

    def forward(self, x: Tensor) -> tuple[Tensor, None]:
        axes = tuple(range(2, x.ndim))
        channel = self.mlp(x.mean(dim=axes)) + self.mlp(x.amax(dim=axes))  # (B, C)
        x = x * _view_gain(channel.sigmoid(), x)
        pooled = [x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)]  # 2 x (B, 1, *S)
        gate = self.spatial(torch.cat(pooled, dim=1)).sigmoid()  # (B, 1, *S)
        return x * gate, None

    def propagate_geometry(self, geometry: Geometry) -> Geometry:
        # The spatial gate's conv reads a k-neighbourhood; the channel gate is global pooling (not counted).
        k = self.kernel_size
        return geometry.merge(geometry.conv(k, 1, k // 2, 1))


def create_attention(
    kind: str,
    channels: int,
    spatial_dims: int,
    *,
    m: int = 2,
    hidden: int = 16,
    kernel_size: int | tuple[int, ...] = 3,
    norm: str = "batch",
    use_f: bool = True,
) -> nn.Module:
    """The block at one UAFR site: "uafr" (with its options), "se" or "cbam" (which ignore them)."""
    if kind == "uafr":
        return UAFR(channels, spatial_dims, m, hidden, kernel_size, norm, use_f=use_f)
    if kind == "se":
        return SqueezeExcitation(channels, spatial_dims)
    if kind == "cbam":
        return CBAM(channels, spatial_dims)
    raise ValueError(f"attention block must be one of {', '.join(ATTENTION_BLOCKS)}, got {kind!r}")

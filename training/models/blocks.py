"""Layer factories keyed by ``spatial_dims`` (2 or 3) so one network definition serves 2D and 3D.

Also the two spatial helpers every model uses to accept any input size: ``pad_to_multiple`` (zeros at the high
end of each axis, so voxel indices keep their meaning) and ``crop_to_grid`` (cut a stride-``s`` map back to the
``ceil(S / s)`` units that cover the unpadded input). Both compute their sizes from tensor shapes, so a
TorchScript-traced ONNX export keeps them dynamic.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "ConvNormAct",
    "activation",
    "as_tuple",
    "check_spatial_dims",
    "conv",
    "crop_to_grid",
    "dropout",
    "max_pool",
    "norm",
    "pad_to_multiple",
    "transposed_conv",
]

NORMS = ("instance", "batch", "group")
ACTIVATIONS = ("leakyrelu", "relu")


def check_spatial_dims(spatial_dims: int) -> int:
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims!r}")
    return spatial_dims


def as_tuple(value: int | Sequence[int], spatial_dims: int, name: str = "value") -> tuple[int, ...]:
    """``3 -> (3, 3[, 3])``; a sequence must have one positive int per spatial axis."""
    if isinstance(value, int):
        out = (value,) * spatial_dims
    else:
        out = tuple(int(v) for v in value)
        if len(out) != spatial_dims:
            raise ValueError(f"{name} must have {spatial_dims} entries (one per spatial axis), got {value!r}")
    if any(v < 1 for v in out):
        raise ValueError(f"{name} must be positive, got {value!r}")
    return out


def conv(
    spatial_dims: int,
    in_channels: int,
    out_channels: int,
    kernel_size: int | Sequence[int] = 3,
    stride: int | Sequence[int] = 1,
    dilation: int | Sequence[int] = 1,
    bias: bool = True,
) -> nn.Module:
    """Conv with "same" padding (odd kernels only), so the output has ``ceil(S / stride)`` voxels per axis."""
    k = as_tuple(kernel_size, check_spatial_dims(spatial_dims), "kernel_size")
    if any(v % 2 == 0 for v in k):
        raise ValueError(f"kernel sizes must be odd for symmetric padding, got {kernel_size!r}")
    d = as_tuple(dilation, spatial_dims, "dilation")
    padding = tuple(di * (ki - 1) // 2 for ki, di in zip(k, d))
    cls = nn.Conv2d if spatial_dims == 2 else nn.Conv3d
    return cls(in_channels, out_channels, k, as_tuple(stride, spatial_dims, "stride"), padding, d, bias=bias)


def transposed_conv(
    spatial_dims: int, in_channels: int, out_channels: int, stride: int | Sequence[int], bias: bool = True
) -> nn.Module:
    """Transposed conv with kernel = stride (nnU-Net): each output voxel reads exactly one input voxel."""
    s = as_tuple(stride, check_spatial_dims(spatial_dims), "stride")
    cls = nn.ConvTranspose2d if spatial_dims == 2 else nn.ConvTranspose3d
    return cls(in_channels, out_channels, s, s, bias=bias)


def norm(kind: str, spatial_dims: int, channels: int) -> nn.Module:
    """``instance`` (affine, no running stats), ``batch``, or ``group`` (gcd(channels, 8) groups)."""
    check_spatial_dims(spatial_dims)
    if kind == "instance":
        return (nn.InstanceNorm2d if spatial_dims == 2 else nn.InstanceNorm3d)(channels, affine=True)
    if kind == "batch":
        return (nn.BatchNorm2d if spatial_dims == 2 else nn.BatchNorm3d)(channels)
    if kind == "group":
        return nn.GroupNorm(math.gcd(channels, 8), channels)
    raise ValueError(f"norm must be one of {NORMS}, got {kind!r}")


def activation(kind: str = "leakyrelu") -> nn.Module:
    # Not in-place: UAFR multiplies activations it also differentiates through, and export prefers pure ops.
    if kind == "leakyrelu":
        return nn.LeakyReLU(0.01)
    if kind == "relu":
        return nn.ReLU()
    raise ValueError(f"activation must be one of {ACTIVATIONS}, got {kind!r}")


def dropout(spatial_dims: int, p: float) -> nn.Module:
    """Channel dropout (``Dropout2d``/``Dropout3d``); ``p == 0`` gives ``Identity``."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"dropout probability must be in [0, 1), got {p!r}")
    if p == 0.0:
        return nn.Identity()
    return (nn.Dropout2d if check_spatial_dims(spatial_dims) == 2 else nn.Dropout3d)(p)


def max_pool(spatial_dims: int, kernel_size: int, stride: int, padding: int) -> nn.Module:
    return (nn.MaxPool2d if check_spatial_dims(spatial_dims) == 2 else nn.MaxPool3d)(
        kernel_size, stride, padding
    )


class ConvNormAct(nn.Sequential):
    """conv (no bias: the norm's shift replaces it) -> norm -> activation [-> dropout]."""

    def __init__(
        self,
        spatial_dims: int,
        in_channels: int,
        out_channels: int,
        kernel_size: int | Sequence[int] = 3,
        stride: int | Sequence[int] = 1,
        dilation: int | Sequence[int] = 1,
        norm_kind: str = "instance",
        activation_kind: str = "leakyrelu",
        dropout_p: float = 0.0,
    ):
        layers = [
            conv(spatial_dims, in_channels, out_channels, kernel_size, stride, dilation, bias=False),
            norm(norm_kind, spatial_dims, out_channels),
            activation(activation_kind),
        ]
        if dropout_p > 0:
            layers.append(dropout(spatial_dims, dropout_p))
        super().__init__(*layers)


def pad_to_multiple(x: Tensor, divisor: Sequence[int]) -> Tensor:
    """(B, C, *S) -> (B, C, *S') with S' the next multiple of ``divisor``; zeros added at the high end."""
    spatial = x.shape[2:]
    pads: list[int] = []
    for size, d in zip(reversed(spatial), reversed(divisor)):  # F.pad lists the last axis first
        pads += [0, (d - size % d) % d]
    return F.pad(x, pads)


def crop_to_grid(x: Tensor, spatial: Sequence[int] | torch.Size, stride: Sequence[int]) -> Tensor:
    """(B, C, *S_l) -> (B, C, *ceil(spatial / stride)): the units whose grid point lies inside the input."""
    index = (slice(None), slice(None), *(slice(0, (size + s - 1) // s) for size, s in zip(spatial, stride)))
    return x[index]

"""Receptive field and stride of feature maps, computed from the module structure (paper A, Eqs. 5-7).

Model of one spatial axis. A feature map is a grid of units; unit ``i`` sits on a grid whose spacing in the
input is the *jump* ``j`` (input voxels per unit, the tap's stride) and it depends on the input voxels

    [i * j + start[i % P], i * j + end[i % P]]        (inclusive, in input voxel indices, array order)

where ``start``/``end`` are offsets that repeat with period ``P``. A chain of convolutions keeps ``P = 1`` and
reproduces Eqs. 5-7: a layer with kernel ``k``, stride ``s``, padding ``p`` and dilation ``d`` maps
``start -> start - p * j`` and ``end -> end + (d * (k - 1) - p) * j``, so the size grows by
``(d * (k - 1)) * j`` = ``(k_eff - 1) * prod(previous strides)`` (Eq. 7 with the effective kernel
``k_eff = d * (k - 1) + 1``), and ``j -> j * s``.

Upsampling (transposed convolution, nearest or linear resizing) makes the set of inputs depend on the output
position modulo the upsampling factor, hence the period ``P``. Where two paths meet (skip concatenation,
residual addition, UAFR's gate) the dependence is the union, so starts take the minimum and ends the maximum.

**Rule for decoder taps** (documented choice): the receptive field of a tap is the largest extent over all
positions of its grid, ``max_p (end[p] - start[p] + 1)``: the span from the first to the last input voxel that
reaches the unit along any path, transposed convolutions included. For encoder taps ``P = 1`` and this is
exactly Eq. 7. Borders are ignored (units near the image border have their field clipped by zero padding),
and a global pooling branch (the ASPP image-pooling branch) is not counted: it makes every unit depend on the
whole image, which no finite patch can describe; the reported field is that of the local paths.

Modules describe themselves to ``propagate_geometry``: convolutions, pooling and transposed convolutions are
read from their attributes, ``nn.Sequential`` is folded, pointwise layers (norms, activations, dropout) pass
the geometry through, and composite blocks implement ``propagate_geometry(self, geometry) -> Geometry``.
Anything else raises, so a new block cannot silently get a wrong field.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from torch import nn

__all__ = ["AxisGeometry", "Geometry", "propagate_geometry"]


def _lcm(a: int, b: int) -> int:
    return a * b // math.gcd(a, b)


@dataclass(frozen=True)
class AxisGeometry:
    """Geometry of one spatial axis: jump (stride in input voxels) and per-phase field offsets."""

    jump: int
    starts: tuple[int, ...]
    ends: tuple[int, ...]

    def __post_init__(self) -> None:
        if self.jump < 1 or len(self.starts) != len(self.ends) or not self.starts:
            raise ValueError(f"invalid axis geometry {self}")

    @property
    def period(self) -> int:
        return len(self.starts)

    @property
    def receptive_field(self) -> int:
        """Largest field extent over grid positions (the documented rule for decoder taps)."""
        return max(e - s + 1 for s, e in zip(self.starts, self.ends))

    def box(self, index: int) -> tuple[int, int]:
        """Input voxel range ``(first, last)``, inclusive, that unit ``index`` depends on (borders ignored)."""
        phase = index % self.period
        return index * self.jump + self.starts[phase], index * self.jump + self.ends[phase]

    def conv(self, kernel: int, stride: int, padding: int, dilation: int) -> AxisGeometry:
        """Convolution or pooling window: output unit ``i`` reads units ``i*s - p + d*t``, ``t < k``."""
        period = self.period // math.gcd(self.period, stride)
        jump = self.jump * stride
        starts, ends = [], []
        for i in range(period):
            spans = [self.box(i * stride - padding + dilation * t) for t in range(kernel)]
            starts.append(min(s for s, _ in spans) - i * jump)
            ends.append(max(e for _, e in spans) - i * jump)
        return AxisGeometry(jump, tuple(starts), tuple(ends))

    def upsample(self, factor: int, sources: Sequence[Sequence[int]]) -> AxisGeometry:
        """Upsampling by ``factor``; ``sources[r]`` lists the input units read by output ``o = q * factor + r``.

        The units are given as offsets from ``q``. Covers transposed convolutions and nearest/linear resizing.
        """
        if self.jump % factor:
            raise ValueError(
                f"cannot upsample a grid of stride {self.jump} by {factor}: not an integer stride"
            )
        jump = self.jump // factor
        period = self.period * factor
        starts, ends = [], []
        for o in range(period):
            q, r = divmod(o, factor)
            if not sources[r]:
                raise ValueError(f"upsampling leaves output phase {r} of {factor} without input")
            spans = [self.box(q + off) for off in sources[r]]
            starts.append(min(s for s, _ in spans) - o * jump)
            ends.append(max(e for _, e in spans) - o * jump)
        return AxisGeometry(jump, tuple(starts), tuple(ends))

    def merge(self, other: AxisGeometry) -> AxisGeometry:
        """Union of two paths on the same grid (concatenation, addition, gating)."""
        if other.jump != self.jump:
            raise ValueError(f"cannot merge grids of stride {self.jump} and {other.jump}")
        period = _lcm(self.period, other.period)
        starts = tuple(
            min(self.starts[p % self.period], other.starts[p % other.period]) for p in range(period)
        )
        ends = tuple(max(self.ends[p % self.period], other.ends[p % other.period]) for p in range(period))
        return AxisGeometry(self.jump, starts, ends)


def _per_axis(value: int | Sequence[int], n: int) -> tuple[int, ...]:
    return (int(value),) * n if isinstance(value, int) else tuple(int(v) for v in value)


def _transposed_sources(kernel: int, stride: int, padding: int, dilation: int) -> list[list[int]]:
    # Output o = u*s - p + d*t  =>  u = (o + p - d*t) / s when divisible; written relative to q = o // s.
    sources = []
    for r in range(stride):
        offs = sorted(
            {
                (r + padding - dilation * t) // stride
                for t in range(kernel)
                if (r + padding - dilation * t) % stride == 0
            }
        )
        sources.append(offs)
    return sources


def _resize_sources(factor: int, mode: str, align_corners: bool | None) -> list[list[int]]:
    if mode == "nearest":
        return [[0] for _ in range(factor)]
    if mode in ("linear", "bilinear", "trilinear") and not align_corners:
        sources = []
        for r in range(factor):
            # Source coordinate (o + 0.5) / f - 0.5 relative to q = o // f; both neighbours unless exact.
            src = (r + 0.5) / factor - 0.5
            lo = math.floor(src)
            sources.append([lo] if src == lo else [lo, lo + 1])
        return sources
    raise ValueError(
        f"receptive field of resize mode {mode!r} (align_corners={align_corners}) is not supported"
    )


@dataclass(frozen=True)
class Geometry:
    """Per-axis geometry of a feature map relative to the network input (array order)."""

    axes: tuple[AxisGeometry, ...]

    @classmethod
    def identity(cls, spatial_dims: int) -> Geometry:
        """Geometry of the input itself: stride 1, field 1."""
        return cls(tuple(AxisGeometry(1, (0,), (0,)) for _ in range(spatial_dims)))

    @property
    def stride(self) -> tuple[int, ...]:
        return tuple(a.jump for a in self.axes)

    @property
    def receptive_field(self) -> tuple[int, ...]:
        return tuple(a.receptive_field for a in self.axes)

    def box(self, index: Sequence[int]) -> tuple[tuple[int, int], ...]:
        """Per-axis inclusive input range that the unit at ``index`` depends on."""
        return tuple(a.box(i) for a, i in zip(self.axes, index))

    def conv(self, kernel, stride=1, padding=0, dilation=1) -> Geometry:
        n = len(self.axes)
        k, s, p, d = (_per_axis(v, n) for v in (kernel, stride, padding, dilation))
        return Geometry(tuple(a.conv(*args) for a, *args in zip(self.axes, k, s, p, d)))

    def transposed_conv(self, kernel, stride, padding=0, dilation=1) -> Geometry:
        n = len(self.axes)
        k, s, p, d = (_per_axis(v, n) for v in (kernel, stride, padding, dilation))
        return Geometry(
            tuple(
                a.upsample(si, _transposed_sources(ki, si, pi, di))
                for a, ki, si, pi, di in zip(self.axes, k, s, p, d)
            )
        )

    def resize(self, factor, mode: str, align_corners: bool | None = None) -> Geometry:
        """Resizing by an integer ``factor`` with ``F.interpolate(scale_factor=factor, mode=mode)``."""
        f = _per_axis(factor, len(self.axes))
        return Geometry(
            tuple(a.upsample(fi, _resize_sources(fi, mode, align_corners)) for a, fi in zip(self.axes, f))
        )

    def merge(self, *others: Geometry) -> Geometry:
        axes = self.axes
        for other in others:
            axes = tuple(a.merge(b) for a, b in zip(axes, other.axes))
        return Geometry(axes)


_POINTWISE = (
    nn.Identity,
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.GroupNorm,
    nn.ReLU,
    nn.LeakyReLU,
    nn.Dropout,
    nn.Dropout2d,
    nn.Dropout3d,
)


def propagate_geometry(module: nn.Module, geometry: Geometry) -> Geometry:
    """Geometry of ``module``'s output given the geometry of its input.

    Instance and group norms are treated as pointwise: their statistics span the whole map, but the paper's
    receptive field (Eqs. 5-7) counts only the sliding windows, as we do.
    """
    custom = getattr(module, "propagate_geometry", None)
    if custom is not None:
        return custom(geometry)
    if isinstance(module, (nn.Conv2d, nn.Conv3d)):
        return geometry.conv(module.kernel_size, module.stride, module.padding, module.dilation)
    if isinstance(module, (nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool2d, nn.AvgPool3d)):
        return geometry.conv(
            module.kernel_size, module.stride, module.padding, getattr(module, "dilation", 1)
        )
    if isinstance(module, (nn.ConvTranspose2d, nn.ConvTranspose3d)):
        return geometry.transposed_conv(module.kernel_size, module.stride, module.padding, module.dilation)
    if isinstance(module, nn.Sequential):
        for child in module:
            geometry = propagate_geometry(child, geometry)
        return geometry
    if isinstance(module, _POINTWISE):
        return geometry
    raise TypeError(
        f"cannot compute the receptive field through {type(module).__name__}: "
        "give it a propagate_geometry(geometry) method"
    )

"""PDCR: patch-dragsaw contrastive regularization (Liu et al., IEEE TMI; paper A, Sec. III, Eqs. 3-12).

Every sampled feature vector v_i stands for a patch p_i of the label map around v_i's image-space centre.
The class fractions of the patch, phi_i (Eq. 4), give the soft affinity of a pair
w_ij = 1 - mean_m |phi_i^m - phi_j^m| (Eq. 3), and the loss (Eq. 9)

    l_ij = -log( exp(s_ij * w_ij / tau) / sum_n exp(s_in * (1 - w_in) / tau) ),   s = cos(v_i, v_j),

pulls pairs of similar composition together and pushes pairs of different composition apart.
H-PDCR uses a fixed patch series (5, 7, 9) and averages the loss over it; RF-PDCR uses the tap's true
receptive field. Cross-layer terms compare two taps at the same image positions after a learned projection.

Deliberate differences from the authors' released code (see docs/methods.md section 5 of the shared notes):
the paper's sign (the 2D code swaps numerator and denominator weights); rows and columns are never swapped;
each tap maps to the image with its own stride (also in cross-layer terms); a true d-dimensional grid (no
flat-index striding that collapses onto one column); phi over all M classes including background. By default
the loss is Eq. 9 as printed (``form="paper"``, no shift: |s w / tau| <= 1 / tau keeps exp() finite in fp32);
``form="authors"`` reproduces the code's shifted similarity, which is not equivalent (see dragsaw_loss). The
reduction over b, i, j is the mean (3D code) or the sum (2D code). Every ablation of the paper's Tables V-VI
and Fig. 5 is an option of PDCRLoss (docs/methods.md maps them).

Conventions: B batch, C channels, N sampled vectors, M classes, P window sizes, d spatial dims (2 or 3),
S image spatial shape, S_l tap spatial shape. Coordinates are voxel indices in array order (row, col) or
(depth, row, col). Labels never need a gradient; every label-side tensor is computed under no_grad.
"""

from __future__ import annotations

import itertools
import math
import operator
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from training.config import PDCRConfig

if TYPE_CHECKING:
    from training.models import TapInfo

__all__ = [
    "PDCRLoss",
    "PDCRTerms",
    "affinity",
    "center_affinity",
    "dice_affinity",
    "dragsaw_loss",
    "foreground_ratios",
    "nearest_cells",
    "pair_affinity",
    "rf_window",
    "sample_grid_positions",
    "tap_centers",
    "window_labels",
]


# --------------------------------------------------------------------------------------------------
# label side: class fractions in windows


def _odd_sizes(size: int | Sequence[int], d: int, what: str) -> tuple[int, ...]:
    """Normalise an odd window size (int or one per axis) to a d-tuple, or raise ValueError."""
    try:
        sizes = (
            (operator.index(size),) * d
            if not isinstance(size, Sequence)
            else tuple(map(operator.index, size))
        )
    except TypeError:
        raise ValueError(f"{what} must be an odd positive int or {d} of them, got {size!r}") from None
    if len(sizes) != d or any(s < 1 or s % 2 == 0 for s in sizes):
        raise ValueError(f"{what} must be an odd positive int or {d} of them, got {size!r}")
    return sizes


def _check_labels(labels: Tensor, num_classes: int) -> None:
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"labels must be an integer tensor of class ids, got dtype {labels.dtype}")
    if labels.ndim < 2:
        raise ValueError(f"labels must have shape (B, *S), got shape {tuple(labels.shape)}")
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if labels.numel() == 0:
        raise ValueError(f"labels is empty: shape {tuple(labels.shape)}")
    low, high = (int(v) for v in torch.aminmax(labels))
    if low < 0 or high >= num_classes:
        raise ValueError(
            f"label values must lie in [0, {num_classes - 1}] for num_classes={num_classes}, "
            f"found values in [{low}, {high}]"
        )


def _class_integral(labels: Tensor, num_classes: int) -> Tensor:
    """Summed-volume table of the one-hot labels.

    labels (B, *S) integer in [0, M) -> (B, M, *(S + 1)) integer, entry [b, m, i_1..i_d] = number of voxels of
    class m in labels[b, :i_1, ..., :i_d]. Exact integer counts, so window fractions cost O(2^d) per window
    whatever the window size (RF windows reach 47^3 and beyond, where pooling would cost O(k^d) per voxel).
    """
    d = labels.ndim - 1
    dtype = torch.int32 if labels[0].numel() < 2**31 else torch.int64
    classes = torch.arange(num_classes, device=labels.device).view(1, num_classes, *([1] * d))
    counts = (labels.unsqueeze(1) == classes).to(dtype)
    for axis in range(2, 2 + d):
        counts = counts.cumsum(axis, dtype=dtype)
    table = counts.new_zeros((*counts.shape[:2], *(s + 1 for s in counts.shape[2:])))
    table[(slice(None), slice(None), *([slice(1, None)] * d))] = counts
    return table


def _window_bounds(
    centers: Tensor, sizes: Sequence[int], image_shape: Sequence[int]
) -> tuple[Tensor, Tensor]:
    """centers (..., d) -> (lo, hi) (..., d): the window [lo, hi) clipped to the image, per axis."""
    half = torch.tensor([s // 2 for s in sizes], dtype=torch.int64, device=centers.device)
    extent = torch.tensor(list(image_shape), dtype=torch.int64, device=centers.device)
    lo = (centers - half).clamp(min=0)
    hi = torch.minimum(centers + half + 1, extent)
    return lo, hi


def _window_fractions(table: Tensor, centers: Tensor, sizes: Sequence[int]) -> Tensor:
    """Class fractions from a summed-volume table.

    table (B, M, *(S + 1)) from _class_integral, centers (B, N, d) int64 inside the image, sizes d odd ints
    -> (B, N, M) float32: counts over the window's inside voxels divided by the number of inside voxels.
    """
    batch, num_classes = table.shape[:2]
    d = centers.shape[-1]
    lo, hi = _window_bounds(centers, sizes, [s - 1 for s in table.shape[2:]])
    # inclusion-exclusion over the 2^d corners of the box: + for an even number of lower corners
    bits = torch.tensor(list(itertools.product((0, 1), repeat=d)), dtype=torch.bool, device=table.device)
    signs = 1 - 2 * ((d - bits.sum(-1)) % 2)  # (2^d,)
    corners = torch.where(bits, hi.unsqueeze(2), lo.unsqueeze(2))  # (B, N, 2^d, d)
    strides = torch.tensor(table.stride()[2:], dtype=torch.int64, device=table.device)
    flat = (corners * strides).sum(-1)  # (B, N, 2^d)
    n = centers.shape[1]
    gathered = table.flatten(2).gather(2, flat.flatten(1).unsqueeze(1).expand(batch, num_classes, -1))
    sums = (gathered.view(batch, num_classes, n, 2**d).to(torch.int64) * signs.to(torch.int64)).sum(-1)
    inside = (hi - lo).prod(-1)  # (B, N)
    return (sums.to(torch.float32) / inside.unsqueeze(1).to(torch.float32)).transpose(1, 2)


def foreground_ratios(labels: Tensor, centers: Tensor, size: int | Sequence[int], num_classes: int) -> Tensor:
    """Class fractions phi (Eq. 4) of windows centred at given voxels.

    Args:
        labels: (B, *S) integer class ids in [0, num_classes), at input resolution.
        centers: (B, N, d) integer voxel indices in array order, each inside the image.
        size: odd window side, one int for all axes or one per axis.
        num_classes: M, background included.

    Returns:
        (B, N, M) float32; entry [b, i, m] = voxels of class m in the window / voxels of the window that lie
        inside the image (windows at the border are not zero-padded), so every row sums to 1.
    """
    _check_labels(labels, num_classes)
    d = labels.ndim - 1
    if centers.ndim != 3 or centers.shape[0] != labels.shape[0] or centers.shape[2] != d:
        raise ValueError(
            f"centers must have shape (B, N, {d}) for labels of shape {tuple(labels.shape)}, "
            f"got {tuple(centers.shape)}"
        )
    if centers.dtype.is_floating_point or centers.dtype == torch.bool:
        raise ValueError(f"centers must be integer voxel indices, got dtype {centers.dtype}")
    sizes = _odd_sizes(size, d, "size")
    centers = centers.to(device=labels.device, dtype=torch.int64)
    extent = torch.tensor(labels.shape[1:], device=labels.device)
    if centers.numel() and (bool((centers < 0).any()) or bool((centers >= extent).any())):
        raise ValueError(
            f"centers must lie inside the image of spatial shape {tuple(labels.shape[1:])}, "
            f"got values in [{int(centers.min())}, {int(centers.max())}]"
        )
    with torch.no_grad():
        return _window_fractions(_class_integral(labels, num_classes), centers, sizes)


# --------------------------------------------------------------------------------------------------
# the loss kernels


def affinity(phi_a: Tensor, phi_b: Tensor) -> Tensor:
    """Affinity score (Eq. 3): w_ij = 1 - (1/M) sum_m |phi_a[i, m] - phi_b[j, m]|, background included.

    phi_a (B, N, M), phi_b (B, N', M) -> (B, N, N') float32 in [0, 1] when the rows are fractions.
    """
    if (
        phi_a.ndim != 3
        or phi_b.ndim != 3
        or phi_a.shape[0] != phi_b.shape[0]
        or phi_a.shape[2] != phi_b.shape[2]
    ):
        raise ValueError(
            f"affinity needs phi_a (B, N, M) and phi_b (B, N', M) with the same B and M, "
            f"got {tuple(phi_a.shape)} and {tuple(phi_b.shape)}"
        )
    diff = phi_a.float().unsqueeze(2) - phi_b.float().unsqueeze(1)  # (B, N, N', M)
    return 1.0 - diff.abs().mean(-1)


FORMS = ("paper", "authors")
REDUCTIONS = ("mean", "sum", "none")
AFFINITIES = ("ratio", "l1", "l2", "dice", "constant", "rigid", "center")


def dragsaw_loss(
    sim: Tensor, w: Tensor, tau: float, *, form: str = "paper", reduction: str = "mean"
) -> Tensor:
    """Patch-dragsaw loss (Eq. 9) of one term.

    sim (B, N, N') cosine similarities, w (B, N, N') affinities, tau > 0 -> float32 scalar ("mean" over b, i, j,
    or "sum") or (B, N, N') ("none"). The numerator pair is not excluded from the denominator, as in Eq. 9.

    form "paper" (Eq. 9 as printed): l_ij = -s_ij w_ij / tau + logsumexp_n(s_in (1 - w_in) / tau). No shift is
    needed for stability: |s w / tau| <= 1 / tau.
    form "authors" (the released 3D code): S = s / tau is first shifted by its largest value over the whole
    tensor, S' = S - max(S) (not detached, as there), then l_ij = -S'_ij w_ij + logsumexp_n(S'_in (1 - w_in)).
    The shift does not cancel: it adds -(1 - w_in) max(S) inside the denominator's exponents (and a constant
    w_ij max(S) to the numerator's), so it re-weights the negatives. With self-pairs (single-layer terms) max(S)
    is 1 / tau; for cross-layer terms it is whatever the largest similarity is.
    """
    if sim.ndim != 3 or sim.shape != w.shape:
        raise ValueError(
            f"dragsaw_loss needs sim and w of the same shape (B, N, N'), got {tuple(sim.shape)} and {tuple(w.shape)}"
        )
    if not tau > 0:
        raise ValueError(f"tau must be > 0, got {tau}")
    if form not in FORMS:
        raise ValueError(f"form must be one of {FORMS}, got {form!r}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    with torch.autocast(device_type=sim.device.type, enabled=False):
        logits = sim.float() / tau
        if form == "authors":
            logits = logits - logits.max()
        w = w.float()
        pull = logits * w
        push = torch.logsumexp(logits * (1.0 - w), dim=-1, keepdim=True)
        loss = push - pull  # (B, N, N')
    if reduction == "none":
        return loss
    return loss.mean() if reduction == "mean" else loss.sum()


def pair_affinity(
    phi_a: Tensor, phi_b: Tensor, kind: str = "ratio", *, constant: float = 0.5, threshold: float = 0.5
) -> Tensor:
    """Affinity of every pair from class fractions: phi_a (B, N, M), phi_b (B, N', M) -> (B, N, N') float32.

    kind "ratio": Eq. 3, 1 - (1/M) sum_m |dphi_m| in [0, 1]. "l1": 1 - ||dphi||_1 and "l2": 1 - ||dphi||_2, the
    norms of the difference without the 1/M average (our reading of Table V a's "L1-norm" / "L2-norm"; in
    [-1, 1], negative for very different patches, as the authors' 3D code's sum without 1/M). "constant": every
    pair ``constant`` (Fig. 5). "rigid": 1 where the Eq. 3 affinity >= ``threshold``, else 0 (Fig. 5's rigid
    positive/negative pairs, within one image). The Dice and centre-label variants need the masks themselves:
    see :func:`dice_affinity` and :func:`center_affinity`.
    """
    if kind == "ratio":
        return affinity(phi_a, phi_b)
    if kind == "rigid":
        return (affinity(phi_a, phi_b) >= threshold).float()
    if kind == "constant":
        w = affinity(phi_a, phi_b)  # for its shape checks
        return torch.full_like(w, float(constant))
    if kind in ("l1", "l2"):
        affinity(phi_a, phi_b)  # shape checks
        diff = phi_a.float().unsqueeze(2) - phi_b.float().unsqueeze(1)  # (B, N, N', M)
        norm = diff.abs().sum(-1) if kind == "l1" else diff.pow(2).sum(-1).sqrt()
        return 1.0 - norm
    raise ValueError(f"affinity kind must be one of ratio, l1, l2, constant, rigid here, got {kind!r}")


def window_labels(labels: Tensor, centers: Tensor, sizes: Sequence[int]) -> Tensor:
    """The label window around each centre: labels (B, *S) int, centers (B, N, d) -> (B, N, V) int64 with
    V = prod(sizes), in raster order; voxels outside the image get the value -1 (no class)."""
    d = labels.ndim - 1
    if centers.ndim != 3 or centers.shape[0] != labels.shape[0] or centers.shape[2] != d or len(sizes) != d:
        raise ValueError(
            f"window_labels needs centers (B, N, {d}) and {d} sizes for labels of shape {tuple(labels.shape)}, "
            f"got centers {tuple(centers.shape)} and sizes {tuple(sizes)}"
        )
    half = [s // 2 for s in sizes]
    padded = F.pad(labels.long() + 1, [p for h in reversed(half) for p in (h, h)]) - 1  # outside -> -1
    offsets = torch.cartesian_prod(*[torch.arange(s, device=labels.device) for s in sizes]).view(-1, d)
    positions = centers.to(labels.device).unsqueeze(2) + offsets  # (B, N, V, d), in padded coordinates
    place = torch.tensor(
        [math.prod(padded.shape[2 + a :]) for a in range(d)], dtype=torch.int64, device=labels.device
    )
    flat = (positions * place).sum(-1)  # (B, N, V)
    return padded.flatten(1).gather(1, flat.flatten(1)).view(flat.shape)


def dice_affinity(windows_a: Tensor, windows_b: Tensor, num_classes: int) -> Tensor:
    """Dice affinity (Eq. 16): windows (B, N, V) / (B, N', V) class ids (-1 outside) -> (B, N, N') float32,
    w_ij = (1/M) sum_m dice(p_i^m, p_j^m) with the two windows overlaid voxel by voxel.

    A class absent from both windows counts as agreement (dice 1). Eq. 16 as printed reads 1 - mean dice, which
    would give two identical patches affinity 0; the paper's text ("the second way will regard them as totally
    dissimilar patches" when the masks do not overlap) describes the mean Dice itself, which is taken here.
    Cost: (B, N, M, V) one-hot windows, so RF windows of 3D taps (V = 47^3) take memory in the 100 MB range.
    """
    if (
        windows_a.ndim != 3
        or windows_b.ndim != 3
        or windows_a.shape[0] != windows_b.shape[0]
        or windows_a.shape[2] != windows_b.shape[2]
    ):
        raise ValueError(
            f"dice_affinity needs windows (B, N, V) and (B, N', V) with the same B and V, "
            f"got {tuple(windows_a.shape)} and {tuple(windows_b.shape)}"
        )
    classes = torch.arange(num_classes, device=windows_a.device).view(1, 1, -1, 1)
    a = (windows_a.unsqueeze(2) == classes).float()  # (B, N, M, V)
    b = (windows_b.unsqueeze(2) == classes).float()  # (B, N', M, V)
    inter = torch.einsum("bimv,bjmv->bijm", a, b)  # (B, N, N', M)
    total = a.sum(-1).unsqueeze(2) + b.sum(-1).unsqueeze(1)  # (B, N, N', M)
    dice = torch.where(total > 0, 2.0 * inter / total.clamp(min=1.0), torch.ones_like(total))
    return dice.mean(-1)


def center_affinity(labels: Tensor, centers_a: Tensor, centers_b: Tensor) -> Tensor:
    """Centre-label affinity (Fig. 5): 1 where the voxels under the two centres share a class, else 0.

    labels (B, *S), centers_a (B, N, d), centers_b (B, N', d) -> (B, N, N') float32.
    """
    for centers in (centers_a, centers_b):
        if centers.ndim != 3 or centers.shape[0] != labels.shape[0] or centers.shape[2] != labels.ndim - 1:
            raise ValueError(
                f"centers must have shape (B, N, {labels.ndim - 1}) for labels of shape {tuple(labels.shape)}, "
                f"got {tuple(centers.shape)}"
            )
    a = window_labels(labels, centers_a, (1,) * (labels.ndim - 1))[..., 0]  # (B, N)
    b = window_labels(labels, centers_b, (1,) * (labels.ndim - 1))[..., 0]  # (B, N')
    return (a.unsqueeze(2) == b.unsqueeze(1)).float()


def _cosine_matrix(a: Tensor, b: Tensor) -> Tensor:
    """a (B, N, C), b (B, N', C) -> (B, N, N') cosine similarities in fp32 (zero vectors give 0, not NaN)."""
    with torch.autocast(device_type=a.device.type, enabled=False):
        a = F.normalize(a.float(), dim=-1, eps=1e-8)
        b = F.normalize(b.float(), dim=-1, eps=1e-8)
        return torch.bmm(a, b.transpose(1, 2))


# --------------------------------------------------------------------------------------------------
# sampling and geometry


def _grid_counts(lengths: Sequence[int], n: int) -> list[int]:
    """Points per axis for a grid of about n points over a box of the given side lengths.

    Counts are proportional to the side lengths (equal spacing along every axis); an axis too short for one
    point at that spacing gets 1 and the budget goes to the others; among the floor/ceil roundings the product
    closest to n (in ratio) wins, the smaller product on a tie.
    """
    if n >= math.prod(lengths):
        return list(lengths)
    free = list(range(len(lengths)))
    fixed = dict.fromkeys(range(len(lengths)), 1)
    while True:
        scale = (n / math.prod(lengths[a] for a in free)) ** (1.0 / len(free))
        short = [a for a in free if lengths[a] * scale < 1.0]
        if not short:
            break
        free = [a for a in free if a not in short]
    best: tuple[float, int, list[int]] | None = None
    for ups in itertools.product((False, True), repeat=len(free)):
        counts = dict(fixed)
        for a, up in zip(free, ups):
            ideal = lengths[a] * scale
            counts[a] = min(max(math.ceil(ideal) if up else math.floor(ideal), 1), lengths[a])
        total = math.prod(counts.values())
        key = (abs(math.log(total / n)), total, [counts[a] for a in range(len(lengths))])
        if best is None or key[:2] < best[:2]:
            best = key
    assert best is not None
    return best[2]


def sample_grid_positions(
    spatial_shape: Sequence[int], n: int, generator: torch.Generator | None = None, margin: int = 0
) -> Tensor:
    """A true d-dimensional grid of about n positions spread over a tap (the paper's grid sampling).

    Per-axis counts are proportional to the axis length with a product close to n (see _grid_counts;
    all positions when n >= the number of positions). Points are evenly spaced along each axis with one random
    phase per axis drawn from ``generator``, so successive steps see different voxels while the layout stays a
    grid; with ``generator=None`` the grid is centred (deterministic, no global RNG). A grid rather than random
    positions because the paper uses grid sampling and it spreads the N vectors over the whole map, which keeps
    the mix of near/far and same/different-composition pairs stable from step to step.

    Args:
        spatial_shape: S_l, the tap's spatial shape (d ints >= 1).
        n: requested number of positions (>= 1).
        generator: source of the random phase; None for the centred grid.
        margin: border (in tap voxels) to skip on every side; reduced per axis to (S_l - 1) // 2 so that
            every axis keeps at least one position.

    Returns:
        (N, d) int64 tap indices in array order, raster order, on the CPU; N is about n.
    """
    shape = [operator.index(s) for s in spatial_shape]
    if not shape or any(s < 1 for s in shape):
        raise ValueError(f"spatial_shape must be positive ints, got {tuple(spatial_shape)}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    starts = [min(margin, (s - 1) // 2) for s in shape]
    lengths = [s - 2 * m for s, m in zip(shape, starts)]
    counts = _grid_counts(lengths, n)
    if generator is None:
        phase = torch.full((len(shape),), 0.5, dtype=torch.float64)
    else:
        phase = torch.rand(len(shape), generator=generator, device=generator.device).cpu().double()
    axes = []
    for a, (start, length, count) in enumerate(zip(starts, lengths, counts)):
        step = length / count
        offsets = torch.floor((phase[a] + torch.arange(count, dtype=torch.float64)) * step).long()
        axes.append(start + offsets.clamp(max=length - 1))
    mesh = torch.meshgrid(*axes, indexing="ij")
    return torch.stack([m.reshape(-1) for m in mesh], dim=-1)


def tap_centers(
    indices: Tensor, stride: Sequence[int], image_shape: Sequence[int], offset: Sequence[int] | None = None
) -> Tensor:
    """Image-space centre of tap voxels: c = i * s + offset per axis, clamped to [0, S - 1].

    indices (..., d) int64 tap indices in array order -> (..., d) int64 voxel indices of the image.
    The default offset (s - 1) // 2 is the centre of the s input voxels a stride-s cell covers (rounded down
    for even s). A network whose strided convs use same padding centres cell i on voxel i * s (offset 0);
    pass the offset the model's geometry gives when it is known. The clamp matters on the last cell of an
    axis whose length is not a multiple of s, or for a negative offset.
    """
    s = torch.tensor(list(stride), dtype=torch.int64, device=indices.device)
    shift = (s - 1) // 2 if offset is None else torch.tensor(list(offset), dtype=torch.int64, device=s.device)
    top = torch.tensor(list(image_shape), dtype=torch.int64, device=indices.device) - 1
    return torch.minimum((indices * s + shift).clamp(min=0), top)


def nearest_cells(
    centers: Tensor, stride: Sequence[int], tap_shape: Sequence[int], offset: Sequence[int] | None = None
) -> Tensor:
    """Tap cells whose image-space centres (see tap_centers) are nearest to given image voxels.

    centers (..., d) int64 image voxel indices -> (..., d) int64 tap indices in [0, S_l - 1]; ties go to the
    lower cell, so with the default offset this is the cell whose s input voxels contain the voxel.
    Used to put two taps of different strides on the same image positions.
    """
    s = torch.tensor(list(stride), dtype=torch.int64, device=centers.device)
    shift = (s - 1) // 2 if offset is None else torch.tensor(list(offset), dtype=torch.int64, device=s.device)
    top = torch.tensor(list(tap_shape), dtype=torch.int64, device=centers.device) - 1
    nearest = torch.div(centers - shift + (s - 1) // 2, s, rounding_mode="floor")
    return torch.minimum(nearest.clamp(min=0), top)


def rf_window(receptive_field: Sequence[int], image_shape: Sequence[int]) -> tuple[int, ...]:
    """Window for RF-PDCR: the receptive field per axis, made odd and no larger than the image.

    An even RF is widened by one so the window is centred on the cell's centre voxel. When the RF exceeds the
    image, the window shrinks to the largest odd size <= the axis length: windows then still differ between
    positions (each is clipped at the borders), whereas an RF-sized window would cover the whole axis at every
    position and make every affinity along it equal.
    """
    sizes = []
    for rf, extent in zip(receptive_field, image_shape):
        size = rf if rf % 2 else rf + 1
        if size > extent:
            size = extent if extent % 2 else extent - 1
        sizes.append(max(size, 1))
    return tuple(sizes)


def _gather(tap: Tensor, indices: Tensor) -> Tensor:
    """tap (B, C, *S_l), indices (N, d) -> (B, N, C) feature vectors at those tap voxels."""
    flat = indices[:, 0]
    for axis, size in enumerate(tap.shape[3:], start=1):
        flat = flat * size + indices[:, axis]
    return tap.flatten(2).index_select(2, flat).transpose(1, 2)


def _box_encoding(centers: Tensor, sizes: Sequence[int], image_shape: Sequence[int]) -> Tensor:
    """Patch position encoding: (N, d) centres -> (N, 2d) float32 [min_0, max_0, min_1, max_1, ...] in [0, 1].

    The window box clipped to the image, normalised by (S - 1) per axis, so coordinates do not swamp the
    cosine similarity the way raw pixel coordinates would.
    """
    lo, hi = _window_bounds(centers, sizes, image_shape)
    scale = torch.tensor([max(s - 1, 1) for s in image_shape], dtype=torch.float32, device=centers.device)
    box = torch.stack([lo.float() / scale, (hi - 1).float() / scale], dim=-1)  # (N, d, 2)
    return box.flatten(1)


# --------------------------------------------------------------------------------------------------
# the module


@dataclass(frozen=True)
class PDCRTerms:
    """What PDCRLoss returns.

    loss: scalar, weight * (sum of the per-layer and cross-pair terms); carries the graph.
    per_layer: unweighted terms, detached, for logging; keys are tap names and "a<->b" for cross pairs.
    """

    loss: Tensor
    per_layer: dict[str, Tensor]


def _module_key(name: str) -> str:
    return "tap_" + re.sub(r"[^0-9A-Za-z_]", "_", name)


class _Projection(nn.Module):
    """1x1 conv (C -> proj) + BatchNorm + ReLU for cross-layer terms, applied to the sampled vectors only.

    A 1x1 conv evaluated at the sampled voxels equals a Linear on the gathered vectors, so the full map is
    never projected. BatchNorm (as in the authors' code) takes its statistics from the B*N sampled vectors
    rather than from every voxel of the map; it needs B*N >= 2 in training mode.
    """

    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.linear = nn.Linear(in_channels, out_channels, bias=False)
        self.norm = nn.BatchNorm1d(out_channels)

    def forward(self, vectors: Tensor) -> Tensor:
        """(B, N, C) -> (B, N, proj)."""
        batch, n, _ = vectors.shape
        out = self.norm(self.linear(vectors).flatten(0, 1))
        return F.relu(out).view(batch, n, -1)


class PDCRLoss(nn.Module):
    """PDCR over named feature taps (H-PDCR or RF-PDCR, single-layer and cross-layer terms), 2D and 3D.

    Args:
        tap_info: per tap name, its channels, stride (d ints) and receptive field (d ints), as the model reports.
        config: the options below (``layers`` must be set; ``enabled`` is the trainer's and not read here).
            layers: tap name -> number of sampled vectors N for a single-layer term (paper: 128/64/32/8 by depth).
            mode: "h" (patch series ``patch_sizes``, loss averaged over sizes) or "rf" (window = the tap's
                receptive field, see rf_window).
            patch_sizes: H-PDCR window sizes, each an odd int or one odd int per axis.
            cross_pairs: pairs of tap names for cross-layer terms.
            cross_samples: N for cross-layer terms, sampled on the coarser tap's grid.
            proj_channels: width of the cross-layer projections (paper: 32).
            position_encoding: concatenate the normalised patch box (section III-B-1) to each vector; in H mode
                the box, hence the similarity, is per patch size.
            temperature: tau (the paper gives none; 0.5 as in the authors' 3D code).
            weight: lambda, the factor of the summed single-layer terms in ``PDCRTerms.loss`` (paper: 0.01).
            cross_weight: the factor of the cross-layer terms (None: ``weight``).
            layer_modes: tap name -> "h" or "rf", overriding ``mode`` for that tap (a cross pair's two taps
                must share a mode).
            form: "paper" (Eq. 9) or "authors" (shifted similarity), see dragsaw_loss.
            reduction: "mean" or "sum" over b, i, j (then averaged over the patch series).
            affinity, constant_affinity, rigid_threshold: the affinity variant (pair_affinity, dice_affinity,
                center_affinity).
            series: "loss" (loss per patch size, then averaged) or "ratio" (fractions averaged first).
        num_classes: M, background included.
        spatial_dims: 2 or 3.
        center_offsets: optional tap name -> per-axis offset from i * stride to the centre of cell i (see
            tap_centers); taps not listed use their ``TapInfo.offset`` (0 for every model in the registry,
            whose same-padded convs centre cell i on input voxel i * stride).

    The cross-layer projections are parameters of this module: the optimizer must include them.
    """

    def __init__(
        self,
        tap_info: Mapping[str, TapInfo],
        config: PDCRConfig,
        *,
        num_classes: int,
        spatial_dims: int,
        center_offsets: Mapping[str, Sequence[int]] | None = None,
    ) -> None:
        super().__init__()
        if config.layers is None:
            raise ValueError("layers is not set: name the taps to sample (tap name -> number of positions)")
        layers, mode, patch_sizes = config.layers, config.mode, config.patch_sizes
        cross_pairs, cross_samples, proj_channels = (
            config.cross_pairs,
            config.cross_samples,
            config.proj_channels,
        )
        temperature, weight = config.temperature, config.weight
        cross_weight = weight if config.cross_weight is None else config.cross_weight
        layer_modes = dict(config.layer_modes or {})
        if spatial_dims not in (2, 3):
            raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if mode not in ("h", "rf") or any(m not in ("h", "rf") for m in layer_modes.values()):
            raise ValueError(f"mode and layer_modes values must be 'h' or 'rf', got {mode!r}, {layer_modes}")
        if config.form not in FORMS or config.reduction not in ("mean", "sum"):
            raise ValueError(
                f"form must be one of {FORMS} and reduction 'mean' or 'sum', got {config.form!r}, {config.reduction!r}"
            )
        if config.affinity not in AFFINITIES or config.series not in ("loss", "ratio"):
            raise ValueError(
                f"affinity must be one of {AFFINITIES} and series 'loss' or 'ratio', "
                f"got {config.affinity!r}, {config.series!r}"
            )
        if cross_weight < 0:
            raise ValueError(f"cross_weight must be >= 0, got {cross_weight}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if weight < 0:
            raise ValueError(f"weight must be >= 0, got {weight}")
        cross_pairs = tuple(tuple(pair) for pair in cross_pairs)
        if not layers and not cross_pairs:
            raise ValueError("PDCRLoss needs at least one entry in layers or cross_pairs")
        used = list(layers) + [name for pair in cross_pairs for name in pair]
        missing = sorted({name for name in used if name not in tap_info})
        if missing:
            raise ValueError(f"taps {missing} are not in tap_info (known: {sorted(tap_info)})")
        for name in set(used):
            info = tap_info[name]
            if len(info.stride) != spatial_dims or len(info.receptive_field) != spatial_dims:
                raise ValueError(
                    f"tap {name!r}: stride {info.stride} and receptive_field {info.receptive_field} "
                    f"must have {spatial_dims} entries"
                )
            if min(info.stride) < 1 or min(info.receptive_field) < 1 or info.channels < 1:
                raise ValueError(
                    f"tap {name!r}: channels, stride and receptive_field must be >= 1, got {info}"
                )
        for name, n in layers.items():
            if operator.index(n) < 1:
                raise ValueError(f"layers[{name!r}] (samples) must be >= 1, got {n}")
        unknown_modes = sorted(set(layer_modes) - set(tap_info))
        if unknown_modes:
            raise ValueError(f"layer_modes names taps {unknown_modes} that are not in tap_info")
        self.modes = {name: layer_modes.get(name, mode) for name in tap_info}
        for pair in cross_pairs:
            if len(pair) != 2 or pair[0] == pair[1]:
                raise ValueError(f"cross_pairs entries must be two different tap names, got {pair!r}")
            if self.modes[pair[0]] != self.modes[pair[1]]:
                # an RF window has no k-th partner in a patch series
                raise ValueError(
                    f"cross pair {pair!r} mixes modes {self.modes[pair[0]]!r} and {self.modes[pair[1]]!r}"
                )
        if cross_pairs and (cross_samples < 2 or proj_channels < 1):
            raise ValueError(
                f"cross_samples must be >= 2 and proj_channels >= 1, got {cross_samples} and {proj_channels}"
            )
        if "h" in {self.modes[name] for name in used}:
            if not patch_sizes:
                raise ValueError("patch_sizes must not be empty in mode 'h'")
            self.patch_sizes = tuple(_odd_sizes(k, spatial_dims, "patch_sizes entry") for k in patch_sizes)
        else:
            self.patch_sizes = ()
        self.tap_info = dict(tap_info)
        self.num_classes = num_classes
        self.layers = {name: operator.index(n) for name, n in layers.items()}
        self.mode = mode
        self.cross_pairs = cross_pairs
        self.cross_samples = cross_samples
        self.position_encoding = config.position_encoding
        self.temperature = float(temperature)
        self.weight = float(weight)
        self.cross_weight = float(cross_weight)
        self.form = config.form
        self.reduction = config.reduction
        self.affinity = config.affinity
        self.constant_affinity = float(config.constant_affinity)
        self.rigid_threshold = float(config.rigid_threshold)
        self.series = config.series
        self.spatial_dims = spatial_dims
        center_offsets = dict(center_offsets or {})
        unknown = sorted(set(center_offsets) - set(tap_info))
        if unknown or any(len(v) != spatial_dims for v in center_offsets.values()):
            raise ValueError(
                f"center_offsets must map tap names in tap_info to {spatial_dims} ints, got {center_offsets} "
                f"(unknown taps: {unknown})"
            )
        self.center_offsets = {name: tuple(map(operator.index, v)) for name, v in center_offsets.items()}
        for name, info in tap_info.items():
            offset = getattr(info, "offset", None)
            if name not in self.center_offsets and offset is not None:
                self.center_offsets[name] = tuple(offset)
        projected = list(dict.fromkeys(name for pair in cross_pairs for name in pair))
        keys = {name: _module_key(name) for name in projected}
        if len(set(keys.values())) != len(keys):
            raise ValueError(
                f"tap names {projected} collide once made into module names {list(keys.values())}"
            )
        self._projection_keys = keys
        self.projections = nn.ModuleDict(
            {keys[name]: _Projection(self.tap_info[name].channels, proj_channels) for name in projected}
        )

    def extra_repr(self) -> str:
        return (
            f"mode={self.mode!r}, layers={self.layers}, cross_pairs={self.cross_pairs}, "
            f"num_classes={self.num_classes}, tau={self.temperature}, weight={self.weight}, "
            f"cross_weight={self.cross_weight}, form={self.form!r}, reduction={self.reduction!r}, "
            f"affinity={self.affinity!r}, series={self.series!r}"
        )

    def _windows(self, name: str, image_shape: Sequence[int]) -> tuple[tuple[int, ...], ...]:
        if self.modes[name] == "h":
            return self.patch_sizes
        return (rf_window(self.tap_info[name].receptive_field, image_shape),)

    def windows(self, image_shape: Sequence[int]) -> dict[str, tuple[tuple[int, ...], ...]]:
        """The label windows each used tap gets for an image of ``image_shape`` (printed at a run's start)."""
        used = list(dict.fromkeys(list(self.layers) + [n for pair in self.cross_pairs for n in pair]))
        return {name: self._windows(name, image_shape) for name in used}

    def _check_inputs(self, taps: Mapping[str, Tensor], labels: Tensor) -> None:
        d = self.spatial_dims
        if labels.ndim != d + 1:
            raise ValueError(
                f"labels must have shape (B, *S) with {d} spatial dims, got {tuple(labels.shape)}"
            )
        _check_labels(labels, self.num_classes)
        needed = list(dict.fromkeys(list(self.layers) + [n for pair in self.cross_pairs for n in pair]))
        missing = [name for name in needed if name not in taps]
        if missing:
            raise ValueError(f"taps {missing} are missing from the model output (got {sorted(taps)})")
        for name in needed:
            tap, info = taps[name], self.tap_info[name]
            if tap.ndim != d + 2 or tap.shape[0] != labels.shape[0] or tap.shape[1] != info.channels:
                raise ValueError(
                    f"tap {name!r} must have shape (B={labels.shape[0]}, C={info.channels}, {d} spatial dims) "
                    f"for labels of shape {tuple(labels.shape)}, got {tuple(tap.shape)}"
                )
            # the first voxel of the last cell must fall inside the image; this catches a wrong stride or
            # transposed axes instead of silently pairing features with the wrong labels
            if any(
                (t - 1) * s >= extent for t, s, extent in zip(tap.shape[2:], info.stride, labels.shape[1:])
            ):
                raise ValueError(
                    f"tap {name!r} of spatial shape {tuple(tap.shape[2:])} with stride {info.stride} reaches "
                    f"outside the image of spatial shape {tuple(labels.shape[1:])}"
                )

    def _term(
        self,
        vec_a: Tensor,
        centers_a: Tensor,
        windows_a: Sequence[Sequence[int]],
        vec_b: Tensor,
        centers_b: Tensor,
        windows_b: Sequence[Sequence[int]],
        table: Tensor,
        labels: Tensor,
    ) -> Tensor:
        """One PDCR term: vec (B, N, C) at image centres (N, d), reduced over the window pairs.

        Per window pair k: w_k from the chosen affinity, l_k (B, N, N') from dragsaw_loss; the term is the mean
        over k of mean_{b,i,j} l_k ("mean") or of sum_{b,i,j} l_k ("sum"). With series "ratio" the class
        fractions are averaged over the series first, so there is one w and one loss (Table V b).
        """
        batch = vec_a.shape[0]
        image_shape = tuple(labels.shape[1:])
        same = vec_a is vec_b and centers_a is centers_b
        full_a, full_b = centers_a.expand(batch, -1, -1), centers_b.expand(batch, -1, -1)
        pairs = list(zip(windows_a, windows_b))
        with torch.no_grad():
            if self.affinity == "dice":
                weights = [
                    dice_affinity(
                        window_labels(labels, full_a, size_a),
                        window_labels(labels, full_b, size_b),
                        self.num_classes,
                    )
                    for size_a, size_b in pairs
                ]
            elif self.affinity == "center":
                weights = [center_affinity(labels, full_a, full_b)] * len(pairs)
            else:
                phis = []
                for size_a, size_b in pairs:
                    phi_a = _window_fractions(table, full_a, size_a)
                    phi_b = phi_a if same and size_a == size_b else _window_fractions(table, full_b, size_b)
                    phis.append((phi_a, phi_b))
                if self.series == "ratio" and len(phis) > 1:
                    phis = [tuple(torch.stack(side).mean(0) for side in zip(*phis))]
                weights = [
                    pair_affinity(
                        phi_a,
                        phi_b,
                        self.affinity,
                        constant=self.constant_affinity,
                        threshold=self.rigid_threshold,
                    )
                    for phi_a, phi_b in phis
                ]
        if len(weights) < len(pairs):
            # ratio-first: one contrast; its position encoding takes the largest window of the series
            pairs = [max(pairs, key=lambda p: math.prod(p[0]))]
        sims = []
        for size_a, size_b in pairs:
            if self.position_encoding:
                a = torch.cat(
                    [vec_a.float(), _box_encoding(centers_a, size_a, image_shape).expand(batch, -1, -1)], -1
                )
                b = torch.cat(
                    [vec_b.float(), _box_encoding(centers_b, size_b, image_shape).expand(batch, -1, -1)], -1
                )
                sims.append(_cosine_matrix(a, b))
            elif not sims:
                sims.append(_cosine_matrix(vec_a, vec_b))
        w = torch.cat(weights)  # (P*B, N, N'), stacked by window then batch
        sim = torch.cat(sims) if len(sims) > 1 else sims[0].repeat(len(weights), 1, 1)
        loss = dragsaw_loss(sim, w, self.temperature, form=self.form, reduction=self.reduction)
        # equal-sized blocks: the mean is the mean over windows of the per-window means; the sum is divided by
        # the number of windows, as the authors' 2D code averages its summed terms over the patch series
        return loss if self.reduction == "mean" else loss / len(weights)

    def forward(
        self, taps: Mapping[str, Tensor], labels: Tensor, *, generator: torch.Generator | None = None
    ) -> PDCRTerms:
        """PDCR terms for one batch.

        taps: name -> (B, C_l, *S_l) feature maps (any float dtype; similarities and the loss run in fp32).
        labels: (B, *S) integer class ids at input resolution.
        generator: the only source of randomness (grid phases); None gives centred grids.
        """
        self._check_inputs(taps, labels)
        image_shape = tuple(labels.shape[1:])
        device = labels.device
        with torch.no_grad():
            table = _class_integral(labels, self.num_classes)
        terms: dict[str, Tensor] = {}
        for name, n in self.layers.items():
            tap, info = taps[name], self.tap_info[name]
            indices = sample_grid_positions(tap.shape[2:], n, generator).to(tap.device)
            vectors = _gather(tap, indices)
            centers = tap_centers(indices, info.stride, image_shape, self.center_offsets.get(name)).to(device)
            windows = self._windows(name, image_shape)
            terms[name] = self._term(vectors, centers, windows, vectors, centers, windows, table, labels)
        for first, second in self.cross_pairs:
            stride_1, stride_2 = self.tap_info[first].stride, self.tap_info[second].stride
            coarse, fine = (first, second) if math.prod(stride_1) >= math.prod(stride_2) else (second, first)
            coarse_info, fine_info = self.tap_info[coarse], self.tap_info[fine]
            idx_coarse = sample_grid_positions(taps[coarse].shape[2:], self.cross_samples, generator)
            idx_coarse = idx_coarse.to(taps[coarse].device)
            centers_coarse = tap_centers(
                idx_coarse, coarse_info.stride, image_shape, self.center_offsets.get(coarse)
            )
            idx_fine = nearest_cells(
                centers_coarse, fine_info.stride, taps[fine].shape[2:], self.center_offsets.get(fine)
            ).to(taps[fine].device)
            centers_fine = tap_centers(idx_fine, fine_info.stride, image_shape, self.center_offsets.get(fine))
            sampled = {
                coarse: (idx_coarse, centers_coarse.to(device)),
                fine: (idx_fine, centers_fine.to(device)),
            }
            vec = {
                name: self.projections[self._projection_keys[name]](_gather(taps[name], sampled[name][0]))
                for name in (first, second)
            }
            terms[f"{first}<->{second}"] = self._term(
                vec[first],
                sampled[first][1],
                self._windows(first, image_shape),
                vec[second],
                sampled[second][1],
                self._windows(second, image_shape),
                table,
                labels,
            )
        single = [v for k, v in terms.items() if "<->" not in k]
        cross = [v for k, v in terms.items() if "<->" in k]
        total = sum(
            (
                w * torch.stack(vs).sum()
                for w, vs in ((self.weight, single), (self.cross_weight, cross))
                if vs
            ),
            start=torch.zeros((), device=device),
        )
        return PDCRTerms(loss=total, per_layer={k: v.detach() for k, v in terms.items()})

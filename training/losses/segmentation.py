"""Segmentation losses: cross-entropy, soft Dice, CE + Dice, and nnU-Net-style deep supervision; 2D and 3D.

All losses take raw logits (B, K, *S) and integer labels (B, *S) and compute in fp32 whatever the autocast
state (softmax, log-softmax and the Dice ratios are where half precision hurts).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "CEDiceLoss",
    "DeepSupervisionLoss",
    "SegLossTerms",
    "ce_dice_loss",
    "cross_entropy_loss",
    "deep_supervision_weights",
    "downsample_labels",
    "soft_dice_loss",
]


@dataclass(frozen=True)
class SegLossTerms:
    """``loss`` carries the graph; ``ce`` and ``dice`` are detached scalars for logging."""

    loss: Tensor
    ce: Tensor
    dice: Tensor


def _check(logits: Tensor, labels: Tensor) -> None:
    if logits.dim() not in (4, 5):
        raise ValueError(f"logits must be (B, K, H, W) or (B, K, D, H, W), got shape {tuple(logits.shape)}")
    if tuple(labels.shape) != (logits.shape[0], *logits.shape[2:]):
        raise ValueError(
            f"labels must be (B, *S) matching logits (B, K, *S): labels {tuple(labels.shape)}, "
            f"logits {tuple(logits.shape)}"
        )
    if labels.dtype != torch.int64:
        raise ValueError(f"labels must be int64, got {labels.dtype} (shape {tuple(labels.shape)})")


def cross_entropy_loss(
    logits: Tensor, labels: Tensor, *, ignore_index: int | None = None, class_weights: Tensor | None = None
) -> Tensor:
    """Mean pixel-wise cross-entropy: logits (B, K, *S), labels (B, *S) int64 -> scalar fp32."""
    _check(logits, labels)
    with torch.autocast(logits.device.type, enabled=False):
        return F.cross_entropy(
            logits.float(),
            labels,
            weight=None if class_weights is None else class_weights.float(),
            ignore_index=-100 if ignore_index is None else ignore_index,
        )


def soft_dice_loss(
    logits: Tensor,
    labels: Tensor,
    *,
    include_background: bool = False,
    smooth: float = 1e-5,
    batch_dice: bool = False,
    ignore_index: int | None = None,
) -> Tensor:
    """Soft Dice loss ``1 - mean_c (2 |P_c G_c| + smooth) / (|P_c| + |G_c| + smooth)`` on softmax probabilities.

    logits (B, K, *S), labels (B, *S) int64 -> scalar fp32. The mean runs over classes (channel 0 dropped unless
    ``include_background``) and, unless ``batch_dice`` (nnU-Net's choice for 2D), over images; with
    ``batch_dice`` the sums pool the whole batch first. A class absent from both prediction and label scores
    Dice 1 (loss 0) thanks to ``smooth``; absent from the label but predicted, it scores about 0.
    Pixels labelled ``ignore_index`` count in neither P nor G.
    """
    _check(logits, labels)
    num_classes = logits.shape[1]
    if not include_background and num_classes < 2:
        raise ValueError(
            f"soft_dice_loss without background needs at least 2 classes, got logits {tuple(logits.shape)}"
        )
    with torch.autocast(logits.device.type, enabled=False):
        probs = logits.float().softmax(1)
        valid = None if ignore_index is None else labels != ignore_index
        safe = labels if valid is None else torch.where(valid, labels, 0)
        target = F.one_hot(safe, num_classes).movedim(-1, 1).float()  # (B, K, *S)
        if valid is not None:
            mask = valid.unsqueeze(1).float()
            probs, target = probs * mask, target * mask
        if not include_background:
            probs, target = probs[:, 1:], target[:, 1:]
        dims = tuple(range(2, logits.dim()))
        if batch_dice:
            dims = (0, *dims)
        intersection = (probs * target).sum(dims)
        denominator = probs.sum(dims) + target.sum(dims)
        dice = (2.0 * intersection + smooth) / (denominator + smooth).clamp_min(1e-8)
        return 1.0 - dice.mean()


def ce_dice_loss(
    logits: Tensor,
    labels: Tensor,
    *,
    ce_weight: float = 1.0,
    dice_weight: float = 1.0,
    include_background: bool = False,
    smooth: float = 1e-5,
    batch_dice: bool = False,
    ignore_index: int | None = None,
) -> SegLossTerms:
    """``ce_weight * CE + dice_weight * soft Dice`` (nnU-Net's and paper B's 1:1): logits (B, K, *S),
    labels (B, *S) int64 -> SegLossTerms."""
    ce = cross_entropy_loss(logits, labels, ignore_index=ignore_index)
    dice = soft_dice_loss(
        logits,
        labels,
        include_background=include_background,
        smooth=smooth,
        batch_dice=batch_dice,
        ignore_index=ignore_index,
    )
    return SegLossTerms(loss=ce_weight * ce + dice_weight * dice, ce=ce.detach(), dice=dice.detach())


class CEDiceLoss(nn.Module):
    """Thin module over :func:`ce_dice_loss`; ``forward(logits, labels) -> SegLossTerms``."""

    def __init__(
        self,
        *,
        ce_weight: float = 1.0,
        dice_weight: float = 1.0,
        include_background: bool = False,
        smooth: float = 1e-5,
        batch_dice: bool = False,
        ignore_index: int | None = None,
    ) -> None:
        super().__init__()
        self.options = {
            "ce_weight": ce_weight,
            "dice_weight": dice_weight,
            "include_background": include_background,
            "smooth": smooth,
            "batch_dice": batch_dice,
            "ignore_index": ignore_index,
        }

    def forward(self, logits: Tensor, labels: Tensor) -> SegLossTerms:
        return ce_dice_loss(logits, labels, **self.options)

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.options.items())


def deep_supervision_weights(num_outputs: int, *, exclude_lowest: bool = False) -> list[float]:
    """nnU-Net weights 1, 1/2, 1/4, ... (highest resolution first), normalised to sum to 1.

    ``exclude_lowest`` zeroes the last (coarsest) head before normalising, as nnU-Net does.
    """
    if num_outputs < 1:
        raise ValueError(f"num_outputs must be >= 1, got {num_outputs}")
    weights = [0.5**i for i in range(num_outputs)]
    if exclude_lowest and num_outputs > 1:
        weights[-1] = 0.0
    total = sum(weights)
    return [w / total for w in weights]


def downsample_labels(labels: Tensor, size: Sequence[int]) -> Tensor:
    """Nearest-neighbour resize of labels (B, *S) int64 to (B, *size); identity when the size already matches.

    Uses "nearest-exact" (pixel centres), so a stride-2 head sees the label at the centre of each 2x2 block.
    """
    if tuple(labels.shape[1:]) == tuple(size):
        return labels
    if len(size) != labels.dim() - 1:
        raise ValueError(
            f"size {tuple(size)} must have one entry per spatial axis of labels {tuple(labels.shape)}"
        )
    # float32 holds label values exactly up to 2^24.
    resized = F.interpolate(labels.unsqueeze(1).float(), size=tuple(size), mode="nearest-exact")
    return resized.squeeze(1).long()


class DeepSupervisionLoss(nn.Module):
    """Weighted sum of ``base`` over deep-supervision heads, labels resized by nearest to each head.

    ``base(logits (B, K, *S_i), labels (B, *S_i))`` returns a Tensor or a :class:`SegLossTerms`. ``forward(outputs,
    labels)`` takes the heads highest resolution first (``outputs[0]`` at the labels' size; for a model output
    that is ``[out.logits, *out.deep_supervision]``) and returns the same kind as ``base`` (terms summed with
    the same weights). ``weights`` default to nnU-Net's 1, 1/2, 1/4, ...
    normalised; given explicitly they are normalised to sum to 1.
    """

    def __init__(
        self,
        base: Callable[[Tensor, Tensor], Tensor | SegLossTerms],
        weights: Sequence[float] | None = None,
        *,
        exclude_lowest: bool = False,
    ) -> None:
        super().__init__()
        if weights is not None and (not weights or min(weights) < 0 or sum(weights) <= 0):
            raise ValueError(f"weights must be non-negative with a positive sum, got {list(weights)}")
        self.base = base
        self.weights = None if weights is None else [float(w) / sum(weights) for w in weights]
        self.exclude_lowest = exclude_lowest

    def head_weights(self, num_outputs: int) -> list[float]:
        if self.weights is None:
            return deep_supervision_weights(num_outputs, exclude_lowest=self.exclude_lowest)
        if len(self.weights) != num_outputs:
            raise ValueError(f"got {num_outputs} deep-supervision outputs but {len(self.weights)} weights")
        return self.weights

    def forward(self, outputs: Sequence[Tensor], labels: Tensor) -> Tensor | SegLossTerms:
        if len(outputs) == 0:
            raise ValueError("DeepSupervisionLoss needs at least one output")
        weights = self.head_weights(len(outputs))
        results = []
        for logits, weight in zip(outputs, weights):
            if weight == 0.0:
                continue
            results.append((weight, self.base(logits, downsample_labels(labels, logits.shape[2:]))))
        if isinstance(results[0][1], SegLossTerms):
            return SegLossTerms(
                loss=sum(w * r.loss for w, r in results),
                ce=sum(w * r.ce for w, r in results),
                dice=sum(w * r.dice for w, r in results),
            )
        return sum(w * r for w, r in results)

"""CE, soft Dice, CE + Dice and deep supervision: hand values, empty classes, 2D/3D, AMP."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from training.losses.segmentation import (
    CEDiceLoss,
    DeepSupervisionLoss,
    SegLossTerms,
    ce_dice_loss,
    cross_entropy_loss,
    deep_supervision_weights,
    downsample_labels,
    soft_dice_loss,
)

pytestmark = pytest.mark.torch


def _confident(labels: torch.Tensor, num_classes: int, scale: float = 30.0) -> torch.Tensor:
    return scale * F.one_hot(labels, num_classes).movedim(-1, 1).float()


def test_perfect_prediction_gives_zero_losses():
    labels = torch.tensor([[[0, 1], [2, 1]]])
    logits = _confident(labels, 3)
    assert soft_dice_loss(logits, labels).item() == pytest.approx(0.0, abs=1e-6)
    assert soft_dice_loss(logits, labels, include_background=True).item() == pytest.approx(0.0, abs=1e-6)
    assert cross_entropy_loss(logits, labels).item() == pytest.approx(0.0, abs=1e-6)


def test_dice_hand_value():
    # 1 x 1 x 4 image, 2 classes; foreground probabilities 0.8, 0.6, 0.3, 0.1 and labels 1, 1, 0, 0.
    p1 = torch.tensor([0.8, 0.6, 0.3, 0.1])
    logits = torch.stack([torch.zeros(4), torch.log(p1 / (1 - p1))]).reshape(1, 2, 1, 4)
    labels = torch.tensor([[[1, 1, 0, 0]]])
    dice_fg = 2 * (0.8 + 0.6) / (1.8 + 2)
    loss = soft_dice_loss(logits, labels, smooth=0.0)
    assert loss.item() == pytest.approx(1 - dice_fg, rel=1e-5)
    dice_bg = 2 * (0.7 + 0.9) / (2.2 + 2)
    with_bg = soft_dice_loss(logits, labels, smooth=0.0, include_background=True)
    assert with_bg.item() == pytest.approx(1 - (dice_fg + dice_bg) / 2, rel=1e-5)


def test_cross_entropy_hand_value_and_ignore_index():
    p1 = torch.tensor([0.8, 0.6, 0.3, 0.1])
    logits = torch.stack([torch.zeros(4), torch.log(p1 / (1 - p1))]).reshape(1, 2, 1, 4)
    labels = torch.tensor([[[1, 1, 0, 0]]])
    expected = -(math.log(0.8) + math.log(0.6) + math.log(0.7) + math.log(0.9)) / 4
    assert cross_entropy_loss(logits, labels).item() == pytest.approx(expected, rel=1e-5)
    ignored = torch.tensor([[[1, 255, 0, 255]]])
    expected_ignored = -(math.log(0.8) + math.log(0.7)) / 2
    assert cross_entropy_loss(logits, ignored, ignore_index=255).item() == pytest.approx(
        expected_ignored, rel=1e-5
    )


def test_empty_class_handling():
    labels = torch.zeros(1, 4, 4, dtype=torch.long)
    labels[0, :2] = 1  # class 2 absent from the labels
    # Class 2 also absent from the prediction: Dice 1 for it, total loss ~0.
    assert soft_dice_loss(_confident(labels, 3), labels).item() == pytest.approx(0.0, abs=1e-5)
    # Class 2 predicted where the label is 0: its Dice is ~0, the mean over classes 1 and 2 is ~0.5.
    predicted = labels.clone()
    predicted[0, 3, 3] = 2
    loss = soft_dice_loss(_confident(predicted, 3), labels)
    assert loss.item() == pytest.approx(0.5, abs=1e-3)


def test_batch_dice_pools_images():
    labels = torch.tensor([[[1, 1]], [[0, 0]]])  # image 2 has no foreground
    logits = _confident(torch.tensor([[[1, 0]], [[0, 1]]]), 2)  # one pixel right, one false positive
    per_image = soft_dice_loss(logits, labels, smooth=0.0)
    pooled = soft_dice_loss(logits, labels, smooth=0.0, batch_dice=True)
    # Image 1: Dice 2*1/(1+2) = 2/3; image 2: 0 -> mean 1/3. Pooled: 2*1/(2+2) = 1/2.
    assert per_image.item() == pytest.approx(1 - 1 / 3, abs=1e-5)
    assert pooled.item() == pytest.approx(1 - 1 / 2, abs=1e-5)


def test_dice_ignore_index_drops_pixels():
    labels = torch.tensor([[[1, 255, 0, 1]]])
    predicted = torch.tensor([[[1, 1, 0, 1]]])
    loss = soft_dice_loss(_confident(predicted, 2), labels, ignore_index=255)
    assert loss.item() == pytest.approx(0.0, abs=1e-5)


def test_ce_dice_terms():
    logits = torch.randn(2, 3, 5, 6, requires_grad=True)
    labels = torch.randint(0, 3, (2, 5, 6))
    terms = ce_dice_loss(logits, labels, ce_weight=2.0, dice_weight=0.5)
    assert isinstance(terms, SegLossTerms)
    assert not terms.ce.requires_grad and not terms.dice.requires_grad
    torch.testing.assert_close(terms.loss, 2.0 * terms.ce + 0.5 * terms.dice)
    torch.testing.assert_close(terms.ce, F.cross_entropy(logits, labels).detach())
    terms.loss.backward()
    assert torch.isfinite(logits.grad).all()
    module = CEDiceLoss(ce_weight=2.0, dice_weight=0.5)
    torch.testing.assert_close(module(logits, labels).loss, terms.loss)


def test_3d_and_bf16_autocast():
    conv = torch.nn.Conv3d(1, 3, 1)
    image = torch.randn(2, 1, 4, 6, 5)
    labels = torch.randint(0, 3, (2, 4, 6, 5))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = conv(image)
        terms = ce_dice_loss(logits, labels)
    assert terms.loss.dtype == torch.float32 and torch.isfinite(terms.loss)
    terms.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in conv.parameters())


def test_deep_supervision_weights():
    assert deep_supervision_weights(3) == pytest.approx([4 / 7, 2 / 7, 1 / 7])
    assert deep_supervision_weights(3, exclude_lowest=True) == pytest.approx([2 / 3, 1 / 3, 0.0])
    assert deep_supervision_weights(1) == [1.0]
    with pytest.raises(ValueError):
        deep_supervision_weights(0)


def test_downsample_labels_nearest():
    labels = torch.arange(16).reshape(1, 4, 4)
    assert downsample_labels(labels, (2, 2)).tolist() == [[[5, 7], [13, 15]]]  # centre-aligned nearest
    assert downsample_labels(labels, (4, 4)) is labels
    volume = torch.randint(0, 4, (1, 8, 8, 8))
    assert downsample_labels(volume, (4, 2, 2)).shape == (1, 4, 2, 2)
    with pytest.raises(ValueError, match="spatial"):
        downsample_labels(labels, (2, 2, 2))


def test_deep_supervision_loss_matches_manual_sum():
    labels = torch.randint(0, 3, (2, 8, 8))
    outputs = [torch.randn(2, 3, 8, 8), torch.randn(2, 3, 4, 4), torch.randn(2, 3, 2, 2)]
    loss = DeepSupervisionLoss(ce_dice_loss)(outputs, labels)
    weights = [4 / 7, 2 / 7, 1 / 7]
    expected = sum(
        w * ce_dice_loss(o, downsample_labels(labels, o.shape[2:])).loss for w, o in zip(weights, outputs)
    )
    torch.testing.assert_close(loss.loss, expected)
    plain = DeepSupervisionLoss(cross_entropy_loss, weights=[2, 1, 1])(outputs, labels)
    expected_plain = sum(
        w * cross_entropy_loss(o, downsample_labels(labels, o.shape[2:]))
        for w, o in zip([0.5, 0.25, 0.25], outputs)
    )
    torch.testing.assert_close(plain, expected_plain)
    with pytest.raises(ValueError, match="3 deep-supervision outputs but 2 weights"):
        DeepSupervisionLoss(cross_entropy_loss, weights=[1, 1])(outputs, labels)


def test_shape_errors_name_both_shapes():
    with pytest.raises(ValueError, match=r"labels \(2, 5, 5\).*logits \(2, 3, 5, 6\)"):
        cross_entropy_loss(torch.randn(2, 3, 5, 6), torch.zeros(2, 5, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="int64"):
        soft_dice_loss(torch.randn(2, 3, 5, 6), torch.zeros(2, 5, 6, dtype=torch.int32))

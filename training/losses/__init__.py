"""Training losses: CE + soft Dice (with deep supervision), PDCR on feature taps, CCDC on the projection head.

Each loss is a pure function with its shapes in the docstring plus a thin ``nn.Module`` holding the
hyperparameters; randomness comes from a passed ``torch.Generator``.
"""

from training.losses.ccdc import CCDCLoss, ccdc_loss
from training.losses.pdcr import PDCRLoss, PDCRTerms, affinity, dragsaw_loss, foreground_ratios
from training.losses.segmentation import DeepSupervisionLoss, ce_dice_loss, cross_entropy_loss, soft_dice_loss

__all__ = [
    "CCDCLoss",
    "DeepSupervisionLoss",
    "PDCRLoss",
    "PDCRTerms",
    "affinity",
    "ccdc_loss",
    "ce_dice_loss",
    "cross_entropy_loss",
    "dragsaw_loss",
    "foreground_ratios",
    "soft_dice_loss",
]

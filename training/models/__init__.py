"""Segmentation networks (torch side): registry, U-Net, DeepLabV3+, UAFR and receptive-field geometry."""

# Importing the model modules registers them.
from training.models import deeplabv3plus as _deeplabv3plus  # noqa: F401
from training.models import unet as _unet  # noqa: F401
from training.models.output import SegmentationOutput, TapInfo
from training.models.registry import create_model, list_models, register_model
from training.models.uafr import UAFR, normalized_entropy, normalized_entropy_from_logits

__all__ = [
    "UAFR",
    "SegmentationOutput",
    "TapInfo",
    "create_model",
    "list_models",
    "normalized_entropy",
    "normalized_entropy_from_logits",
    "register_model",
]

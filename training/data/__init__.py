"""Training data: dataset layouts, checks, preprocessing (cached), patch sampling and augmentation.

``prepare_dataset`` checks a dataset (every problem reported at once as a ``DatasetError``), splits it and
returns preprocessed cases; ``PatchDataset`` draws augmented training patches from them; ``check_dataset``
is the validation-only entry point behind ``medcl-train --check``.
"""

from __future__ import annotations

from training.data.check import check_dataset
from training.data.config import AugmentationConfig, DataConfig
from training.data.layouts import DatasetError
from training.data.preprocessing import DatasetInfo, PreparedCase, prepare_dataset
from training.data.sampling import PatchDataset

__all__ = [
    "AugmentationConfig",
    "DataConfig",
    "DatasetError",
    "DatasetInfo",
    "PatchDataset",
    "PreparedCase",
    "check_dataset",
    "prepare_dataset",
]

"""Training data: dataset layouts, checks, preprocessing (cached), patch sampling and augmentation.

``prepare_dataset`` checks a dataset (every problem reported at once as a ``DatasetError``), splits it and
returns preprocessed cases; ``PatchDataset`` draws augmented training patches from them; ``check_dataset``
is the validation-only entry point behind ``medcl-train --check``.

The names below are imported on first use: only ``sampling`` and ``augmentation`` need torch, and
``training.config`` (needed by ``medcl-evaluate`` on an ONNX model, which must run without torch) imports
``DataConfig`` from here.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from napari_medcl.lazy_exports import lazy_exports

_EXPORTS = {
    "AugmentationConfig": "training.data.config",
    "DataConfig": "training.data.config",
    "DatasetError": "training.data.layouts",
    "DatasetInfo": "training.data.preprocessing",
    "PatchDataset": "training.data.sampling",
    "PreparedCase": "training.data.preprocessing",
    "check_dataset": "training.data.check",
    "prepare_dataset": "training.data.preprocessing",
}

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

if TYPE_CHECKING:
    from training.data.check import check_dataset
    from training.data.config import AugmentationConfig, DataConfig
    from training.data.layouts import DatasetError
    from training.data.preprocessing import DatasetInfo, PreparedCase, prepare_dataset
    from training.data.sampling import PatchDataset


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, __all__)

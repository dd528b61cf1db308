"""Export (torch side): a trained network or checkpoint -> one self-describing ONNX file, verified against torch.

Public API: :func:`to_onnx`, :func:`verify_onnx`, :class:`InferenceWrapper`, plus :func:`spec_for_model`,
:func:`load_checkpoint_model`, the report classes and :class:`ExportError`. Names are imported lazily, so
``medcl-export --help`` does not wait for torch.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from napari_medcl.lazy_exports import lazy_exports

_EXPORTS = {
    "to_onnx": "export.onnx",
    "verify_onnx": "export.onnx",
    "spec_for_model": "training.model_spec",
    "ExportReport": "export.onnx",
    "VerifyReport": "export.onnx",
    "ShapeCheck": "export.onnx",
    "InferenceWrapper": "training.models.inference_wrapper",
    "ExportError": "export.checkpoint_model",
    "CheckpointModel": "export.checkpoint_model",
    "load_checkpoint_model": "export.checkpoint_model",
}

__all__ = [
    "CheckpointModel",
    "ExportError",
    "ExportReport",
    "InferenceWrapper",
    "ShapeCheck",
    "VerifyReport",
    "load_checkpoint_model",
    "spec_for_model",
    "to_onnx",
    "verify_onnx",
]

if TYPE_CHECKING:
    from export.checkpoint_model import CheckpointModel, ExportError, load_checkpoint_model
    from export.onnx import ExportReport, ShapeCheck, VerifyReport, to_onnx, verify_onnx
    from training.model_spec import spec_for_model
    from training.models.inference_wrapper import InferenceWrapper


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, __all__)

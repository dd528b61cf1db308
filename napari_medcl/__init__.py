"""napari-medcl: torch-free medical image segmentation inference with UAFR uncertainty, and its napari plugin.

The public API is imported lazily so that ``import napari_medcl`` stays fast (napari imports every plugin's
package at start-up) and never pulls in onnxruntime, SimpleITK or torch until they are used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from napari_medcl.lazy_exports import lazy_exports

__version__ = "0.1.0"

_EXPORTS = {
    "predict": "napari_medcl.prediction",
    "predict_iter": "napari_medcl.prediction",
    "Progress": "napari_medcl.prediction",
    "load_model": "napari_medcl.onnx_session",
    "read_image": "napari_medcl.io",
    "write_image": "napari_medcl.io",
    "write_prediction": "napari_medcl.case_writer",
    "WrittenCase": "napari_medcl.case_writer",
    "Provenance": "napari_medcl.provenance",
    "ModelSpec": "napari_medcl.spec",
    "Volume": "napari_medcl.volume",
    "Prediction": "napari_medcl.volume",
    "segment_layer": "napari_medcl.layer_data",
    "assess": "napari_medcl.verdict",
    "Verdict": "napari_medcl.verdict",
    "profile_cases": "napari_medcl.training_profile",
    "open_session": "napari_medcl.interactive",
    "CaseSession": "napari_medcl.interactive",
    "Prompt": "napari_medcl.prompts",
    "RemoteClient": "napari_medcl.remote",
}

__all__ = [
    "__version__",
    "predict",
    "predict_iter",
    "Progress",
    "load_model",
    "read_image",
    "write_image",
    "write_prediction",
    "WrittenCase",
    "Provenance",
    "ModelSpec",
    "Volume",
    "Prediction",
    "segment_layer",
    "assess",
    "Verdict",
    "profile_cases",
    "open_session",
    "CaseSession",
    "Prompt",
    "RemoteClient",
]

if TYPE_CHECKING:
    from napari_medcl.case_writer import WrittenCase, write_prediction
    from napari_medcl.interactive import CaseSession, open_session
    from napari_medcl.io import read_image, write_image
    from napari_medcl.layer_data import segment_layer
    from napari_medcl.onnx_session import load_model
    from napari_medcl.prediction import Progress, predict, predict_iter
    from napari_medcl.prompts import Prompt
    from napari_medcl.provenance import Provenance
    from napari_medcl.remote import RemoteClient
    from napari_medcl.spec import ModelSpec
    from napari_medcl.training_profile import profile_cases
    from napari_medcl.verdict import Verdict, assess
    from napari_medcl.volume import Prediction, Volume


__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS, __all__)

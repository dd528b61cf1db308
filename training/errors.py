"""Why a training run stops: it cannot start as asked (RunError), or training itself failed (TrainingError)."""

from __future__ import annotations

from napari_medcl.errors import MedclError

__all__ = ["RunError", "TrainingError"]


class RunError(MedclError, ValueError):
    """A run cannot start as asked (output folder holds another run, nothing to resume, config changed)."""


class TrainingError(MedclError, RuntimeError):
    """Training itself failed (the loss became NaN or infinite)."""

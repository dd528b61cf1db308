"""Why a training run stops: it cannot start as asked (RunError), or training itself failed (TrainingError)."""

from __future__ import annotations

__all__ = ["RunError", "TrainingError"]


class RunError(ValueError):
    """A run cannot start as asked (output folder holds another run, nothing to resume, config changed)."""


class TrainingError(RuntimeError):
    """Training itself failed (the loss became NaN or infinite)."""

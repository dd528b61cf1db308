"""A training checkpoint -> the trained network and its ModelSpec, ready for export.

Loading is training's (``training.trained_network.load_trained_network``, shared with ``medcl-evaluate``);
here its problems become export's: ``CheckpointError`` (from ``training.checkpoint``) for a file that is not
a napari-medcl checkpoint, an incomplete one, or one written by an incompatible config version;
``ExportError`` when the weights do not fit the architecture or the stored spec contradicts it.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from napari_medcl.errors import MedclError
from napari_medcl.spec import ModelSpec
from training.trained_network import NetworkMismatchError
from training.trained_network import TrainedNetwork as CheckpointModel

__all__ = ["CheckpointModel", "ExportError", "check_spec_matches_model", "load_checkpoint_model"]


class ExportError(MedclError, ValueError):
    """An export cannot be done or failed its checks. One line; names the file when there is one."""

    def __init__(self, path: str | Path | None, problem: str):
        self.path = None if path is None else Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path is not None else problem)


def load_checkpoint_model(path: str | Path) -> CheckpointModel:
    """Load ``path`` (weights only), rebuild its network, load the state dict strictly, read its ModelSpec.

    Raises CheckpointError (not a checkpoint, incomplete, foreign config version) or ExportError (weights
    that do not fit the architecture, a stored spec that is invalid or contradicts the network).
    """
    from training.trained_network import load_trained_network

    try:
        return load_trained_network(path)
    except NetworkMismatchError as error:
        raise ExportError(error.path, error.problem) from None


def check_spec_matches_model(spec: ModelSpec, model: nn.Module, path: str | Path | None = None) -> None:
    """ExportError unless the spec describes this network: dims, channels, classes, UAFR maps and divisor.

    The spec's divisor may be a multiple of the network's (a stricter promise), never something else."""
    from training.trained_network import check_spec_matches_model as check

    try:
        check(spec, model, path)
    except NetworkMismatchError as error:
        raise ExportError(error.path, error.problem) from None
